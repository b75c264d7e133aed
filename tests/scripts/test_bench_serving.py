"""scripts/bench_serving.py on a tiny random checkpoint (CPU), in process to share the imports:
end to end, baseline vs CCM on int8 pages in one byte-sized pool; the LLaVA reader, the Poisson
arrivals and the flag errors on their own (no model)."""

from __future__ import annotations

import json

import numpy as np
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_reports_serving_metrics_per_variant(tmp_path, monkeypatch, capsys):
    from kvjax.testing import text as demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.chdir(tmp_path)
    import bench_serving

    # All at t=0, one prompt length, CCM over the whole prompt (24 -> 6 slots, one page while it
    # decodes): one compile per step kind and variant.
    code = bench_serving.main(["--model-dir", str(model_dir), "--context-len", "6", "--num-samples", "4",
                               "--req-per-sec", "0", "--max-new-tokens", "3", "--variants", "baseline,ccm+int8",
                               "--image-kv-len", "24", "--compression-factor", "4", "--page-size", "8",
                               "--kv-cache-bytes", "65536", "--max-num-seqs", "4", "--prefill-batch-size", "4",
                               "--decoding-batch-size", "4", "--no-warmup",
                               "--json", "out.json", "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["variants"]) == ["baseline", "ccm+int8"]
    arrivals = report["arrivals_s"]
    assert arrivals == [0, 0, 0, 0]
    base, ccm = report["variants"]["baseline"], report["variants"]["ccm+int8"]
    for row in (base, ccm):
        assert row["num_requests"] == 4 and row["output_tokens"] == 12 and row["tokens_per_s"] > 0
        assert 0 <= row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] and row["tpot_s"]["p50"] >= 0
        assert 1 <= row["max_concurrent_seqs"] <= 4 and 0 < row["peak_pages"] <= row["num_pages"]
        assert row["num_pages"] == 65536 // row["page_bytes"] and row["pool_bytes"] <= 65536
    assert base["kv_cache_dtype"] == "auto" and ccm["kv_cache_dtype"] == "int8"
    assert ccm["num_pages"] > base["num_pages"]  # int8 pages: more of them in the same bytes
    assert base["mean_prompt_len"] == ccm["mean_prompt_len"] == 24
    assert base["mean_compressed_len"] is None and ccm["mean_compressed_len"] == 24 // 4
    assert ccm["pages_freed_by_compression"] > 0
    assert report["environment"]["command"]
    assert "TTFT" in capsys.readouterr().out


def test_reads_llava_questions_and_poisson_arrivals(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    question = "<image>\nDescribe the picture in a few words."
    data = [{"image": "a.jpg", "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "A cat."}]},
            {"messages": [{"role": "user", "content": "Hello there?"}]}, {"conversations": []}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    assert bench_serving.read_questions(tmp_path / "data.json") == ["Describe the picture in a few words.",
                                                                     "Hello there?"]
    arrivals = bench_serving.arrival_times(50.0, 8, np.random.default_rng(0))
    assert len(arrivals) == 8 and arrivals[0] == 0 and list(arrivals) == sorted(arrivals) and arrivals[-1] > 0
    assert bench_serving.split_variant("ccm+int8", "auto") == ("ccm", "int8")
    assert bench_serving.split_variant("knorm:0.5", "auto") == ("knorm:0.5", None)


def test_bad_flags_are_clean_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_serving

    assert bench_serving.main(["--like", "nope", "--num-samples", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: --like: unknown nope")
    assert bench_serving.main(["--model-dir", str(tmp_path), "--num-pages", "8", "--kv-cache-bytes", "100"]) == 2
    assert capsys.readouterr().err.startswith("error: --num-pages and --kv-cache-bytes")
    assert bench_serving.main(["--model-dir", str(tmp_path), "--variants", "ccm+int4"]) == 2
    assert capsys.readouterr().err.startswith("error: --variants: 'ccm+int4'")
