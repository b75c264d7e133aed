"""Online serving benchmark: Poisson arrivals through `inference.Engine`, baseline vs compressed vs int8 pages.

    python scripts/bench_serving.py --like llama-2-7b --dtype bfloat16 --num-samples 256 --req-per-sec 8   # GPU
    python scripts/bench_serving.py --model-dir DIR --num-samples 32 --req-per-sec 4 --json out.json      # CPU

Requests arrive at Poisson times (--req-per-sec; 0 = all at once) and carry `arrival_s`; every
variant (--variants: `baseline`, `ccm` = a randomly initialised CCM compressor with
--compression-factor over an --image-kv-len image span, or a press `NAME:RATIO` such as `knorm:0.5`;
a `+int8` suffix keeps its pages int8 with float32 scales, a bare name takes --kv-cache-dtype)
serves the same requests in the same run, each on a fresh engine with the same pool: --num-pages
pages, or --kv-cache-bytes bytes (then int8 variants get more pages). Prompts
come from a LLaVA-style JSON/JSONL (--dataset: the first human turn, `<image>` dropped: the engine
serves the language model) or are synthetic ("Hello" x --context-len, the seeds' default).
Reported per variant: output tokens/s (all output tokens over the time from the first arrival to
the last finish), TTFT and TPOT p50/p99, peak pages in use, the most sequences running at once,
preemptions. Before timing, each variant serves the requests once with no arrival gaps (--no-warmup
skips it) so that compiles land outside the timed run; a shape the warm-up did not meet still
compiles inside it.
"""

import argparse
import json
import sys
from pathlib import Path

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, bench_main, model_dir_for, pyplot, report_head, save

import kvjax
import numpy as np
from tqdm import tqdm

from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.compression.presses import get_press


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p, "a Hugging Face Llama/Qwen2/Qwen3 directory (with tokenizer)")
    p.add_argument("--dataset", help="LLaVA-style .json / .jsonl; default: synthetic 'Hello' x --context-len")
    p.add_argument("--context-len", type=int, default=640, help="synthetic prompt: this many 'Hello's")
    p.add_argument("--max-prompt-len", type=int, default=2048, help="longer prompts are cut to this many tokens")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--req-per-sec", type=float, default=4.0, help="Poisson arrival rate; 0 = all at t=0")
    p.add_argument("--max-new-tokens", type=int, default=64)
    add_variant_flags(p, "page pool in bytes, scales counted (not with --num-pages): int8 variants get more pages")
    p.add_argument("--image-kv-len", type=int, default=576, help="CCM image span (cut to each prompt)")
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None, help="page pool (default: max-num-seqs full sequences)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--prefill-batch-size", type=int, default=4)
    p.add_argument("--decoding-batch-size", type=int, default=32)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot throughput and latencies per variant here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def read_questions(path) -> list[str]:
    """The first human/user turn of each LLaVA-style record (`conversations` or `messages`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise kvjax.KVJaxError(f"--dataset {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        entries = ([json.loads(line) for line in text.splitlines() if line.strip()] if path.suffix == ".jsonl"
                   else json.loads(text))
    except json.JSONDecodeError as e:
        raise kvjax.KVJaxError(f"--dataset {path}: not valid JSON ({e.msg})")
    questions = []
    for entry in entries if isinstance(entries, list) else []:
        turns = entry.get("conversations", entry.get("messages")) if isinstance(entry, dict) else None
        for turn in turns or []:
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("human", "user"):
                value = turn.get("value", turn.get("content"))
                if isinstance(value, str) and value.replace("<image>", "").strip():
                    questions.append(value.replace("<image>", "").strip())
                break
    if not questions:
        raise kvjax.KVJaxError(f"--dataset {path}: no record with a human/user turn (LLaVA 'conversations' "
                               "or 'messages' list)")
    return questions


def build_prompts(args, tokenizer, vocab_size: int, rng) -> list[list[int]]:
    """--num-samples token-id prompts, cycling through the dataset's questions."""
    if args.dataset:
        texts = read_questions(args.dataset)
        texts = [texts[i % len(texts)] for i in range(args.num_samples)]
    else:
        texts = [" ".join(["Hello"] * args.context_len)] * args.num_samples
    if tokenizer is None:  # no tokenizer in the checkpoint: random ids of the same word count
        return [rng.integers(3, vocab_size, max(1, min(len(t.split()), args.max_prompt_len))).tolist()
                for t in texts]
    return [tokenizer.encode(t)[:args.max_prompt_len] for t in texts]


