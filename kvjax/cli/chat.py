"""`python -m kvjax.chat`: chat with a local Hugging Face model (default: the shipped default model).

Answers stream to stdout; banners, timings and errors go to stderr. Errors a user can cause
print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys

from kvjax.cli.common import (Parser, add_parallel_flags, ccm_from_flags, model_dir_from_flags, non_negative_int,
                              parse_options, positive_int, run_cli, setup_parallel)
from kvjax.errors import KVJaxError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kvjax.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="Hugging Face model directory (default: the shipped default model, a "
                                       "small Llama trained here on the King James Bible and recall tasks)")
    p.add_argument("--question", help="ask one question and exit (default: interactive when stdin is a "
                                      "terminal, else read the question from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--image", help="image file for a LLaVA or MiniCPM-V model (placed in the first user turn)")
    p.add_argument("--demo", choices=["llama", "llava", "minicpmv"],
                   help="use a built-in tiny random-weight model of this family (written offline on first use)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-tokens", type=positive_int, default=2048,
                   help="KV cache capacity in tokens (prompt + answer)")
    p.add_argument("--time", action="store_true", help="print prefill time / TTFT and decode tokens/s")
    p.add_argument("--quiet", action="store_true", help="print only the answer")
    g = p.add_argument_group("KV-cache compression (FastCache CCM)")
    g.add_argument("--kv-compress", action="store_true", help="compress the prompt's KV cache after prefill")
    g.add_argument("--kv-compress-ckpt", help="compressor checkpoint directory (implies --kv-compress; convert "
                                              "FastCache .pth files with python -m kvjax.convert_fastcache); "
                                              "default: the shipped one for the default model, else an "
                                              "UNTRAINED random compressor")
    g.add_argument("--kv-compress-factor", type=positive_int,
                   help="tokens merged into one (default 5, or the checkpoint's)")
    g.add_argument("--kv-compress-min-seq-len", type=non_negative_int,
                   help="spans with fewer groups stay uncompressed (default 2, or the checkpoint's)")
    g.add_argument("--kv-compress-keep-last", type=non_negative_int, metavar="N",
                   help="the prompt's last N tokens (the question, the template's tail) stay uncompressed "
                        "(default 0, or what the checkpoint was distilled with)")
    g.add_argument("--kv-compress-image-len", type=non_negative_int, default=0,
                   help="image prefix of the cache; 0 = infer from the prompt (0 for text-only prompts)")
    g.add_argument("--kv-compress-positions", choices=["original", "compressed"],
                   help="RoPE positions after compression (default: the compressor's own convention)")
    g = p.add_argument_group("KV-cache presses (kvpress-style scoring; python -c 'import kvjax; "
                             "print(kvjax.presses.list_presses())')")
    g.add_argument("--press", help="press the prompt's KV cache after prefill with this method, e.g. knorm, snapkv")
    g.add_argument("--compression-ratio", type=float, help="fraction of prompt tokens a --press drops (default 0.5)")
    g.add_argument("--press-option", action="append", metavar="NAME=VALUE",
                   help="press hyper-parameter (kvpress names), repeatable: --press-option window_size=16")
    g.add_argument("--press-protect", choices=["none", "image", "question", "both"], default="none",
                   help="tokens kept outside the press budget: the image, the latest user message "
                        "(its text and the template's tail), or both (default none)")
    g = p.add_argument_group("KV-cache quantization")
    g.add_argument("--kv-quantize", choices=["none", "int8"], default="none",
                   help="store the prompt's K/V as int8 after prefill (after any --press / --kv-compress)")
    add_parallel_flags(p)
    return p


def method_from_flags(args, cfg, dtype, model_dir=None):
    """The compression method the flags ask for: a press or a CCM compressor, then int8; or None."""
    from kvjax.compression import Int8KV
    from kvjax.compression.presses import press_with_ratio, takes_ratio

    if args.press is not None and (args.kv_compress or args.kv_compress_ckpt):
        raise KVJaxError("pass either --press or --kv-compress, not both")
    if args.press is None and args.compression_ratio is not None:
        raise KVJaxError("--compression-ratio sets a press's budget: add --press NAME (e.g. --press knorm) or drop it")
    steps = []
    if args.press is not None:
        # Seed 004's methods take their own budget options instead of a ratio (chat ignores one for them).
        ratio = args.compression_ratio if takes_ratio(args.press) else None
        steps.append(press_with_ratio(args.press, ratio, parse_options(args.press_option)))
    elif args.kv_compress or args.kv_compress_ckpt:
        if args.kv_compress_ckpt is None and not args.quiet:
            print("kvjax: no --kv-compress-ckpt given: compressing with an UNTRAINED random compressor "
                  "(shows the mechanics; answers degrade)", file=sys.stderr)
        import jax.numpy as jnp

        steps.append(ccm_from_flags(cfg, args.kv_compress_ckpt, args.kv_compress_factor,
                                    args.kv_compress_min_seq_len, jnp.dtype(dtype).name, model_dir=model_dir,
                                    keep_last=args.kv_compress_keep_last))
    if args.kv_quantize == "int8":  # last: presses and CCM read a dense cache
        steps.append(Int8KV())
    return tuple(steps) or None


def _load(args):
    import kvjax

    model_dir = model_dir_from_flags(args.model_dir, args.demo, args.image)
    if args.demo:
        print(f"kvjax: using the built-in demo model in {model_dir}. It has RANDOM weights: its answers are "
              "gibberish.", file=sys.stderr)
    elif args.model_dir is None:
        if not args.quiet:
            what = ("the shipped default VLM (a tiny LLaVA trained on drawn shapes: colours, kinds, counts, places; "
                    "see README)" if args.image is not None else "the shipped default model (a 6-layer Llama "
                    "trained on the King James Bible and key-value recall; see README)")
            print(f"kvjax: no --model-dir given, using {what}", file=sys.stderr)
    if not args.quiet:
        print(f"kvjax: loading {model_dir} ...", file=sys.stderr)
    return (*kvjax.load(model_dir, dtype=args.dtype, progress=not args.quiet,
                        tensor_parallel=setup_parallel(args)), model_dir)


def build_session(args):
    """Flags -> a loaded model and its ChatSession."""
    from kvjax import defaults
    from kvjax.sampling import Sampling
    from kvjax.session import ChatSession

    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # bad flags fail early
    if args.image is not None:  # a bad image fails before a long model load
        from kvjax.vision.images import open_image

        open_image(args.image)
    model, tokenizer, cfg, model_dir = _load(args)
    text_cfg = getattr(cfg, "text", cfg)
    if args.kv_compress and args.kv_compress_ckpt is None and defaults.is_default_model(model_dir):
        args.kv_compress_ckpt = str(defaults.default_compressor_dir(args.kv_compress_factor, model_dir))
    return ChatSession.create(
        model, tokenizer, cfg, model_dir=model_dir, image=args.image, system=args.system, sampling=sampling,
        seed=args.seed, method=method_from_flags(args, text_cfg, model.dtype, model_dir), max_tokens=args.max_tokens,
        max_new_tokens=args.max_new_tokens, protect=args.press_protect, image_len=args.kv_compress_image_len,
        rope_positions=args.kv_compress_positions)


def read_question(args) -> str | None:
    """--question, or stdin when it is not a terminal (None: interactive). Text must be UTF-8."""
    if args.question is not None:
        question = args.question
    elif sys.stdin.isatty():
        return None
    else:
        try:
            question = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            raise KVJaxError(f"the question on stdin is not UTF-8 text ({e.reason} at byte {e.start}); "
                             "pipe UTF-8 text or pass --question") from None
    return check_text(question.strip())


def check_text(question: str) -> str:
    if not question:
        raise KVJaxError("no question: pass a non-empty --question TEXT or pipe the question on stdin")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise KVJaxError("the question is not valid UTF-8 text; pass it in a UTF-8 terminal or pipe it on stdin") \
            from None
    return question


def ask(session, question: str, args) -> None:
    if args.time:
        session.warm_up(question)  # report steady-state figures, not compilation
    session.ask(question, write=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()))
    sys.stdout.write("\n")
    for note in session.last.notes:
        print(f"kvjax: {note}", file=sys.stderr)
    if args.time:
        report(session.last, args.kv_quantize == "int8")


def report(stats, is_int8: bool) -> None:
    rate = (stats.num_generated - 1) / stats.decode_s if stats.num_generated > 1 and stats.decode_s > 0 \
        else float("nan")
    print(f"[time] prompt {stats.num_prompt} tokens: prefill {stats.prefill_s * 1e3:.1f} ms (compression "
          f"included), TTFT {stats.first_token_s * 1e3:.1f} ms; decode {stats.num_generated} tokens at "
          f"{rate:.1f} tokens/s", file=sys.stderr)
    if stats.kv_bytes_after != stats.kv_bytes_before:
        before, after = stats.kv_bytes_before, stats.kv_bytes_after
        int8 = ", int8 K/V" if is_int8 else ""
        print(f"[time] KV cache {before / 1024:.1f} KiB -> {after / 1024:.1f} KiB ({stats.num_prompt} -> "
              f"{stats.kv_len} slots{int8}, {before / max(after, 1):.2f}x smaller after compression)", file=sys.stderr)


def run(args) -> int:
    question = read_question(args)
    session = build_session(args)
    if question is not None:
        ask(session, question, args)
        return 0
    print("kvjax chat: type a message, empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        ask(session, check_text(line), args)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
