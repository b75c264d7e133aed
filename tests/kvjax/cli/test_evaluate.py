"""`python -m kvjax.evaluate` on the demo model: JSON and PNG written, baselines consistent, exit 2."""

import json

import pytest

from kvjax import evaluate


def test_evaluate_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path / "home"))
    out = tmp_path / "out"
    code = evaluate.main(["--methods", "knorm:0.5", "snapkv:0.5", "int8", "knorm:0.5+int8", "--context-len", "32", "--press-option", "window_size=8",
                          "--continuation-len", "4", "--num-windows", "1", "--num-prompts", "1", "--gen-len", "3",
                          "--out-dir", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in report["results"]}
    assert list(rows) == ["none", "knorm:0.5", "snapkv:0.5", "int8", "knorm:0.5+int8"]
    assert rows["none"]["top1_agreement"] == 1.0 and abs(rows["none"]["kl"]) < 1e-6
    assert rows["knorm:0.5"]["kv_bytes_ratio"] == pytest.approx(0.5)
    assert 0.6 < rows["int8"]["compression_ratio"] < 0.8  # int8 + a float32 scale per 32-dim row
    both = rows["knorm:0.5+int8"]  # half the tokens, each in int8: the byte ratios multiply
    assert both["kv_quantize"] == "int8" and rows["knorm:0.5"]["kv_quantize"] == "none"
    assert both["kv_bytes_ratio"] == pytest.approx(0.5 * rows["int8"]["kv_bytes_ratio"])
    assert both["compression_ratio"] == pytest.approx(1 - both["kv_bytes_ratio"])
    for row in rows.values():
        assert row["ppl"] > 1 and row["num_scored"] == 4 and row["num_tokens"] == 3 and row["ttft_s"] > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [(["--methods", "bogus:0.5"], "unknown method 'bogus'"),
                                           (["--methods", "knorm"], "needs compression ratios"),
                                           (["--methods", "knorm:0.5+int4"], "only +int8"),
                                           (["--methods", "int8+int8"], "only a press or ccm"),
                                           (["--methods", "l2_compress:0.5"], "has no compression ratio"),
                                           (["--text", "/nonexistent.txt"], "cannot read the text")])
def test_evaluate_errors_exit_2_with_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setenv("KVJAX_HOME", str(tmp_path / "home"))
    assert evaluate.main([*argv, "--out-dir", str(tmp_path / "out"), "--quiet", "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_int8_suffix_applies_to_every_ratio_of_a_spec():
    from kvjax.evaluation import parse_methods

    methods = parse_methods(["snapkv:0.25,0.5+int8", "knorm:0.5"])
    assert [(m.label, m.is_quantized, m.ratio) for m in methods[1:]] == [
        ("snapkv:0.25+int8", True, 0.25), ("snapkv:0.5+int8", True, 0.5), ("knorm:0.5", False, 0.5)]


def test_presses_sized_by_their_own_fields_take_press_options_and_a_measured_ratio():
    from kvjax.evaluation import parse_methods

    options = {"keep_ratio": 0.25, "prune_after": 0, "window_size": 8}
    methods = parse_methods(["l2_compress", "pyramidkv:0.5"], press_options=options)
    l2, pyramid = methods[1:]
    assert (l2.label, l2.ratio, l2.method.keep_ratio, l2.method.prune_after) == ("l2_compress", None, 0.25, 0)
    assert (pyramid.label, pyramid.ratio, pyramid.method.window_size) == ("pyramidkv:0.5", 0.5, 8)
