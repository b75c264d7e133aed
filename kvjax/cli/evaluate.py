"""`python -m kvjax.evaluate`: quality of KV-cache compression methods on a local model.

    python -m kvjax.evaluate --methods knorm:0.25,0.5 snapkv:0.5 ccm:5 int8 --out-dir eval_out

Writes results.json (perplexity, next-token accuracy, TTFT, TPOT, KV bytes, top-1 agreement and
KL against the full cache, per method) and results.png (metric vs compression ratio per method).
Without --model-dir the built-in demo model is used. Errors print one line and exit 2.

    python -m kvjax.evaluate --suite fidelity --out-dir fidelity_out [--quick]

runs the fidelity suite (kvjax.suites.fidelity: every method at equal KV bytes, retrieval accuracy,
held-out PPL, agreement) on the shipped default model and its compressors, or on --model-dir with
--kv-compress-ckpt; it writes fidelity.json and fidelity.png.

    python -m kvjax.evaluate --suite vqa --out-dir vqa_out [--quick]

runs the VQA suite (kvjax.suites.vqa: image-token compression at equal KV bytes, answers about the
test scenes of kvjax.scenes) on the shipped default VLM and its compressors, or on a LLaVA /
MiniCPM-V --model-dir; it writes vqa.json and vqa.png.
"""

from __future__ import annotations

import json
import pathlib
import sys

from kvjax.cli.common import Parser, positive_int, run_cli
from kvjax.errors import KVJaxError

DEFAULT_TEXT = pathlib.Path(__file__).resolve().parents[2] / "assets" / "eval_text.txt"


def build_parser() -> Parser:
    p = Parser(prog="python -m kvjax.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", help="local HF model directory (default: the demo model; with --suite, the "
                                       "shipped default model)")
    p.add_argument("--suite", choices=["fidelity", "vqa"], help="run a fixed suite instead of --methods")
    p.add_argument("--quick", action="store_true",
                   help="with --suite: a few examples and two presses (knorm, snapkv) only (CI)")
    p.add_argument("--methods", nargs="+", default=["knorm:0.25,0.5", "int8"],
                   help="methods to sweep: none, int8, PRESS:R1,R2 (see kvjax.presses.list_presses()), ccm:FACTOR; "
                        "end a PRESS or ccm spec in +int8 to quantize what it kept, e.g. knorm:0.5+int8")
    p.add_argument("--text", help=f"text file for perplexity (default: {DEFAULT_TEXT}; with --suite, the shipped "
                                  "held-out books)")
    p.add_argument("--prompts", help="file with one prompt per line for agreement/KL (default: slices of --text)")
    p.add_argument("--context-len", type=positive_int, default=192, help="tokens prefilled, then compressed")
    p.add_argument("--continuation-len", type=positive_int, default=64, help="tokens scored after compression")
    p.add_argument("--num-windows", type=positive_int, default=2, help="sliding windows over the text")
    p.add_argument("--num-prompts", type=positive_int, default=2, help="prompts cut from --text without --prompts")
    p.add_argument("--gen-len", type=positive_int, default=16, help="greedy tokens compared per prompt")
    p.add_argument("--kv-compress-ckpt", help="CCM compressor checkpoint for ccm:F (default: an untrained one)")
    p.add_argument("--press-option", action="append", metavar="NAME=VALUE", help="passed to every press with that field")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--out-dir", default="eval_out", help="where results.json and results.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _read(path: str, what: str) -> str:
    try:
        return pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise KVJaxError(f"cannot read the {what} {path}: {e.strerror or e}") from None


