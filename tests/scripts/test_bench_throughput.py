"""scripts/bench_throughput.py end to end on a tiny random checkpoint (CPU), in process to share the
imports. Only the fixed-budget case runs (no --batch-sizes): each variant compiles once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_byte_budget_buys_int8_pages_and_a_larger_batch(tmp_path, monkeypatch, capsys):
    from kvjax.testing import text as demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.chdir(tmp_path)
    import bench_throughput

    code = bench_throughput.main(["--model-dir", str(model_dir), "--batch-sizes", "", "--variants",
                                  "baseline,knorm:0.75+int8", "--prompt-len", "40", "--decode-steps", "2",
                                  "--warmup-steps", "1", "--page-size", "8", "--budget-seqs", "1",
                                  "--json", "out.json", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["results"] == []
    budget = report["fixed_budget"]
    base, knorm = budget["variants"]["baseline"], budget["variants"]["knorm:0.75+int8"]
    assert base["kv_cache_dtype"] == "auto" and knorm["kv_cache_dtype"] == "int8" and knorm["compressed"]
    assert base["kv_len"] == 40 and knorm["kv_len"] == 40 // 4
    assert budget["kv_cache_bytes"] == budget["seq_pages"] * base["page_bytes"]  # one float32 sequence
    for r in (base, knorm):  # as many pages as the bytes hold; every admitted sequence decodes at once
        assert r["num_pages"] == budget["kv_cache_bytes"] // r["page_bytes"]
        assert r["tokens_per_s"] > 0 and r["all_decoded_together"] and r["preempted"] == 0
    assert knorm["page_bytes"] < base["page_bytes"] and knorm["num_pages"] > base["num_pages"]
    assert knorm["batch"] > base["batch"] == 1 and budget["batch_ratio"]["knorm:0.75+int8"] == knorm["batch"]
    assert "knorm:0.75+int8" in capsys.readouterr().out


def test_empty_run_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_throughput

    code = bench_throughput.main(["--model-dir", str(tmp_path), "--batch-sizes", "", "--budget-seqs", "0"])
    assert code == 2 and capsys.readouterr().err.startswith("error: nothing to run")


def test_plots_name_every_variant(tmp_path, monkeypatch):
    """Both scripts' PNGs from small hand-made reports (the end-to-end tests skip --png: matplotlib's
    import would double their cost)."""
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving
    import bench_throughput

    row = {"tokens_per_s": 10.0, "batch": 2, "num_pages": 8}
    bench_throughput.plot({"results": [{"batch": b, "variants": {"baseline": row, "ccm+int8": row}} for b in (1, 4)],
                           "fixed_budget": {"kv_cache_bytes": 4096, "variants": {"baseline": row, "ccm+int8": row}}},
                          tmp_path / "throughput.png")
    latency = {"p50": 0.01, "p99": 0.02}
    serving = dict(row, ttft_s=latency, tpot_s=latency, peak_kv_bytes=8192)
    bench_serving.plot({"variants": {"baseline": serving, "ccm+int8": serving}}, tmp_path / "serving.png")
    assert (tmp_path / "throughput.png").stat().st_size > 0 and (tmp_path / "serving.png").stat().st_size > 0
