"""`python -m kvjax.train`: distil a CCM compressor (student reads the compressed cache, teacher the
full one; KL loss by default). With no model/data flags it trains on the built-in demo model and
demo dataset. Flags come from `training.config.TrainConfig`; `--config FILE` (.json, .yaml) holds
the same keys, and flags given here win. User errors print one `error: ...` line and exit 2.

    python -m kvjax.train --model-dir DIR --data data.jsonl --out runs/ccm --compression-factor 5
    python -m kvjax.train --model-dir LLAVA_DIR --data llava.json --image-root IMAGES --out runs/vlm
    python -m kvjax.train --demo llava --out runs/demo   # tiny LLaVA on PIL-drawn shapes, offline
    python -m kvjax.chat --model-dir DIR --kv-compress-ckpt runs/ccm/compressor
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kvjax.cli.common import Parser, run_cli


def build_parser(config_cls) -> argparse.ArgumentParser:
    """One flag per TrainConfig field; unset flags stay absent so --config values can fill them."""
    p = Parser(prog="python -m kvjax.train", description=__doc__.split("\n\n")[0],
                argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="JSON or YAML file of the same keys (flags given here win)")
    for f in dataclasses.fields(config_cls):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=meta["help"])
        else:
            kind = meta["type"] or type(f.default)
            p.add_argument(flag, type=kind, choices=meta["choices"], metavar=None if meta["choices"] else f.name.upper(),
                           help=f"{meta['help']} (default: {f.default})")
    return p


def run(argv) -> int:
    from training.config import TrainConfig, read_config_file  # noqa: PLC0415 (training only inside main)
    from training.trainer import train  # noqa: PLC0415

    args = vars(build_parser(TrainConfig).parse_args(argv))
    values = read_config_file(args.pop("config")) if "config" in args else {}
    cfg = TrainConfig.from_mapping({**values, **args}, source="--config" if values else "flags")
    summary = train(cfg)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']}; continue with --resume --out {cfg.out}", file=sys.stderr)
        return 0
    first, last = summary["initial_val"], summary["final_val"]
    if not cfg.quiet:
        print(f"validation KL {first['kl']:.4g} -> {last['kl']:.4g}, top-1 agreement "
              f"{first['agreement']:.3f} -> {last['agreement']:.3f}" if first else
              f"validation KL {last['kl']:.4g}, top-1 agreement {last['agreement']:.3f}", file=sys.stderr)
    print(os.path.join(os.path.abspath(cfg.out), "compressor"))
    return 0


def main(argv=None) -> int:
    return run_cli(lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
