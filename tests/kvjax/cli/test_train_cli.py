"""`python -m kvjax.train`: config files, one-line errors with exit 2, the output-directory rules,
and a trained compressor that `python -m kvjax.chat` reads."""

import json

import pytest


def errors(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]


def tiny_flags(setup, out):
    model_dir, data, _ = setup
    return ["--model-dir", str(model_dir), "--data", str(data), "--out", str(out), "--quiet", "--batch-size", "4",
            "--max-context-len", "96", "--max-answer-len", "24", "--min-bucket", "128", "--compression-factor", "4"]


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "epochs must be a positive integer"),
    (["--positions", "sideways"], "invalid choice"),
    (["--resume", "--overwrite"], "contradict"),
])
def test_bad_flags_exit_2(tmp_path, capsys, flags, message):
    from kvjax.cli.train import main

    try:
        code = main(["--out", str(tmp_path / "o"), *flags])
    except SystemExit as e:  # argparse's own errors exit from parse_args
        code = e.code
    assert code == 2
    lines = errors(capsys)
    assert len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_bad_config_file_and_busy_out_dir(tmp_path, capsys):
    from kvjax.cli.train import main

    (tmp_path / "c.json").write_text(json.dumps({"epochs": 2, "learning_rate": 1}))
    assert main(["--config", str(tmp_path / "c.json")]) == 2
    assert "unknown key 'learning_rate'" in errors(capsys)[0]
    (tmp_path / "c.yaml").write_text("epochs: two\n")
    assert main(["--config", str(tmp_path / "c.yaml")]) == 2
    assert "epochs must be int" in errors(capsys)[0]
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["--out", str(out)]) == 2
    (line,) = errors(capsys)
    assert "exists and is not empty" in line and (out / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("case", ["mismatched_compressor", "bad_data"])
def test_errors_after_loading_leave_out_dir_alone(tiny_train_setup, tmp_path, capsys, case):
    from kvjax.compression.checkpoint import save_compressor
    from kvjax.compression.ccm import CompressorConfig, build_compressor
    from kvjax.cli.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    flags = tiny_flags(tiny_train_setup, out) + ["--overwrite"]
    if case == "mismatched_compressor":
        wrong = save_compressor(tmp_path / "wrong", build_compressor(CompressorConfig(3, 1, 16, compression_factor=4)))
        flags += ["--init-compressor", str(wrong)]
        message = r"compressor does not fit the model.*\(3, 1, 16\).*\(2, 1, 16\)"
    else:
        (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n')
        flags += ["--data", str(tmp_path / "bad.jsonl")]
        message = r"bad\.jsonl:line 2: expected a JSON object"
    assert main(flags) == 2
    import re

    (line,) = errors(capsys)
    assert re.search(message, line), line
    assert (out / "keep.txt").read_text() == "precious"


def test_train_from_yaml_then_chat_reads_the_compressor(tiny_train_setup, trained_run, tmp_path,
                                                        capsys):
    """With trained_run in the same process, the CLI run reuses its compiled train step (same static settings)."""
    from kvjax.cli.chat import main as chat
    from kvjax.cli.train import main

    out = tmp_path / "run"
    # the yaml sets the compression factor (default 5) and the shared run's accumulate (one compiled step)
    (tmp_path / "c.yaml").write_text("epochs: 1\ncompression-factor: 4\naccumulate: 2\nmax-examples: 10\n")
    flags = tiny_flags(tiny_train_setup, out)
    del flags[flags.index("--compression-factor"):flags.index("--compression-factor") + 2]
    assert main(["--config", str(tmp_path / "c.yaml"), *flags]) == 0
    assert capsys.readouterr().out.strip() == str(out / "compressor")
    meta = json.loads((out / "compressor" / "compressor.json").read_text())
    assert meta["config"]["compression_factor"] == 4
    assert [json.loads(line)["split"] for line in (out / "metrics.jsonl").read_text().splitlines()] == ["train",
                                                                                                         "train", "val"]
    model_dir, _, _ = tiny_train_setup  # KVJAX_HOME is the fixture's
    assert chat(["--model-dir", str(model_dir), "--question", "Continue the story: the harbour town woke",
                 "--max-new-tokens", "3", "--kv-compress-ckpt", str(out / "compressor"), "--quiet"]) == 0
    assert capsys.readouterr().out.strip()
