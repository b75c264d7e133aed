"""scripts/bench_decode.py end to end on a tiny random checkpoint (both backends, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_decode.py"


def run_bench(*flags, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", KVJAX_HOME=str(cwd))
    return subprocess.run([sys.executable, str(SCRIPT), *flags], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from kvjax.testing import text as demo

    return demo.write_checkpoint(tmp_path_factory.mktemp("bench") / "tiny-llama", arch="llama")


def test_both_backends_both_batch_sizes(tiny_dir, tmp_path):
    pytest.importorskip("torch")
    proc = run_bench("--model-dir", str(tiny_dir), "--batch-sizes", "1,2", "--context-len", "8",
                     "--decode-steps", "3", "--warmup-steps", "1", "--repeats", "1",
                     "--json", "out.json", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["backend"], r["batch"]): r for r in report["results"]}
    assert set(rows) == {(b, n) for b in ("kvjax", "torch") for n in (1, 2)}
    assert all(r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 for r in rows.values())
    assert set(report["speedup_kvjax_over_torch"]) == {"1", "2"}
    assert report["environment"]["jax_platform"] == "cpu" and report["roofline"] is None
    assert "kvjax/torch" in proc.stdout  # the table


def test_missing_model_dir_exits_2_with_one_error_line(tmp_path):
    proc = run_bench("--model-dir", "/nonexistent", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent" in errors[0], proc.stderr
    assert proc.stdout == ""
