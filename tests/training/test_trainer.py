"""Training lowers held-out KL and trains every compressor layer (and no backbone weight);
kill-and-resume is bitwise exact, metrics included; bad data gives one clear error."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kvjax.errors import KVJaxError
from kvjax.loading import weights_fingerprint
from tests.training.conftest import SHARED, assert_every_layer_moved, tiny_config


def _params(path):
    from kvjax.compression.checkpoint import load_compressor

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_compressor(path), nnx.Param)))


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_validation_kl(trained_run):
    run, trainer = trained_run, trained_run["trainer"]
    summary, out = run["summary"], run["out"]
    jax.tree.map(np.testing.assert_array_equal, run["backbone"], jax.tree.map(np.array, trainer.backbone_state))
    # every layer of every compressor weight trained (so its gradient reached it); no backbone weight changed
    assert_every_layer_moved(run["start"], _params(out / "compressor"))
    fresh, trained = summary["initial_val"]["kl"], summary["final_val"]["kl"]
    assert summary["steps"] == 5 * SHARED["epochs"]
    assert trained < 0.6 * fresh, (fresh, trained)  # held-out KL: trained vs the freshly initialised compressor
    lines = _metrics(out)
    assert sum(line["split"] == "val" for line in lines) == SHARED["epochs"] and lines[-1]["split"] == "val"
    assert (out / "best" / "compressor.json").exists() and (out / "compressor" / "compressor.json").exists()
    saved = json.loads((out / "compressor" / "compressor.json").read_text())["extra"]
    assert saved["model_fingerprint"] == weights_fingerprint(trainer.cfg.model_dir)  # its teacher, for load's check
    assert summary["examples_per_s"] > 0 and summary["num_compiled_shapes"] == 1


def test_kill_and_resume_is_bitwise_equal(trained_run, tiny_train_setup, tmp_path):
    from training.trainer import train

    model_dir, data_path, _ = tiny_train_setup
    cut = tmp_path / "cut"
    # stopped mid-accumulation (micro-step 3 of updates of 2), like a kill right after a checkpoint
    assert train(tiny_config(model_dir, data_path, cut, stop_after=3, **SHARED)) == {"stopped_at": 3}
    assert not (cut / "compressor").exists()
    with open(cut / "metrics.jsonl", "a") as f:  # a killed run may have logged past its last checkpoint
        f.write(json.dumps({"split": "train", "step": 4, "epoch": 0, "loss": 1.0}) + "\n")
    train(tiny_config(model_dir, data_path, cut, resume=True, **SHARED))
    full = trained_run["out"]
    jax.tree.map(np.testing.assert_array_equal, _params(full / "compressor"), _params(cut / "compressor"))
    assert _metrics(cut) == _metrics(full)  # no duplicate or stale lines after the resume


@pytest.mark.parametrize("content,message", [
    ("", "holds no records"),
    ('{"text": "fine fine fine fine fine fine fine fine fine fine fine fine fine fine"}\n{"txt": 1}\n',
     r"bad\.jsonl:line 2: needs a non-empty"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "line 1: needs a user turn followed by"),
    ("{not json\n", r"line 1: not valid JSON"),
])
def test_bad_data_names_file_and_entry(tmp_path, content, message):
    import re

    from training.data import read_records

    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(KVJaxError) as info:
        read_records(path)
    assert re.search(message, str(info.value)), str(info.value)


def test_llava_json_records(tmp_path):
    from training.data import read_records

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"")
    entries = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                    {"from": "gpt", "value": "A cat."}]}]
    (tmp_path / "d.json").write_text(json.dumps(entries))
    (record,) = read_records(tmp_path / "d.json", tmp_path / "img")
    assert (record.question, record.answer, record.image) == ("What is it?", "A cat.", tmp_path / "img" / "a.png")
    entries[0]["image"] = "missing.png"
    (tmp_path / "d.json").write_text(json.dumps(entries))
    with pytest.raises(KVJaxError, match=r"d\.json:entry 0: image .*missing\.png.* does not exist"):
        read_records(tmp_path / "d.json", tmp_path / "img")


def test_keep_last_reaches_the_compressor_it_distils():
    """--keep-last is the compressor's own field, so the checkpoint carries it to inference."""
    from kvjax.config import ModelConfig
    from training.config import TrainConfig
    from training.trainer import make_compressor

    compressor = make_compressor(TrainConfig(keep_last=6, compression_factor=3), ModelConfig.tiny(), has_images=False)
    assert (compressor.cfg.keep_last, compressor.cfg.compression_factor) == (6, 3)
    with pytest.raises(KVJaxError, match="keep_last must be an integer >= 0"):
        TrainConfig(keep_last=-1)
