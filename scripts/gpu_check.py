"""The one command to run when a GPU is at hand (H100/H200): kernel tests and benchmarks, one JSON.

    python scripts/gpu_check.py                                  # writes gpu_check_out/gpu_check.json
    python scripts/gpu_check.py --model-dir /models/llama-2-7b   # real weights: no random 7B to write

Stages, in this order, each a subprocess with its own timeout (a failing or hanging stage costs
only its own figures), all within --budget-s (default 470 s, so the whole run ends in under 8
minutes; a stage that would start with less than 20 s left is skipped):
1. kernel_tests     pytest tests/pallas_kernels with KVJAX_KERNELS=pallas and the kernels compiled:
                    this script doubles as a pytest plugin (`-p gpu_check`) that makes every
                    `*_pallas(..., interpret=True)` the tests call run the compiled kernel instead.
2. bench_kernels    scripts/bench_kernels.py at its LLaVA-7B shapes (32 KV heads, head_dim 128, bf16).
3. weights          random Llama-2-7B weights (bf16, 13.5 GB) written once into --work-dir (skipped
                    with --model-dir, or when already there).
4. bench_decode     scripts/bench_decode.py on that model, bs 1, kvjax only; plus the HBM roofline:
                    bytes read per step (weights, and weights + the KV cache at the mean timed
                    length) / step time, against the device's HBM bandwidth.
5. bench_throughput scripts/bench_throughput.py, bs 1/32/128, baseline vs ccm vs ccm+int8 (the
                    fixed-budget case is left out for time).
6. tensor_parallel  with 2+ GPUs: bench_decode bs 1 and bench_throughput bs 32 (baseline, ccm) at
                    --tensor-parallel N (the largest power of two of the GPUs, at most 8, which
                    divides the 32 KV heads); with one GPU it is skipped and says so.

Without a GPU (jax sees none) it says so and exits 2: nothing here can be measured on a CPU (for
the compile-only check that runs anywhere, see scripts/gpu_compile_check.py). Exit 1 if a stage
failed or timed out, else 0.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
LIKE, DTYPE = "llama-2-7b", "bfloat16"
HBM_GBPS = (("H200", 4800.0), ("H100 NVL", 3900.0), ("H100 PCIe", 2000.0), ("H100", 3350.0))  # by device kind
MIN_STAGE_S = 20


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", default="gpu_check_out", help="gpu_check.json, and each stage's log and JSON")
    p.add_argument("--model-dir", help="a Llama-2-7B-shaped HF directory (default: random weights in --work-dir)")
    home = Path(os.environ.get("KVJAX_HOME") or Path.home() / ".cache" / "kvjax")
    p.add_argument("--work-dir", default=str(home / "bench"), help="where the random 7B weights are kept")
    p.add_argument("--budget-s", type=float, default=470.0, help="wall-clock budget of the whole run")
    p.add_argument("--hbm-gbps", type=float, help="HBM bandwidth (default: from the device kind)")
    p.add_argument("--stages", default="kernel_tests,bench_kernels,weights,bench_decode,bench_throughput,"
                                       "tensor_parallel")
    return p.parse_args(argv)


def detect_gpu() -> dict | None:
    """jax's first device, asked in a subprocess (this process must not take GPU memory)."""
    code = ("import jax, json; d = jax.devices()[0]; "
            "print(json.dumps(dict(platform=d.platform, kind=d.device_kind, count=jax.device_count(), "
            "jax=jax.__version__)))")
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        info = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None
    return info if info["platform"] == "gpu" else None


def tp_size(num_gpus: int) -> int:
    """The tensor-parallel size to measure: the largest power of two <= min(num_gpus, 8)."""
    size = 1
    while size * 2 <= min(num_gpus, 8):
        size *= 2
    return size


