"""Image training on the demo LLaVA: the vision tower embeds contexts, validation KL falls, the
saved compressor is decoupled with trained image MLPs; unreadable images give one clear error."""

import json

import jax
import numpy as np
from flax import nnx

from tests.training.conftest import assert_every_layer_moved


def test_llava_demo_training_trains_the_image_mlps(tiny_train_setup, tmp_path):
    from kvjax.compression.checkpoint import load_compressor
    from training.config import TrainConfig
    from training.trainer import Trainer

    trainer = Trainer(TrainConfig(demo="llava", out=str(tmp_path / "run"), epochs=2, batch_size=4, lr=1e-2,
                                  dropout=0.0, quiet=True, save_every=1000))
    assert all(ex.image_len > 0 for ex in trainer.train_set)  # BOS, "USER: " and the image features
    start = jax.tree.map(np.array, nnx.to_pure_dict(trainer.state["params"]))
    summary = trainer.run()
    assert summary["final_val"]["kl"] < 0.6 * summary["initial_val"]["kl"], summary  # 4 steps
    saved = load_compressor(tmp_path / "run" / "compressor")
    assert saved.cfg.image_mode == "image_mlp"
    params = nnx.to_pure_dict(nnx.state(saved, nnx.Param))
    assert set(params) == {"image_k", "image_v", "text_k", "text_v"}
    assert_every_layer_moved(start, params)  # gradients reached every layer of the image and text MLPs


def test_unreadable_image_names_file_and_entry(tiny_train_setup, tmp_path, capsys):
    from kvjax.cli.train import main

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "ok.png").write_bytes(b"not a png")
    entry = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                  {"from": "gpt", "value": "A shape."}]}
    (tmp_path / "d.json").write_text(json.dumps([entry, entry]))
    code = main(["--demo", "llava", "--data", str(tmp_path / "d.json"), "--image-root", str(tmp_path / "img"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(lines) == 1, lines
    assert "d.json:entry 0" in lines[0] and "ok.png" in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
