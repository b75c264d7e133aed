"""scripts/bench_compress.py end to end on a tiny random checkpoint (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_compress.py"


def test_reports_times_and_bytes(tmp_path):
    from kvjax.testing import text as demo

    model_dir = demo.write_checkpoint(tmp_path / "tiny", arch="llama")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model-dir", str(model_dir), "--batch-sizes", "1,2",
                           "--prompt-len", "40", "--image-len", "24", "--compression-factor", "4",
                           "--repeats", "1", "--json", "out.json", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert [r["batch"] for r in report["results"]] == [1, 2]
    for r in report["results"]:
        assert r["prefill_ms"] > 0 and r["compress_ms"] > 0
        assert r["kv_len_after"] == 24 // 4 + 16 // 4  # image 6 groups, text 4 groups, no leftovers
        assert r["kv_bytes_before"] == r["kv_bytes_after"] * 4
    assert "% of prefill" in proc.stdout