def run(args) -> dict:
    import kvjax
    from kvjax import evaluation
    from kvjax.cli.common import parse_options
    from kvjax.testing import ensure_demo_checkpoint

    from tqdm import tqdm

    model_dir = args.model_dir or ensure_demo_checkpoint()
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype)
    if hasattr(cfg, "text"):
        raise KVJaxError(f"{model_dir} is a vision-language model; evaluate its language model directory instead")
    methods = evaluation.parse_methods(args.methods, cfg, compressor_dir=args.kv_compress_ckpt, model_dir=model_dir,
                                       press_options=parse_options(args.press_option))
    text_path = args.text or str(DEFAULT_TEXT)
    ids = tokenizer.encode(_read(text_path, "text"), add_special_tokens=False)
    if args.prompts:
        lines = [line for line in _read(args.prompts, "prompt file").splitlines() if line.strip()]
        prompts = [tokenizer.encode(line) for line in lines]
    else:  # slices of the text, as long as the perplexity context
        step = max(1, (len(ids) - args.context_len) // max(1, args.num_prompts))
        prompts = [ids[i * step:i * step + args.context_len] for i in range(args.num_prompts)]
    if not prompts or not all(prompts):
        raise KVJaxError("no prompts to compare: give --prompts with non-empty lines or a longer --text")
    results, reference = [], None
    for method in tqdm(methods, desc="methods", disable=args.quiet, file=sys.stderr):
        ppl = evaluation.perplexity(model, ids, method, context_len=args.context_len,
                                    continuation_len=args.continuation_len, num_windows=args.num_windows)
        agree, reference = evaluation.agreement(model, prompts, method, gen_len=args.gen_len, reference=reference)
        results.append({"method": method.label, "family": method.family, "compression_ratio": method.ratio,
                        "kv_quantize": "int8" if method.is_quantized or method.family == "int8" else "none",
                        **ppl, **agree})
    full_bytes = results[0]["kv_bytes"]
    for row in results:  # with int8 (or no nominal ratio) the ratio is the share of bytes saved
        row["kv_bytes_ratio"] = row["kv_bytes"] / full_bytes
        if row["kv_quantize"] == "int8" or row["compression_ratio"] is None:
            row["compression_ratio"] = 1 - row["kv_bytes_ratio"]
    report = {"model_dir": str(model_dir), "text": text_path, "context_len": args.context_len,
              "continuation_len": args.continuation_len, "num_windows": args.num_windows,
              "num_prompts": len(prompts), "gen_len": args.gen_len, "dtype": args.dtype,
              "timing_note": "ttft_s / tpot_s are medians; the first window of each method includes compilation",
              "results": results}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        evaluation.plot(results, out / "results.png")
    return report


def run_suite(args) -> dict:
    import kvjax
    from kvjax import defaults
    from kvjax.compression.checkpoint import load_compressor
    from kvjax.suites import fidelity

    is_vqa = args.suite == "vqa"
    model_dir = pathlib.Path(args.model_dir) if args.model_dir else (
        defaults.default_vlm_dir() if is_vqa else defaults.default_model_dir())
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype)
    if hasattr(cfg, "text") != is_vqa:
        raise KVJaxError(f"{model_dir} is a {'text' if is_vqa else 'vision-language'} model; the {args.suite} suite "
                         f"takes a {'LLaVA or MiniCPM-V' if is_vqa else 'text'} model")
    if args.kv_compress_ckpt:
        ckpts = [args.kv_compress_ckpt]
    else:
        ckpts = [defaults.default_compressor_dir(f, model_dir) for f in defaults.shipped_factors(model_dir)] \
            if defaults.is_default_model(model_dir) else []
        if not ckpts:
            print("kvjax: no --kv-compress-ckpt for this model: the table has no CCM rows", file=sys.stderr)
    compressors = [load_compressor(c, getattr(cfg, "text", cfg), dtype=args.dtype, model_dir=model_dir) for c in ckpts]
    if is_vqa:
        from kvjax.suites import vqa as suite
        from kvjax.vision import prompter_for

        rows = suite.run(model, tokenizer, prompter_for(model, tokenizer, cfg, model_dir), compressors,
                         suite.QUICK if args.quick else suite.VQAConfig(), progress=not args.quiet)
    else:
        suite = fidelity
        text = _read(args.text or str(defaults.HELD_OUT_TEXT), "text")
        rows = fidelity.run(model, tokenizer, text, compressors, fidelity.QUICK if args.quick else
                            fidelity.FidelityConfig(), progress=not args.quiet)
    report = {"model": str(model_dir), "compressors": [str(c) for c in ckpts], **rows}
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.suite}.json").write_text(json.dumps(report, indent=2) + "\n")
    if not args.no_plot:
        suite.plot(report, out / f"{args.suite}.png")
    for row in report["rows"]:
        scores = (f"vqa {row['vqa_acc']:.3f}" if is_vqa else f"retrieval {row['retrieval_acc']:.3f}  ppl "
                  f"{row['ppl']:8.3f}")
        print(f"{row['method']:>24}  kv {row['kv_bytes_ratio']:.3f}  {scores}  agree {row['agreement']:.3f}  "
              f"kl {row['kl']:.4f}")
    print(f"wrote {out / f'{args.suite}.json'}", file=sys.stderr)
    return report


def _run_and_print(args) -> int:
    if args.suite:
        run_suite(args)
        return 0
    report = run(args)
    for row in report["results"]:
        print(f"{row['method']:>24}  ppl {row['ppl']:9.3f}  acc {row['accuracy']:.3f}  "
              f"top1 {row['top1_agreement']:.3f}  kl {row['kl']:.4f}  kv {row['kv_bytes_ratio']:.2f}")
    print(f"wrote {pathlib.Path(args.out_dir) / 'results.json'}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: _run_and_print(args))


if __name__ == "__main__":
    sys.exit(main())