KV_CACHE_DTYPES = ("auto", "int8")


def add_variant_flags(p, bytes_help: str) -> None:
    """--variants, --kv-cache-dtype and --kv-cache-bytes, as the engine benchmarks share them."""
    p.add_argument("--variants", default="baseline,ccm,ccm+int8",
                   help="comma list: baseline, ccm, NAME:RATIO (a press), each optionally +int8")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="pages of a variant without +int8 (auto: the model's dtype)")
    p.add_argument("--kv-cache-bytes", type=int, default=None, help=bytes_help)


def parse_variants(args) -> dict:
    """--variants -> {name: (method name, page dtype or None)}; also checks --kv-cache-bytes."""
    if args.kv_cache_bytes is not None and args.kv_cache_bytes <= 0:
        raise kvjax.KVJaxError(f"--kv-cache-bytes must be > 0, got {args.kv_cache_bytes}")
    names = {v.strip(): split_variant(v.strip(), args.kv_cache_dtype) for v in args.variants.split(",") if v.strip()}
    if not names:
        raise kvjax.KVJaxError("--variants is empty; give e.g. baseline,ccm,ccm+int8")
    return names


def split_variant(name: str, kv_cache_dtype: str):
    """'ccm+int8' -> ('ccm', 'int8'); a bare name takes kv_cache_dtype ('auto' -> None: the model's dtype)."""
    method, plus, suffix = name.partition("+")
    if plus and suffix not in KV_CACHE_DTYPES:
        raise kvjax.KVJaxError(f"--variants: {name!r}: the suffix after '+' must be one of {KV_CACHE_DTYPES}")
    kv_dtype = suffix if plus else kv_cache_dtype
    return method, None if kv_dtype == "auto" else kv_dtype


def make_method(name: str, cfg, args):
    """None (baseline), a random CCM compressor, or a press NAME:RATIO."""
    if name == "baseline":
        return None
    if name == "ccm":
        return build_compressor(CompressorConfig.for_model(
            cfg, compression_factor=args.compression_factor, min_seq_len=args.min_seq_len,
            dtype=args.dtype))  # random decoupled: speed does not depend on weights
    press, _, ratio = name.partition(":")
    try:
        return get_press(press, compression_ratio=float(ratio or 0.5))
    except (KeyError, ValueError) as e:
        raise kvjax.KVJaxError(f"--variants: {name!r} is not baseline, ccm or a press NAME:RATIO ({e})")


def _percentiles(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)),
            "mean": float(values.mean())}


def serve(parts, tokenizer, prompts, arrivals, method, kv_dtype, args, *, progress=None) -> dict:
    """All requests through a fresh engine; the serving metrics."""
    engine = Engine(parts, tokenizer=tokenizer, page_size=args.page_size, num_pages=args.num_pages,
                    kv_cache_bytes=args.kv_cache_bytes, kv_cache_dtype=kv_dtype,
                    max_num_seqs=args.max_num_seqs, max_model_len=max(map(len, prompts)) + args.max_new_tokens + 1,
                    prefill_batch_size=args.prefill_batch_size,
                    decoding_batch_size=args.decoding_batch_size, eos_ids=(), seed=args.seed)
    requests = [Request(prompt=p, max_new_tokens=args.max_new_tokens, compression=method, arrival_s=float(t),
                        image_len=min(args.image_kv_len, len(p)) if method is not None else 0)
                for p, t in zip(prompts, arrivals)]
    start = engine.clock()
    results = engine.generate(requests, progress=progress)
    wall_s = engine.clock() - start
    num_tokens = sum(len(r.token_ids) for r in results)
    span_s = max(float(t) + r.latency_s for t, r in zip(arrivals, results))  # first arrival (t=0) -> last finish
    compressed = [r.compressed_len for r in results if r.compressed_len is not None]
    page_bytes = engine.runner.cache.page_bytes()
    return {"num_requests": len(results), "output_tokens": num_tokens, "wall_s": wall_s,
            "tokens_per_s": num_tokens / span_s, "requests_per_s": len(results) / span_s,
            "ttft_s": _percentiles([r.ttft_s for r in results]),
            "tpot_s": _percentiles([r.tpot_s for r in results]),
            "latency_s": _percentiles([r.latency_s for r in results]),
            "peak_pages": engine.allocator.peak_used, "num_pages": engine.allocator.num_pages,
            "kv_cache_dtype": kv_dtype or "auto", "page_bytes": page_bytes,
            "pool_bytes": page_bytes * engine.allocator.num_pages,
            "max_concurrent_seqs": engine.stats["max_running"],
            "preempted": sum(r.num_preempted for r in results),
            "pages_freed_by_compression": engine.stats["pages_freed_by_compression"],
            "mean_prompt_len": float(np.mean([len(p) for p in prompts])),
            "mean_compressed_len": float(np.mean(compressed)) if compressed else None}


