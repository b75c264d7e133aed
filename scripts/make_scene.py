"""Draw one scene of kvjax.scenes (what the default VLM was trained and is tested on) to a PNG and
print its questions with their answers, to ask the default VLM about it:

    python scripts/make_scene.py --split test --index 0 --out scene.png
    python -m kvjax.chat --image scene.png --question "How many circles are there?"
"""

import argparse
import pathlib
import sys

try:
    import kvjax  # noqa: F401  (installed)
except ImportError:  # a source checkout
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from kvjax import scenes
from kvjax.errors import KVJaxError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", default="test", choices=sorted(scenes.SPLIT_SEEDS))
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--size", type=int, default=112, help="pixels per side (the default VLM's input size)")
    p.add_argument("--out", default="scene.png")
    args = p.parse_args(argv)
    try:
        scene, questions = scenes.task(args.split, args.index)
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scene.render(args.size).save(args.out)
    print(f"wrote {args.out}: {scenes.listing(scene)}")
    for q in questions:
        print(f"  {q.text}  ->  {q.answer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
