"""The shipped default text model (kvjax/assets/default-llama, trained by
scripts/train_default_model.py) loads through kvjax.load and beats the bigram baseline of its own
tokenizer on held-out text it never saw (a passage of the test split's book of Esther)."""

import json
import pathlib

import numpy as np

import kvjax

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "kvjax" / "assets" / "default-llama"
HELD_OUT = pathlib.Path(__file__).with_name("esther_1.txt")


def test_shipped_model_beats_its_bigram_baseline_on_held_out_text():
    figures = json.loads((ROOT / "docs" / "default_model_cpu.json").read_text())
    model, tokenizer, cfg = kvjax.load(MODEL, dtype="float32")
    assert (cfg.num_layers, cfg.head_dim, cfg.num_kv_heads, cfg.num_heads) == (6, 64, 2, 4)
    assert json.loads((MODEL / "training.json").read_text())["data"]["licence"] == "public domain"
    ids = np.asarray(tokenizer(HELD_OUT.read_text(), add_special_tokens=False)["input_ids"][:257], np.int32)
    logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 256), ids[None, :-1], all_logits=True)
    logp = np.asarray(logits[0], np.float64)
    logp -= logp.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    ppl = float(np.exp(-logp[np.arange(256), ids[1:]].mean()))
    assert ppl < figures["bigram_ppl"], (ppl, figures)
