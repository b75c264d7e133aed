"""`python -m kvjax.chat`: chat with a local Hugging Face model (or the built-in demo model).

Answers stream to stdout; banners, timings and errors go to stderr. Errors a user can cause
print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time

from kvjax.cli import Parser, non_negative_int, positive_int, run_cli
from kvjax.errors import KVJaxError


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m kvjax.chat", description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", help="Hugging Face model directory (default: the built-in demo model, "
                                       "random weights)")
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
                                              "default: an UNTRAINED random compressor")
    g.add_argument("--kv-compress-factor", type=positive_int,
                   help="tokens merged into one (default 5, or the checkpoint's)")
    g.add_argument("--kv-compress-min-seq-len", type=non_negative_int,
                   help="spans with fewer groups stay uncompressed (default 2, or the checkpoint's)")
    g.add_argument("--kv-compress-image-len", type=non_negative_int, default=0,
                   help="image prefix of the cache; 0 = infer from the prompt (0 for text-only prompts)")
    g.add_argument("--kv-compress-positions", choices=["original", "compressed"],
                   help="RoPE positions after compression (default: the compressor's own convention)")
    g = p.add_argument_group("KV-cache presses (kvpress-style scoring; python -c 'import kvjax.presses as p; "
                             "print(p.list_presses())')")
    g.add_argument("--press", help="press the prompt's KV cache after prefill with this method, e.g. knorm, snapkv")
    g.add_argument("--compression-ratio", type=float, default=0.5, help="fraction of prompt tokens dropped (0.5)")
    g.add_argument("--press-option", action="append", metavar="NAME=VALUE",
                   help="press hyper-parameter (kvpress names), repeatable: --press-option window_size=16")
    g.add_argument("--press-protect", choices=["none", "image", "question", "both"], default="none",
                   help="tokens kept outside the press budget: the image, the latest user message "
                        "(its text and the template's tail), or both (default none)")
    g = p.add_argument_group("KV-cache quantization")
    g.add_argument("--kv-quantize", choices=["none", "int8"], default="none",
                   help="store the prompt's K/V as int8 after prefill (after any --press / --kv-compress)")
    return p


class ChatSession:
    """Holds the split model and answers one conversation turn at a time.

    Each turn prefills the whole conversation into a fresh cache: simple and always equal to what
    the model would see in one pass (reusing the previous turns' cache is an optimisation for later).
    """

    def __init__(self, model, tokenizer, cfg, args):
        import kvjax

        self.kvjax, self.tokenizer, self.cfg, self.args = kvjax, tokenizer, cfg, args
        from kvjax.vlm_chat import vision_prompter

        # VLMs: the loop runs the language model; `vision` builds the prompt ids and embeddings.
        self.vision = vision_prompter(model, tokenizer, cfg, args.model_dir, getattr(args, "image", None))
        if self.vision is not None:
            model, cfg = model.language_model, cfg.text
            self.cfg = cfg
        self.parts = kvjax.split(model)
        self.cache_dtype = model.dtype
        self.sampling = kvjax.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        self.eos_ids = tuple(sorted(set(cfg.eos_token_ids) | (
            {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())))
        self.messages = [{"role": "system", "content": args.system}] if args.system else []
        self.compressor = _compressor(args, cfg, self.cache_dtype)
        self.press = _press(args)
        self.question_len = 0  # tokens of the latest user message + template tail (--press-protect question)
        self.compress_stats = None  # (kv bytes before, after, kv_len after, seconds) of the last turn
        self.is_warm = set()

    def _run(self, ids: list[int], max_new_tokens: int, on_prefill=None):
        import numpy as np

        from kvjax.prompts import bucket_len

        tokens = np.zeros((1, bucket_len(len(ids))), np.int32)
        tokens[0, :len(ids)] = ids
        embeds = None if self.vision is None else self.vision.embed(tokens)
        cache = self.kvjax.KVCache.for_model(self.cfg, 1, self.args.max_tokens, self.cache_dtype)
        compresses = self.compressor is not None or self.press is not None or self.args.kv_quantize != "none"
        return self.kvjax.stream(self.parts, cache, tokens, np.array([len(ids)]), embeds=embeds,
                                 max_new_tokens=max_new_tokens, sampling=self.sampling, eos_ids=self.eos_ids,
                                 seed=self.args.seed, on_prefill=on_prefill, after_prefill=(lambda c: self._compress(
                                     c, tokens, len(ids), embeds)) if compresses else None)

    def _compress(self, cache, tokens, num_tokens, embeds):
        image_len = self.args.kv_compress_image_len or (self.vision.image_len if self.vision is not None else 0)
        before = cache.used_bytes()
        start = time.perf_counter()
        protect = self.args.press_protect
        if self.press is not None:
            from kvjax.presses import compress_prompt

            cache = compress_prompt(self.parts, cache, tokens, [num_tokens], embeds, press=self.press,
                                    image_len=[image_len], protect_image=protect in ("image", "both"),
                                    protect_last=[self.question_len] if protect in ("question", "both") else None)
            question = self.question_len if protect in ("question", "both") else 0
            if protect in ("image", "both") and image_len + question > int(cache.kv_len[0]):
                # The protected image counts in the context's budget (the question is outside it).
                print(f"kvjax: the image ({image_len} tokens) exceeds the {int(cache.kv_len[0]) - question} "
                      "context tokens kept; part of it was dropped: lower --compression-ratio", file=sys.stderr)
        elif self.compressor is not None:
            cache = self.kvjax.compress(cache, self.compressor, [image_len],
                                        rope_positions=self.args.kv_compress_positions)
        if self.args.kv_quantize == "int8":  # last: presses and CCM read a dense cache
            from kvjax.quantization import Int8KV

            cache = self.kvjax.compress(cache, Int8KV())
        after = cache.used_bytes()  # syncs, so the time below is the step's
        self.compress_stats = (int(before[0]), int(after[0]), int(cache.kv_len[0]), time.perf_counter() - start)
        return cache

    def _warm_up(self, ids):
        """Compile this prompt shape once before timing, so --time reports steady-state figures."""
        from kvjax.prompts import bucket_len

        if bucket_len(len(ids)) not in self.is_warm:
            steps = self._run(ids, self.args.max_new_tokens)
            for _, _ in zip(range(2), steps):
                pass
            steps.close()
            self.is_warm.add(bucket_len(len(ids)))

    def ask(self, question: str, out=None) -> str:
        out = out or sys.stdout  # looked up per call: sys.stdout may have been replaced since import
        from kvjax.prompts import encode_chat

        self.messages.append({"role": "user", "content": question})
        encode = (lambda m: encode_chat(self.tokenizer, m)) if self.vision is None else self.vision.encode
        protects_question = self.args.press_protect in ("question", "both")
        context_ids = encode(self.messages[:-1] + [{"role": "user", "content": ""}]) if protects_question else []
        ids = encode(self.messages)  # last: the vision prompter keeps the last encoded prompt's image mask
        self.question_len = question_len(ids, context_ids) if protects_question else 0
        if self.args.time:
            self._warm_up(ids)
        start = time.perf_counter()
        marks = {}
        steps = self._run(ids, self.args.max_new_tokens, on_prefill=lambda: marks.setdefault(
            "prefill", time.perf_counter()))
        generated, text = [], ""
        for token, is_new in steps:
            if not is_new[0]:
                break
            marks.setdefault("first", time.perf_counter())
            if int(token[0]) in self.eos_ids:
                break
            generated.append(int(token[0]))
            now = self.tokenizer.decode(generated, skip_special_tokens=True)
            out.write(now[len(text):])
            out.flush()
            text = now
        end = time.perf_counter()
        out.write("\n")
        # The last sampled token never enters the cache, hence the + 1.
        in_cache = self.compress_stats[2] if self.compress_stats is not None else len(ids)
        if len(generated) < self.args.max_new_tokens and in_cache + len(generated) >= self.args.max_tokens + 1:
            print(f"kvjax: answer cut: the KV cache is full ({self.args.max_tokens} tokens); "
                  "raise --max-tokens", file=sys.stderr)
        self.messages.append({"role": "assistant", "content": text})
        if self.args.time:
            self._report(len(ids), len(generated), start, marks, end)
        return text

    def _report(self, num_prompt, num_generated, start, marks, end):
        prefill_ms = (marks["prefill"] - start) * 1e3
        ttft_ms = (marks.get("first", end) - start) * 1e3
        decode_s = end - marks.get("first", end)
        rate = (num_generated - 1) / decode_s if num_generated > 1 and decode_s > 0 else float("nan")
        print(f"[time] prompt {num_prompt} tokens: prefill {prefill_ms:.1f} ms, TTFT {ttft_ms:.1f} ms; "
              f"decode {num_generated} tokens at {rate:.1f} tokens/s", file=sys.stderr)
        if self.compress_stats is not None:
            before, after, kv_len, seconds = self.compress_stats
            int8 = ", int8 K/V" if self.args.kv_quantize == "int8" else ""
            print(f"[time] KV cache {before / 1024:.1f} KiB -> {after / 1024:.1f} KiB ({num_prompt} -> {kv_len} "
                  f"slots{int8}, {before / max(after, 1):.2f}x smaller); compress {seconds * 1e3:.1f} ms",
                  file=sys.stderr)


def question_len(ids: list[int], context_ids: list[int]) -> int:
    """Prompt tokens after `ids` parts from `context_ids` (the conversation with the latest user message
    emptied): that message's text and the template's tail (end of turn, assistant prefix). Works for any
    template and image prompts (the image precedes the text); the role header stays in the context."""
    common = next((i for i, (a, b) in enumerate(zip(ids, context_ids)) if a != b), min(len(ids), len(context_ids)))
    return len(ids) - common


def _compressor(args, cfg, dtype):
    """The CCM compressor the flags ask for, or None."""
    if not (args.kv_compress or args.kv_compress_ckpt):
        return None
    from kvjax.compressor_checkpoint import compressor_for

    if args.kv_compress_ckpt is None and not args.quiet:
        print("kvjax: no --kv-compress-ckpt given: compressing with an UNTRAINED random compressor "
              "(shows the mechanics; answers degrade)", file=sys.stderr)
    import jax.numpy as jnp

    return compressor_for(cfg, ckpt=args.kv_compress_ckpt, compression_factor=args.kv_compress_factor,
                          min_seq_len=args.kv_compress_min_seq_len, dtype=jnp.dtype(dtype).name)


def _press(args):
    """The press the flags ask for, or None."""
    if args.press is None:
        if args.press_protect != "none":
            raise KVJaxError(f"--press-protect {args.press_protect} applies to presses: add --press NAME "
                             "(e.g. --press knorm) or drop --press-protect")
        return None
    if args.kv_compress or args.kv_compress_ckpt:
        raise KVJaxError("pass either --press or --kv-compress, not both")
    from kvjax.presses import PRESSES, ScorerPress, get_press, parse_options

    # Seed 004's methods take their own budget options instead of a ratio.
    is_ratio = isinstance(PRESSES.get(args.press), type) and issubclass(PRESSES[args.press], ScorerPress)
    ratio = {"compression_ratio": args.compression_ratio} if is_ratio else {}
    return get_press(args.press, **{**ratio, **parse_options(args.press_option)})


def _load(args):
    import kvjax
    from kvjax import demo

    model_dir = args.model_dir
    if model_dir is not None and args.demo:
        raise KVJaxError("pass either --model-dir or --demo, not both")
    if model_dir is None:
        if args.demo in ("llava", "minicpmv"):
            from kvjax.demo_vlm import ensure_demo_vlm

            model_dir = ensure_demo_vlm(args.demo)
        else:
            model_dir = demo.ensure_demo_checkpoint()
        print(f"kvjax: no --model-dir given, using the built-in demo model in {model_dir}. "
              "It has RANDOM weights: its answers are gibberish.", file=sys.stderr)
        args.model_dir = str(model_dir)  # image chat reads the image processor settings there
    if not args.quiet:
        print(f"kvjax: loading {model_dir} ...", file=sys.stderr)
    return kvjax.load(model_dir, dtype=args.dtype, progress=not args.quiet)


def run(args) -> int:
    from kvjax.sampling import Sampling

    Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)  # validate flags early
    if args.image is not None:  # a bad image fails before a long model load
        from kvjax.images import open_image

        open_image(args.image)
    question = args.question
    interactive = question is None and sys.stdin.isatty()
    if question is None and not interactive:
        question = sys.stdin.read().strip()
        if not question:
            raise KVJaxError("no question: pass --question TEXT or pipe the question on stdin")
    session = ChatSession(*_load(args), args)
    if not interactive:
        session.ask(question)
        return 0
    print("kvjax chat: type a message, empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            return 0
        if not line:
            return 0
        session.ask(line)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
