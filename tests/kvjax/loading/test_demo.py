"""Random-weight HF checkpoints from kvjax.testing.text load in transformers and in kvjax alike."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import kvjax
from kvjax.testing import text as demo


@pytest.mark.parametrize("arch", sorted(demo.ARCH_PRESETS))
def test_checkpoint_loads_in_transformers_and_kvjax_with_equal_logits(tmp_path, arch):
    path = demo.write_checkpoint(tmp_path / arch, arch, seed=3, init_std=0.1)
    torch_model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    model, tokenizer, cfg = kvjax.load(path, dtype="float32")
    ids = tokenizer("The harbour library opens at nine.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 64), np.array([ids]), all_logits=True)
    with torch.no_grad():
        expected = torch_model(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0], expected, atol=1e-4, rtol=0)


def test_sharded_bfloat16_checkpoint(tmp_path):
    path = demo.write_checkpoint(tmp_path / "sharded", "qwen3", dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    model, _, cfg = kvjax.load(path)  # dtype auto -> the checkpoint's bfloat16
    assert model.dtype == np.dtype("bfloat16") and cfg.qk_norm


def test_chat_template_renders_one_bos():
    tok = demo.build_tokenizer()
    ids = tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                      tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_bad_values_are_named(tmp_path):
    with pytest.raises(kvjax.KVJaxError, match="unknown arch 'gpt2'"):
        demo.write_checkpoint(tmp_path / "x", "gpt2")
    with pytest.raises(kvjax.KVJaxError, match="unknown like preset"):
        demo.write_checkpoint(tmp_path / "x", like="llama-9000")


def test_script_writes_and_rejects(tmp_path):
    script = [str(pathlib.Path(__file__).parents[3] / "scripts" / "make_demo_checkpoint.py")]
    ok = subprocess.run([sys.executable, *script, "--out", str(tmp_path / "q"), "--arch", "qwen2",
                         "--num-layers", "1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["num_hidden_layers"] == 1
    bad = subprocess.run([sys.executable, *script, "--out", str(tmp_path / "b"), "--arch", "gpt2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:")
    assert len(bad.stderr.strip().splitlines()) == 1
