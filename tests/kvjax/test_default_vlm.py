"""The shipped default VLM (kvjax/assets/default-llava, trained by scripts/train_default_vlm.py) and
its decoupled CCM compressors (kvjax/assets/default-llava-ccm): chat with an --image and no model
flag uses both, answers about a drawn test scene come out right with the full cache and after CCM,
and the VQA suite's quick run keeps its schema."""

import json

import pytest

import kvjax
from kvjax import scenes
from kvjax.defaults import DEFAULT_VLM as MODEL, shipped_factors

# (test-split scene, question kind) pairs the shipped model answers right, with the full cache and
# after cf-5 compression (checked when they were chosen; the suite's figures cover the rest).
ASKED = ((0, "colour"), (4, "shape"))


def test_shipped_vlm_is_llava_with_64_image_tokens_and_a_decoupled_compressor():
    from kvjax.compression.checkpoint import load_compressor
    from kvjax.defaults import default_compressor_dir

    model, tokenizer, cfg = kvjax.load(MODEL, dtype="float32")
    assert type(model).__name__ == "LlavaModel" and cfg.num_image_tokens >= 64
    compressor = load_compressor(default_compressor_dir(5, MODEL), cfg.text, dtype="float32")
    assert compressor.cfg.compression_factor == 5 and compressor.cfg.image_mode == "image_mlp"
    assert 5 in shipped_factors(MODEL)


@pytest.mark.parametrize("flags", [[], ["--kv-compress"]], ids=["full", "ccm"])
def test_default_image_chat_answers_about_a_test_scene(flags, tmp_path, capsys):
    from kvjax.cli.chat import main

    for index, kind in ASKED:
        scene, questions = scenes.task("test", index)
        (q,) = [q for q in questions if q.kind == kind]
        image = tmp_path / f"scene{index}.png"
        scene.render(112).save(image)
        assert main(["--image", str(image), "--question", q.text, "--max-new-tokens", "8", *flags]) == 0
        out, err = capsys.readouterr()
        assert "shipped default VLM" in err and "UNTRAINED" not in err and "RANDOM" not in err
        assert q.is_answered_by(out), (q, out)


def test_vqa_suite_quick(tmp_path, capsys):
    """`--suite vqa --quick` on the shipped VLM: the schema, the full cache as its own reference,
    CCM rows at about 1/cf of the image bytes, presses matched to them, int8 at about a quarter."""
    from kvjax import evaluate

    assert evaluate.main(["--suite", "vqa", "--quick", "--out-dir", str(tmp_path), "--quiet"]) == 0, \
        capsys.readouterr().err
    report = json.loads((tmp_path / "vqa.json").read_text())
    assert report["model"] == str(MODEL)
    rows = {row["method"]: row for row in report["rows"]}
    for row in report["rows"]:
        assert all(isinstance(row[k], float) for k in ("kv_bytes_ratio", "vqa_acc", "agreement", "kl"))
        assert 0.0 <= row["vqa_acc"] <= 1.0
    full = report["rows"][0]
    assert full["method"] == "full" and full["kv_bytes_ratio"] == 1.0 and full["agreement"] == 1.0
    blank = report["blank_image"]  # the floor: answers with each image replaced by its background
    assert 0.0 <= blank["vqa_acc"] <= 1.0 and set(blank["vqa_acc_by_kind"]) == set(full["vqa_acc_by_kind"])
    assert abs(full["kl"]) < 1e-9
    for cf in shipped_factors(MODEL):
        ratio = rows[f"ccm:{cf}"]["kv_bytes_ratio"]
        assert 1 / cf <= ratio < 1 / cf + 0.1, (cf, ratio)  # the remainder of the span stays uncompressed
        assert abs(rows[f"snapkv:{1 - ratio:.3f}"]["kv_bytes_ratio"] - ratio) < 0.02
    assert 0.2 < rows["int8"]["kv_bytes_ratio"] < 0.3 and rows["int8"]["agreement"] > 0.8
    assert f"ccm:{max(shipped_factors(MODEL))}+int8" in rows and "knorm:0.500+int8" in rows
    assert (tmp_path / "vqa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
