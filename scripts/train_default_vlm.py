"""Train kvjax's default VLM: LLaVA-1.5 architecture (a small CLIP ViT from scratch, the MLP
projector, the shipped text model as its LM) on the synthetic scene questions of kvjax.scenes,
then export it in HF LLaVA layout (bf16 safetensors, tokenizer with <image>, image processor).

    python scripts/train_default_vlm.py --work-dir ~/.cache/kvjax/default-vlm --out kvjax/assets/default-llava

Checkpoints every --save-every steps in WORK/checkpoints: run it again after any interruption and
it resumes, bitwise, from the latest. Progress bar unless --quiet; metrics (with validation VQA
accuracy every --eval-every steps) in WORK/metrics.jsonl. Errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

try:
    import kvjax  # noqa: F401  (installed)
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax.errors import KVJaxError
from training import loop, vlm


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="~/.cache/kvjax/default-vlm", help="model template, checkpoints, metrics")
    p.add_argument("--out", help="export the trained model here (HF LLaVA directory)")
    loop.add_run_flags(p, vlm.VLMConfig, save_every=100, eval_every=200)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        work = pathlib.Path(args.work_dir).expanduser()
        cfg = loop.config_from_flags(args, vlm.VLMConfig, work)
        extra = {}
        if args.export_latest:
            model, step = vlm.latest_model(work, cfg)
            extra = {"steps_done": step}
        else:
            model = vlm.train(work, cfg, save_every=args.save_every, eval_every=args.eval_every,
                              stop_after=args.stop_after, quiet=args.quiet)
        if args.out and model is not None:
            out = vlm.export(model, work / "model", args.out, {"config": dataclasses.asdict(cfg), **extra})
            print(f"wrote {out}", file=sys.stderr)
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
