"""Distil the CCM compressors of the shipped default models with `python -m kvjax.train` (KL against
the uncompressed model). Text model: on data that exercises retrieval, key-value recall
conversations built on the training split's prose (the model's own training data, never the
held-out books), plus plain prose continuations. VLM (--vlm): a decoupled compressor (image and
text MLPs) on training-split scenes of kvjax.scenes, one question each. Resumable: a killed run
continues from its last checkpoint when run again.

    python scripts/train_default_compressor.py --work-dir ~/.cache/kvjax/default-lm \
        --compression-factor 5 --ship-to kvjax/assets/default-llama-ccm/cf5
    python scripts/train_default_compressor.py --vlm --work-dir ~/.cache/kvjax/default-vlm \
        --compression-factor 5 --ship-to kvjax/assets/default-llava-ccm/cf5

Writes WORK/ccm-data.jsonl or WORK/ccm-scenes/ (once; seeded), trains in WORK/ccm-cf<F>, and
copies the compressor to --ship-to when the run finishes.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

try:
    import kvjax  # noqa: F401
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from kvjax import retrieval
from kvjax import scenes
from kvjax.defaults import DEFAULT_MODEL, DEFAULT_VLM
from kvjax.errors import KVJaxError


def write_data(path: pathlib.Path, train_text: str, num_recall: int, num_prose: int, seed: int) -> None:
    """Recall conversations of 100-700 words with 2-8 records, and prose passages of ~400 words."""
    rng = np.random.default_rng(seed)
    sentences = retrieval.sentences(train_text)
    with path.open("w") as f:
        for i in range(num_recall):
            task = retrieval.key_value_recall(sentences, seed * 1_000_003 + i, num_records=int(rng.integers(2, 9)),
                                              num_words=int(rng.integers(100, 700)))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"{task.context}\n{task.question}"},
                                             {"role": "assistant", "content": task.reply}]}) + "\n")
        for _ in range(num_prose):
            start = int(rng.integers(len(sentences)))
            f.write(json.dumps({"text": " ".join(sentences[start:start + 24])}) + "\n")


def write_scene_data(folder: pathlib.Path, num_scenes: int, seed: int, image_size: int) -> pathlib.Path:
    """LLaVA-style JSON of training-split scenes (PNG files beside it), one random question each."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_scenes):
        index = int(rng.integers(10_000_000))
        scene, questions = scenes.task("train", index)
        q = questions[int(rng.integers(len(questions)))]
        scene.render(image_size).save(folder / f"{i:05d}.png")
        records.append({"image": f"{i:05d}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{q.text}"}, {"from": "gpt", "value": q.answer}]})
    path = folder / "images.json"
    path.write_text(json.dumps(records) + "\n")  # last: its presence means the images are there
    return path


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", default="~/.cache/kvjax/default-lm", help="holds corpus/train.txt (from "
                   "scripts/train_default_model.py); the data and runs go here")
    p.add_argument("--vlm", action="store_true", help="the default VLM's decoupled compressor, on scenes")
    p.add_argument("--model-dir", help=f"default: {DEFAULT_MODEL}, or {DEFAULT_VLM} with --vlm")
    p.add_argument("--num-scenes", type=int, default=1600, help="--vlm: training scenes (one question each)")
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--num-recall", type=int, default=640)
    p.add_argument("--num-prose", type=int, default=160)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--keep-last", type=int, default=0, help="each prompt's last N tokens (the question) stay "
                   "uncompressed, in training and (recorded in the compressor) at inference")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ship-to", help="copy the finished compressor here")
    p.add_argument("--stop-after", type=int, help="stop after N steps of this run (time slices)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from kvjax.cli import train as train_cli
    from training import checkpoints

    args = parse_args(argv)
    work = pathlib.Path(args.work_dir).expanduser()
    model_dir = args.model_dir or str(DEFAULT_VLM if args.vlm else DEFAULT_MODEL)
    try:
        if args.vlm:
            data = work / "ccm-scenes" / "images.json"
            if not data.is_file():
                size = json.loads((pathlib.Path(model_dir) / "config.json").read_text())["vision_config"]["image_size"]
                write_scene_data(data.parent, args.num_scenes, args.seed, size)
            extra = ["--image-root", str(data.parent), "--compressor", "decouple"]
        else:
            train_text = work / "corpus" / "train.txt"
            if not train_text.is_file():
                raise KVJaxError(f"{train_text} is missing: run scripts/train_default_model.py --work-dir {work} "
                                 "first")
            data = work / "ccm-data.jsonl"
            if not data.is_file():
                write_data(data, train_text.read_text(), args.num_recall, args.num_prose, args.seed)
            extra = []
    except (KVJaxError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = work / f"ccm-cf{args.compression_factor}"
    flags = ["--model-dir", model_dir, "--data", str(data), "--out", str(out), "--compression-factor",
             str(args.compression_factor), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--lr", str(args.lr), "--seed", str(args.seed), "--keep-last", str(args.keep_last),
             "--max-context-len", "1024", "--max-answer-len", "16", "--save-every", "25", "--val-ratio", "0.1", *extra]
    if out.is_dir() and any(out.iterdir()):  # continue a run; one killed before its first checkpoint restarts
        flags.append("--resume" if checkpoints.latest_step(out) is not None else "--overwrite")
    if args.stop_after:
        flags += ["--stop-after", str(args.stop_after)]
    code = train_cli.main(flags)
    if code == 0 and args.ship_to and args.stop_after is None:
        ship = pathlib.Path(args.ship_to)
        shutil.rmtree(ship, ignore_errors=True)
        shutil.copytree(out / "compressor", ship)
        print(f"shipped {ship}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
