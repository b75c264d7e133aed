"""scripts/bench_kernels.py end to end with tiny shapes on CPU (kernels interpreted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_kernels.py"


def test_small_run_writes_every_op(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--repeats", "1", "--out", "out.json", "--quiet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["environment"]["pallas_interpreted"] is True
    rows = {(r["op"], r["impl"], r.get("batch")) for r in report["results"]}
    assert rows == {("decode_attention", impl, b) for impl in ("reference", "pallas", "pallas_int8")
                    for b in (1, 2)} | {
        (op, impl, None) for op in ("compact_kv", "ccm_compress") for impl in ("reference", "pallas")}
    for row in report["results"]:
        if row["op"] == "decode_attention":
            assert set(row["ms"]) == {"16", "48"} and row["ratio_long_over_short"] > 0
        else:
            assert row["ms"] > 0
    assert proc.stdout == ""
