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
import json
import pathlib
import sys

try:
    import kvjax  # noqa: F401  (installed)
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax.errors import KVJaxError
from training import vlm


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="~/.cache/kvjax/default-vlm", help="model template, checkpoints, metrics")
    p.add_argument("--out", help="export the trained model here (HF LLaVA directory)")
    for field in dataclasses.fields(vlm.VLMConfig):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--stop-after", type=int, help="stop after this many steps of this run (tests, time slices)")
    p.add_argument("--export-latest", action="store_true",
                   help="export WORK's latest checkpoint to --out now (a run stopped before --steps); no training")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = vlm.VLMConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(vlm.VLMConfig)})
        work = pathlib.Path(args.work_dir).expanduser()
        extra = {}
        if args.export_latest:
            if not args.out:
                raise KVJaxError("--export-latest writes to --out DIR: pass it")
            if (work / "run.json").is_file():  # the run's own settings, whatever the flags say
                cfg = vlm.VLMConfig(**json.loads((work / "run.json").read_text()))
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
