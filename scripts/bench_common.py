"""What every benchmark script shares: the model source flags, the recorded environment, the
report header, and the JSON/PNG outputs. Importing it also makes a source checkout importable
(kvjax, pallas_kernels, inference) when the project is not installed."""

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

try:
    import kvjax  # installed, e.g. `pip install -e .`
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvjax

import jax

from kvjax.testing import text as demo

DTYPES = ("float32", "bfloat16", "float16")


def add_model_source(p, what="a Hugging Face Llama/Qwen2/Qwen3 directory", presets=demo.LIKE_PRESETS) -> None:
    """--model-dir or --like PRESET (random weights written once into --work-dir): every benchmark's."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help=what)
    src.add_argument("--like", help=f"random weights shaped like: {', '.join(presets)}")
    home = Path(os.environ.get("KVJAX_HOME") or Path.home() / ".cache" / "kvjax")
    p.add_argument("--work-dir", default=str(home / "bench"), help="where --like weights are kept")


def model_dir_for(args) -> Path:
    """--model-dir as given, or random --like weights written once into --work-dir."""
    if args.model_dir:
        return Path(args.model_dir).expanduser()
    if args.like not in demo.LIKE_PRESETS:
        raise kvjax.KVJaxError(f"--like: unknown {args.like}; choose from {', '.join(demo.LIKE_PRESETS)}")
    path = Path(args.work_dir).expanduser() / f"{args.like}-{args.dtype}"
    if not (path / "config.json").exists():
        print(f"writing random {args.like} weights to {path} (once)", file=sys.stderr)
        demo.write_checkpoint(path, like=args.like, dtype=args.dtype)
    return path


def cpu_model() -> str | None:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else (platform.processor() or None)


def environment(argv) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    device = jax.devices()[0]
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([sys.executable, sys.argv[0], *argv]),
            "jax_platform": device.platform, "jax_device_kind": device.device_kind,
            "num_jax_devices": jax.device_count(), "cpu_model": cpu_model(),
            "num_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(),
            "versions": {p: version(p) for p in ("jax", "jaxlib", "flax", "torch", "transformers", "kvjax")}}


def report_head(args, argv, cfg, model_dir) -> dict:
    """The keys every engine benchmark report starts with: settings, model shape, environment."""
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "quiet")}
    model = {"family": cfg.family, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
             "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size}
    return {"settings": dict(settings, model_dir=str(model_dir)), "model": model, "environment": environment(argv)}


def bench_main(parse_args, run, summarize, plot=None):
    """A benchmark's main(argv): parse the flags, run(args, argv) -> report (a bad flag value,
    KVJaxError or ValueError, prints one `error:` line and exits 2), print summarize(report), then
    write --json and, where the script has a plot, --png."""
    def main(argv=None) -> int:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parse_args(argv)
        try:
            report = run(args, argv)
        except (kvjax.KVJaxError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        summarize(report)
        write_outputs(report, args, plot)
        return 0

    return main


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None (with a note) when it is missing."""
    try:
        import matplotlib
    except ImportError:
        print("--png: matplotlib is not installed; skipped", file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path)


def write_outputs(report, args, plot=None) -> None:
    """--json: the report; --png: plot(report, path), where the script has a plot."""
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if plot is not None and args.png:
        plot(report, args.png)
