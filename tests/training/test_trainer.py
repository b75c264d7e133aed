"""Training lowers held-out KL; kill-and-resume is bitwise exact; bad data gives one clear error."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from kvjax.errors import KVJaxError
from tests.training.conftest import tiny_config


def _params(path):
    from kvjax.compressor_checkpoint import load_compressor

    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(load_compressor(path), nnx.Param)))


def test_training_lowers_validation_kl(tiny_train_setup, tmp_path):
    from training.trainer import Trainer

    model_dir, data_path, _ = tiny_train_setup
    out = tmp_path / "run"
    trainer = Trainer(tiny_config(model_dir, data_path, out, epochs=6, lr=3e-3))
    backbone = jax.tree.map(np.array, trainer.backbone_state)
    start = jax.tree.map(np.array, trainer.state["params"])
    summary = trainer.run()
    jax.tree.map(np.testing.assert_array_equal, backbone, jax.tree.map(np.array, trainer.backbone_state))
    moved = jax.tree.map(lambda a, b: bool((a != np.asarray(b)).any()), start, trainer.state["params"])
    assert all(jax.tree.leaves(moved))  # every compressor weight trained, no backbone weight changed
    fresh, trained = summary["initial_val"]["kl"], summary["final_val"]["kl"]
    assert summary["steps"] == 30
    assert trained < 0.6 * fresh, (fresh, trained)  # held-out KL: trained vs the freshly initialised compressor
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["split"] == "val" for line in lines) == 6 and lines[-1]["split"] == "val"
    assert (out / "best" / "compressor.json").exists() and (out / "compressor" / "compressor.json").exists()
    assert summary["examples_per_s"] > 0 and summary["num_compiled_shapes"] == 1


def test_kill_and_resume_is_bitwise_equal(tiny_train_setup, tmp_path):
    from training.trainer import train

    model_dir, data_path, _ = tiny_train_setup
    settings = dict(epochs=2, accumulate=2, max_examples=12)
    train(tiny_config(model_dir, data_path, tmp_path / "full", **settings))
    assert train(tiny_config(model_dir, data_path, tmp_path / "cut", stop_after=3, **settings)) == {"stopped_at": 3}
    assert not (tmp_path / "cut" / "compressor").exists()
    train(tiny_config(model_dir, data_path, tmp_path / "cut", resume=True, **settings))
    jax.tree.map(np.testing.assert_array_equal, _params(tmp_path / "full" / "compressor"),
                 _params(tmp_path / "cut" / "compressor"))


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