def arrival_times(req_per_sec: float, num: int, rng) -> np.ndarray:
    """Poisson arrival times [num] starting at t=0 (all zeros when req_per_sec is 0)."""
    gaps = rng.exponential(1.0 / req_per_sec, num) if req_per_sec > 0 else np.zeros(num)
    return np.cumsum(gaps) - gaps[0]


def run(args, argv) -> dict:
    if min(args.num_samples, args.max_new_tokens, args.page_size, args.context_len, args.max_prompt_len) <= 0:
        raise kvjax.KVJaxError("--num-samples, --max-new-tokens, --page-size, --context-len and "
                               "--max-prompt-len must be > 0")
    if args.kv_cache_bytes is not None and args.num_pages is not None:
        raise kvjax.KVJaxError("--num-pages and --kv-cache-bytes both size the pool; give one")
    if args.req_per_sec < 0:
        raise kvjax.KVJaxError(f"--req-per-sec must be >= 0, got {args.req_per_sec}")
    names = parse_variants(args)
    model_dir = model_dir_for(args)
    model, tokenizer, cfg = kvjax.load(model_dir, dtype=args.dtype)
    parts = kvjax.split(model)
    rng = np.random.default_rng(args.seed)
    prompts = build_prompts(args, tokenizer, cfg.vocab_size, rng)
    arrivals = arrival_times(args.req_per_sec, args.num_samples, rng)
    variants = {}
    for name, (method_name, kv_dtype) in names.items():
        method = make_method(method_name, cfg, args)
        if not args.no_warmup:
            serve(parts, tokenizer, prompts, np.zeros(len(prompts)), method, kv_dtype, args)
        with tqdm(total=len(prompts), disable=args.quiet, desc=name) as bar:
            variants[name] = serve(parts, tokenizer, prompts, arrivals, method, kv_dtype, args, progress=bar.update)
    return {**report_head(args, argv, cfg, model_dir), "arrivals_s": arrivals.tolist(), "variants": variants}


def plot(report, path) -> None:
    if (plt := pyplot()) is None:
        return
    names = list(report["variants"])
    rows = [report["variants"][n] for n in names]
    x = np.arange(len(names))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    axes[0].bar(x, [r["tokens_per_s"] for r in rows])
    axes[0].set(ylabel="output tokens/s", title="throughput")
    for ax, key, title in ((axes[1], "ttft_s", "TTFT"), (axes[2], "tpot_s", "TPOT")):
        ax.bar(x - 0.2, [1e3 * r[key]["p50"] for r in rows], 0.4, label="p50")
        ax.bar(x + 0.2, [1e3 * r[key]["p99"] for r in rows], 0.4, label="p99")
        ax.set(ylabel="ms", title=title)
        ax.legend()
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right")  # names such as ccm+int8 overlap flat
    save(fig, path)


def summarize(report) -> None:
    print(f"{'variant':>12}  {'tok/s':>8}  {'TTFT p50/p99 ms':>17}  {'TPOT p50/p99 ms':>17}  {'peak/pages':>10}  "
          f"{'max seqs':>8}")
    for name, r in report["variants"].items():
        print(f"{name:>12}  {r['tokens_per_s']:>8.1f}  {1e3 * r['ttft_s']['p50']:>8.1f}/{1e3 * r['ttft_s']['p99']:<8.1f}  "
              f"{1e3 * r['tpot_s']['p50']:>8.2f}/{1e3 * r['tpot_s']['p99']:<8.2f}  "
              f"{str(r['peak_pages']) + '/' + str(r['num_pages']):>10}  "
              f"{r['max_concurrent_seqs']:>8}")


main = bench_main(parse_args, run, summarize, plot)


if __name__ == "__main__":
    sys.exit(main())
