"""scripts/bench_throughput.py end to end on a tiny random checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_throughput.py"


def test_reports_baseline_compressed_and_budget(tmp_path):
    from kvjax import demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model_dir), "--batch-sizes", "2",
                           "--prompt-len", "40", "--image-kv-len", "24", "--decode-steps", "3", "--warmup-steps", "1",
                           "--compression-factor", "4", "--page-size", "8", "--budget-seqs", "2",
                           "--json", "out.json", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    (row,) = report["results"]
    assert row["batch"] == 2 and row["baseline"]["tokens_per_s"] > 0 and row["compressed"]["tokens_per_s"] > 0
    assert row["baseline"]["kv_len"] == 40 and row["compressed"]["kv_len"] == 24 // 4 + 16 // 4
    assert row["compressed"]["pages_in_use"] < row["baseline"]["pages_in_use"]
    budget = report["fixed_budget"]
    assert budget["compressed"]["batch"] > budget["baseline"]["batch"]
    assert budget["compressed"]["all_decoded_together"] and budget["compressed"]["preempted"] == 0
    assert "speedup" in proc.stdout
