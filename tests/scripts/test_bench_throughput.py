"""scripts/bench_throughput.py end to end on a tiny random checkpoint (CPU), in process to share the
imports. Only the fixed-budget case runs (no --batch-sizes): each variant compiles once."""

from __future__ import annotations

import json
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_byte_budget_buys_int8_pages_and_a_larger_batch(tmp_path, monkeypatch, capsys):
    from kvjax import demo

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
