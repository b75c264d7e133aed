"""scripts/bench_serving.py end to end on a tiny random checkpoint (CPU): a few Poisson requests,
baseline vs CCM vs a press in one run, from a LLaVA-style JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_serving.py"


def test_reports_serving_metrics_per_variant(tmp_path):
    from kvjax import demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    question = "<image>\nDescribe the picture in a few words, please, with some detail about the colours."
    data = [{"image": "a.jpg", "conversations": [{"from": "human", "value": question},
                                                {"from": "gpt", "value": "A cat."}]},
            {"conversations": [{"from": "human", "value": "Hello there, how are you today?"},
                               {"from": "gpt", "value": "Fine."}]}]
    (tmp_path / "data.json").write_text(json.dumps(data))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model_dir), "--dataset", "data.json",
                           "--num-samples", "4", "--req-per-sec", "50", "--max-new-tokens", "4",
                           "--variants", "baseline,ccm,knorm:0.5", "--image-kv-len", "8", "--compression-factor", "4",
                           "--page-size", "8", "--max-num-seqs", "4", "--prefill-batch-size", "2",
                           "--compress-batch-size", "2", "--decoding-batch-size", "4",
                           "--json", "out.json", "--png", "out.png", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert list(report["variants"]) == ["baseline", "ccm", "knorm:0.5"]
    arrivals = report["arrivals_s"]
    assert len(arrivals) == 4 and arrivals[0] == 0 and arrivals == sorted(arrivals)
    base, ccm = report["variants"]["baseline"], report["variants"]["ccm"]
    for row in report["variants"].values():
        assert row["num_requests"] == 4 and row["output_tokens"] == 16 and row["tokens_per_s"] > 0
        assert 0 <= row["ttft_s"]["p50"] <= row["ttft_s"]["p99"] and row["tpot_s"]["p50"] >= 0
        assert 1 <= row["max_concurrent_seqs"] <= 4 and 0 < row["peak_pages"] <= row["num_pages"]
    assert base["mean_compressed_len"] is None and ccm["mean_compressed_len"] < ccm["mean_prompt_len"]
    assert ccm["pages_freed_by_compression"] > 0
    assert report["environment"]["command"] and (tmp_path / "out.png").stat().st_size > 0
    assert "TTFT" in proc.stdout


def test_unknown_like_preset_is_a_clean_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--like", "nope", "--num-samples", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --like: unknown nope")
