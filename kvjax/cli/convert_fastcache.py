"""`python -m kvjax.convert_fastcache`: FastCache compressor .pth -> kvjax compressor checkpoint.
See `kvjax.compression.fastcache` for what is read and how."""

from __future__ import annotations

import sys

from kvjax.cli.common import Parser, run_cli


def main(argv=None) -> int:
    p = Parser(prog="python -m kvjax.convert_fastcache", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="FastCache compressor .pth")
    p.add_argument("--model-dir", required=True, help="HF directory of the model the compressor was trained for")
    p.add_argument("--output", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--kind", default="auto", choices=["auto", "decoupled", "hybrid"])
    p.add_argument("--positions", choices=["original", "compressed"], help="RoPE convention after compression "
                   "(default: FastCache's for the kind: compressed for decoupled, original for hybrid)")
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the file's dtype")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    def body() -> int:
        from kvjax.compression.fastcache import convert_fastcache

        out = convert_fastcache(args.input, args.model_dir, args.output, kind=args.kind,
                                rope_positions=args.positions, min_seq_len=args.min_seq_len, dtype=args.dtype,
                                overwrite=args.overwrite)
        print(f"wrote {out}", file=sys.stderr)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
