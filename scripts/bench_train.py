"""Distillation training throughput (examples/s, tokens/s) on the built-in demo model and dataset.

    python scripts/bench_train.py --json docs/bench_train_cpu.json

Runs `training.trainer.train` for --epochs in a temporary --out; the first step (compilation)
is left out of the rates. Tokens = context + continuation tokens of the real (unpadded) rows.
Extra `key=value` settings after `--` go to TrainConfig (e.g. `-- batch_size=8 dtype=bfloat16`).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import environment  # noqa: E402  (it also makes a source checkout importable)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--json", help="write the result here")
    p.add_argument("settings", nargs="*", help="extra TrainConfig key=value pairs")
    args = p.parse_args(argv)
    from training.config import TrainConfig
    from training.trainer import train

    extra = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
             for k, v in (s.split("=", 1) for s in args.settings)}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig.from_mapping({"out": out, "overwrite": True, "quiet": True, "epochs": args.epochs,
                                        "batch_size": args.batch_size, **extra})
        summary = train(cfg)
    result = {"environment": environment(argv), "config": {**extra, "epochs": args.epochs,
                                                            "batch_size": args.batch_size},
              **{k: summary[k] for k in ("steps", "examples_per_s", "tokens_per_s", "num_timed_steps", "num_compiled_shapes")},
              "val_kl": [summary["initial_val"]["kl"], summary["final_val"]["kl"]]}
    print(json.dumps({k: result[k] for k in result if k != "environment"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