def stages(args, out: Path, model_dir: Path, hbm_gbps: float, num_gpus: int = 1):
    """(name, argv, timeout cap in s, extra environment) of every stage."""
    py = sys.executable
    model = ["--model-dir", str(model_dir), "--dtype", DTYPE, "--quiet"]
    write = ("import sys; from kvjax.testing import text; "
             f"text.write_checkpoint(sys.argv[1], like={LIKE!r}, dtype={DTYPE!r})")
    # tests/conftest.py defaults JAX_PLATFORMS to cpu; the tests must see the GPU.
    path = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
    compiled = {"KVJAX_KERNELS": "pallas", "JAX_PLATFORMS": "cuda", "PYTHONPATH": path}
    return [
        ("kernel_tests", [py, "-m", "pytest", "-q", "-p", "gpu_check", "tests/pallas_kernels"], 150, compiled),
        ("bench_kernels", [py, "scripts/bench_kernels.py", "--repeats", "5", "--hbm-gbps", str(hbm_gbps),
                           "--quiet", "--out", str(out / "bench_kernels.json")], 120, {}),
        ("weights", [py, "-c", write, str(model_dir)], 240, {}),
        ("bench_decode", [py, "scripts/bench_decode.py", *model, "--batch-sizes", "1", "--backends", "kvjax",
                          "--hbm-gbps", str(hbm_gbps), "--json", str(out / "bench_decode.json")], 150, {}),
        ("bench_throughput", [py, "scripts/bench_throughput.py", *model, "--batch-sizes", "1,32,128",
                              "--variants", "baseline,ccm,ccm+int8", "--decode-steps", "32", "--budget-seqs", "0",
                              "--json", str(out / "bench_throughput.json")], 240, {}),
        ("tensor_parallel", [py, "-c", TP_STAGE, str(tp_size(num_gpus)), str(model_dir), str(out)], 200, {}),
    ]


# bench_decode and bench_throughput at --tensor-parallel N, one after the other (one stage, one budget).
TP_STAGE = """
import subprocess, sys
tp, model_dir, out = sys.argv[1:]
model = ["--model-dir", model_dir, "--dtype", "bfloat16", "--quiet", "--tensor-parallel", tp]
subprocess.run([sys.executable, "scripts/bench_decode.py", *model, "--batch-sizes", "1", "--backends", "kvjax",
                "--json", f"{out}/tp_bench_decode.json"], check=True)
subprocess.run([sys.executable, "scripts/bench_throughput.py", *model, "--batch-sizes", "32", "--variants",
                "baseline,ccm", "--decode-steps", "32", "--budget-seqs", "0", "--json",
                f"{out}/tp_bench_throughput.json"], check=True)
"""


def run_stage(name, argv, timeout_s, env, log: Path) -> dict:
    """Run one stage with its output in `log`; kill its whole process group at the timeout."""
    start = time.perf_counter()
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", **env)
    with log.open("w") as f:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc, timed_out = proc.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    tail = log.read_text(errors="replace").splitlines()[-25:]
    status = "timeout" if timed_out else "ok" if rc == 0 else "failed"
    return dict(name=name, status=status, returncode=rc, seconds=round(time.perf_counter() - start, 1),
                timeout_s=round(timeout_s), command=" ".join(argv), log=str(log), tail=tail)


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def roofline(report: dict, hbm_gbps: float) -> dict | None:
    """bench_decode's bs-1 step against HBM: weights read once per step, plus K and V of every
    layer over the mean cache length of the timed steps."""
    row = next((r for r in report.get("results", []) if r["backend"] == "kvjax" and r["batch"] == 1), None)
    if row is None:
        return None
    s, m = report["settings"], report["model"]
    mean_len = s["context_len"] + s["warmup_steps"] + s["decode_steps"] / 2
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[s["dtype"]]
    kv_bytes = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * itemsize * mean_len
    step_s = row["ms_per_step"] / 1e3
    out = {"ms_per_step": row["ms_per_step"], "hbm_gbps": hbm_gbps, "weights_read_bytes": row["weights_read_bytes"],
           "kv_read_bytes": kv_bytes}
    for key, read in (("weights", row["weights_read_bytes"]), ("weights_and_kv", row["weights_read_bytes"] + kv_bytes)):
        out[f"{key}_gb_per_s"] = read / step_s / 1e9
        out[f"{key}_fraction_of_hbm"] = read / step_s / (hbm_gbps * 1e9)
    return out


