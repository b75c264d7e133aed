"""scripts/bench_vlm_prefill.py end to end on the tiny MiniCPM-V demo (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_vlm_prefill.py"


def test_minicpmv_demo_reports_each_phase(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", KVJAX_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--like", "minicpmv", "--repeats", "1",
                           "--work-dir", str(tmp_path), "--json", "out.json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert set(report["median_ms"]) == {"preprocess", "vision", "prefill", "total"}
    assert all(v > 0 for v in report["median_ms"].values())
    model = report["model"]
    assert model["family"] == "MiniCPMVConfig" and 0 < model["image_len"] < model["prompt_tokens"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--like", "nope", "--work-dir", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --like 'nope'")
