"""Write a random-weight Hugging Face checkpoint (Llama / Qwen2 / Qwen3) for tests and demos.

    python scripts/make_demo_checkpoint.py --out /tmp/tiny-qwen3 --arch qwen3
    python scripts/make_demo_checkpoint.py --out /tmp/llava-lm --like llama-2-7b --dtype bfloat16
    python scripts/make_demo_checkpoint.py --out /tmp/tiny-llava --arch llava      (VLMs: llava,
        minicpmv tiny; --like llava-1.5-7b, minicpm-v-2.6 real shapes; size flags do not apply)
"""

import argparse
import sys

try:
    import kvjax  # noqa: F401  (installed, e.g. `pip install -e .`)
except ImportError:  # run from a checkout without installing
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvjax.testing import text as demo, vlm as demo_vlm
from kvjax.errors import KVJaxError

# flag -> config.json field; only flags given on the command line override the preset
_FIELDS = {
    "hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory to write (must be empty or absent)")
    p.add_argument("--arch", default="llama", help="llama, qwen2, qwen3, llava or minicpmv (tiny preset)")
    p.add_argument("--like", help=f"real model shape: {', '.join([*demo.LIKE_PRESETS, *demo_vlm.LIKE])}")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    for flag in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "head_dim", "vocab_size"):
        p.add_argument("--" + flag.replace("_", "-"), type=int)
    p.add_argument("--tie-word-embeddings", action="store_true", default=None)
    args = p.parse_args(argv)
    overrides = {_FIELDS[k]: v for k, v in vars(args).items() if k in _FIELDS and v is not None}
    vlm = args.like if args.like in demo_vlm.VLM_PRESETS else args.arch
    try:
        if vlm in demo_vlm.VLM_PRESETS:
            if overrides:
                raise KVJaxError(f"size flags do not apply to the VLM preset {vlm!r}")
            out = demo_vlm.write_vlm_checkpoint(args.out, vlm, dtype=args.dtype, seed=args.seed,
                                                overwrite=args.overwrite)
        else:
            out = demo.write_checkpoint(args.out, args.arch, like=args.like, dtype=args.dtype,
                                        seed=args.seed, overwrite=args.overwrite, **overrides)
    except KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