def summary(results: dict) -> list[str]:
    lines = [f"{r['name']:17s} {r['status']:8s} {r['seconds']:6.1f} s" for r in results["stages"]]
    if (kern := results.get("bench_kernels")) is not None:
        for row in kern["results"]:
            if row["op"] == "decode_attention" and row["impl"] in ("reference", "pallas", "pallas_int8"):
                lines.append(f"  decode_attention {row['impl']:11s} bs {row['batch']:>3}: "
                             + ", ".join(f"kv_len {n} {ms:.3f} ms" for n, ms in row["ms"].items()))
            elif row["op"] != "decode_attention":
                lines.append(f"  {row['op']} {row['impl']}: {row['ms']:.3f} ms")
    if roof := results.get("roofline"):
        with_kv = roof["weights_and_kv_fraction_of_hbm"]
        lines.append(f"  decode bs 1: {roof['ms_per_step']:.2f} ms/step; weights {roof['weights_gb_per_s']:.0f} GB/s "
                     f"({100 * roof['weights_fraction_of_hbm']:.0f}% of {roof['hbm_gbps']:.0f}), with KV "
                     f"{roof['weights_and_kv_gb_per_s']:.0f} GB/s ({100 * with_kv:.0f}%)")
    if (thr := results.get("bench_throughput")) is not None:
        for r in thr["results"]:
            lines.append(f"  throughput bs {r['batch']:>3}: " + ", ".join(
                f"{n} {v['tokens_per_s']:.0f} tok/s (x{r['speedup'][n]:.2f}, kv_len {v['kv_len']})"
                for n, v in r["variants"].items()))
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    started = time.perf_counter()
    gpu = detect_gpu()
    if gpu is None:
        print("error: no GPU: jax sees no CUDA device here (JAX_PLATFORMS, the CUDA plugin, a driver?). "
              "gpu_check measures a real GPU and has nothing to report on a CPU; run it on the H100/H200 "
              "machine, or run scripts/gpu_compile_check.py for the compile-only check.", file=sys.stderr)
        return 2
    hbm_gbps = args.hbm_gbps or next((bw for name, bw in HBM_GBPS if name in gpu["kind"]), None)
    if hbm_gbps is None:
        print(f"error: unknown HBM bandwidth of {gpu['kind']}; pass --hbm-gbps", file=sys.stderr)
        return 2
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir or Path(args.work_dir).expanduser() / f"{LIKE}-{DTYPE}").resolve()
    wanted = set(args.stages.split(","))
    if args.model_dir or (model_dir / "config.json").exists():
        wanted.discard("weights")
    print(f"gpu_check on {gpu['count']} x {gpu['kind']} (jax {gpu['jax']}, HBM {hbm_gbps:.0f} GB/s); "
          f"output in {out}", flush=True)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "device": gpu, "hbm_gbps": hbm_gbps, "model_dir": str(model_dir),
               "command": " ".join([Path(sys.executable).name, sys.argv[0], *argv]),
               "tensor_parallel": tp_size(gpu["count"]), "stages": []}
    for name, stage_argv, cap_s, env in stages(args, out, model_dir, hbm_gbps, gpu["count"]):
        if name not in wanted:
            continue
        if name == "tensor_parallel" and gpu["count"] < 2:
            results["stages"].append(dict(name=name, status="skipped", seconds=0.0, reason="one GPU"))
            continue
        left = args.budget_s - (time.perf_counter() - started)
        if left < MIN_STAGE_S:
            results["stages"].append(dict(name=name, status="skipped", seconds=0.0, reason="no time left"))
            continue
        print(f"{name}: running (timeout {min(cap_s, left):.0f} s)", flush=True)
        results["stages"].append(run_stage(name, stage_argv, min(cap_s, left), env, out / f"{name}.log"))
        if name == "weights" and results["stages"][-1]["status"] != "ok":  # 13.5 GB half written
            for partial in model_dir.parent.glob(f".{model_dir.name}.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)
        print(f"{name}: {results['stages'][-1]['status']} in {results['stages'][-1]['seconds']} s", flush=True)
    for name in ("bench_kernels", "bench_decode", "bench_throughput"):
        if any(s["name"] == name and s["status"] == "ok" for s in results["stages"]):
            results[name] = load_json(out / f"{name}.json")
    if any(s["name"] == "tensor_parallel" and s["status"] == "ok" for s in results["stages"]):
        results["tp_bench_decode"] = load_json(out / "tp_bench_decode.json")
        results["tp_bench_throughput"] = load_json(out / "tp_bench_throughput.json")
    if results.get("bench_decode"):
        results["roofline"] = roofline(results["bench_decode"], hbm_gbps)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(summary(results)))
    print(f"done in {results['seconds']:.0f} s: {out / 'gpu_check.json'}")
    return 0 if all(s["status"] == "ok" for s in results["stages"]) else 1


# --- pytest plugin (`pytest -p gpu_check`, scripts/ on PYTHONPATH): the compiled kernels in the tests.
def _compiled(fn):
    @functools.wraps(fn)
    def call(*args, interpret: bool = False, **kwargs):
        del interpret  # the tests ask for the interpreter, which is what runs on CPU
        return fn(*args, interpret=False, **kwargs)
    return call


def pytest_configure(config) -> None:
    """Before the test modules import them, make every `*_pallas` kernel entry point compile."""
    import importlib

    for op in ("decode_attention", "paged_attention", "compact_kv", "ccm_compress"):
        module = importlib.import_module(f"pallas_kernels.{op}")
        setattr(module, f"{op}_pallas", _compiled(getattr(module, f"{op}_pallas")))


if __name__ == "__main__":
    sys.exit(main())
