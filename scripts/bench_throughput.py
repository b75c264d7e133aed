"""Decode throughput of the serving engine's paged cache, baseline vs CCM-compressed vs int8 pages.

    python scripts/bench_throughput.py --like llama-2-7b --dtype bfloat16 --batch-sizes 1,32,64,128   # GPU
    python scripts/bench_throughput.py --model-dir DIR --batch-sizes 1,4,16 --json out.json           # CPU

Each batch size runs the engine (inference.Engine) on B requests of --prompt-len random tokens
(the first --image-kv-len form the image span), prefilled, optionally compressed with a randomly
initialised CCM compressor (--compression-factor) or a press, then decoded as one batch; tokens/s is B over
the median decode-step time (steps after --warmup-steps; a step that recompiles is an outlier).
--variants names `baseline`, `ccm` or a press `NAME:RATIO`, each optionally `+int8` (int8 pages
with float32 scales; a bare name takes --kv-cache-dtype). The fixed-budget case gives every variant the same pool
bytes (--kv-cache-bytes, default: --budget-seqs uncompressed sequences in the model's dtype), so
int8 buys more pages, and finds the largest batch that fits (checked: all of them decode
together, no preemption).
"""

import argparse
import statistics
import sys
import time

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, bench_main, model_dir_for, pyplot, report_head, save

import jax
import kvjax
from kvjax.cli.common import add_parallel_flags
import numpy as np
from tqdm import tqdm

from bench_serving import add_variant_flags, make_method, parse_variants
from inference.engine import Engine, pages_in
from inference.paged_cache import PagedKVCache
from inference.scheduler import WATERMARK_PAGES_PER_SEQ, Request


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument("--batch-sizes", default="1,32,64,128", help="comma list; empty: only the fixed-budget case")
    add_variant_flags(p, "fixed budget in bytes (instead of --budget-seqs)")
    p.add_argument("--prompt-len", type=int, default=640)
    p.add_argument("--image-kv-len", type=int, default=576)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--budget-seqs", type=int, default=4,
                   help="fixed budget = the bytes of this many uncompressed sequences in the model's dtype (0: skip)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    add_parallel_flags(p, hosts=False)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot tokens/s per batch size here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run_decode(parts, compressor, kv_dtype, batch, args, kv_cache_bytes=None, prefill_batch=None) -> dict:
    """B requests through the engine; median decode-step time once all of them decode together."""
    num_steps = args.warmup_steps + args.decode_steps
    engine = Engine(parts, page_size=args.page_size, kv_cache_bytes=kv_cache_bytes, kv_cache_dtype=kv_dtype,
                    max_num_seqs=batch, max_model_len=args.prompt_len + num_steps + 1,
                    prefill_batch_size=prefill_batch or min(batch, 8),
                    decoding_batch_size=batch, eos_ids=())
    rng = np.random.default_rng(batch)
    vocab = parts.cfg.vocab_size
    image_len = min(args.image_kv_len, args.prompt_len)
    for _ in range(batch):
        engine.add_request(Request(prompt=rng.integers(3, vocab, args.prompt_len).tolist(),
                                   max_new_tokens=num_steps + 1, compression=compressor, image_len=image_len))
    while engine.scheduler.waiting or any(s.phase.value != "running" for s in engine.scheduler.running):
        engine.step()
    kv_len = [s.kv_len for s in engine.scheduler.running]
    peak_pages = engine.allocator.peak_used
    used_pages = engine.allocator.num_used
    step_s = []
    while engine.scheduler.running:
        start = time.perf_counter()
        engine.step()  # syncs on the sampled tokens
        step_s.append(time.perf_counter() - start)
    decode_s = statistics.median(step_s[args.warmup_steps:])
    page_bytes = engine.runner.cache.page_bytes()
    return {"batch": batch, "compressed": compressor is not None, "kv_cache_dtype": kv_dtype or "auto",
            "tokens_per_s": batch / decode_s, "step_ms": 1e3 * decode_s, "kv_len": int(np.mean(kv_len)),
            "pages_in_use": used_pages, "peak_pages": peak_pages, "num_pages": engine.allocator.num_pages,
            "page_bytes": page_bytes, "pool_bytes": page_bytes * engine.allocator.num_pages,
            "all_decoded_together": engine.stats["max_running"] == batch,
            "preempted": sum(s.num_preempted for s in engine.finished)}


def budget_case(parts, variants, args, kv_lens) -> dict:
    """Largest batch of each variant within the same pool bytes."""
    cfg, dtype = parts.cfg, jax.tree.leaves(parts.state)[0].dtype
    pages = -(-(args.prompt_len + args.warmup_steps + args.decode_steps + 1) // args.page_size)
    shapes = jax.eval_shape(lambda: PagedKVCache.for_model(cfg, 1, args.page_size, 1, dtype))
    budget = args.kv_cache_bytes or args.budget_seqs * pages * shapes.page_bytes()
    rows = {}
    for name, (compressor, kv_dtype) in variants.items():
        ratio = getattr(compressor, "compression_ratio", 1 - 1 / args.compression_factor)  # a press, or CCM
        kv_len = kv_lens.get(name, int(args.prompt_len * (1 - ratio)))  # measured by the sweep, else estimated
        pages_c = -(-(kv_len + args.warmup_steps + args.decode_steps + 1) // args.page_size)
        num_pages = pages_in(budget, None, cfg, args.page_size, dtype, kv_dtype)
        # Prefill one at a time: each sequence is compressed before the next is admitted, and an admission
        # leaves the scheduler's watermark free for each sequence already running.
        if num_pages < pages:
            raise kvjax.KVJaxError(f"--kv-cache-bytes={budget} holds {num_pages} pages for variant {name}, "
                                   f"fewer than one uncompressed sequence ({pages}); raise it")
        held = pages_c if compressor is not None else pages
        fit = (num_pages - pages) // (held + WATERMARK_PAGES_PER_SEQ) + 1
        rows[name] = run_decode(parts, compressor, kv_dtype, fit, args, kv_cache_bytes=budget, prefill_batch=1)
    ref = next(iter(rows.values()))
    return {"kv_cache_bytes": budget, "seq_pages": pages, "variants": rows,
            "batch_ratio": {n: r["batch"] / ref["batch"] for n, r in rows.items()},
            "throughput_ratio": {n: r["tokens_per_s"] / ref["tokens_per_s"] for n, r in rows.items()}}


def run(args, argv) -> dict:
    if min(args.prompt_len, args.decode_steps, args.page_size) <= 0 or args.warmup_steps < 0:
        raise kvjax.KVJaxError("--prompt-len, --decode-steps, --page-size must be > 0, --warmup-steps >= 0")
    if not args.batch_sizes.strip() and not (args.budget_seqs or args.kv_cache_bytes):
        raise kvjax.KVJaxError("nothing to run: give --batch-sizes, --budget-seqs or --kv-cache-bytes")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())  # none: only the budget case
    if any(b <= 0 for b in batch_sizes):
        raise kvjax.KVJaxError(f"--batch-sizes must be > 0, got {args.batch_sizes}")
    names = parse_variants(args)
    model_dir = model_dir_for(args)
    model, _, cfg = kvjax.load(model_dir, dtype=args.dtype, tokenizer=False, tensor_parallel=args.tensor_parallel)
    parts = kvjax.split(model)
    methods, variants = {}, {}
    for name, (method, kv_dtype) in names.items():
        if method not in methods:  # one compressor for ccm and ccm+int8
            methods[method] = make_method(method, cfg, args)
        variants[name] = (methods[method], kv_dtype)
    results = []
    for batch in tqdm(batch_sizes, disable=args.quiet, desc="batch"):
        rows = {name: run_decode(parts, c, kv_dtype, batch, args) for name, (c, kv_dtype) in variants.items()}
        ref = next(iter(rows.values()))
        results.append({"batch": batch, "variants": rows,
                        "speedup": {n: r["tokens_per_s"] / ref["tokens_per_s"] for n, r in rows.items()}})
    kv_lens = {n: r["kv_len"] for n, r in results[-1]["variants"].items()} if results else {}
    budget = budget_case(parts, variants, args, kv_lens) if args.budget_seqs or args.kv_cache_bytes else None
    return {**report_head(args, argv, cfg, model_dir), "results": results, "fixed_budget": budget}


def plot(report, path) -> None:
    if (plt := pyplot()) is None:
        return
    results, budget = report["results"], report["fixed_budget"]
    fig, axes = plt.subplots(1, bool(results) + bool(budget), figsize=(5 * (bool(results) + bool(budget)), 4),
                             squeeze=False)
    axes = list(axes[0])
    if results:
        ax, batches = axes.pop(0), [r["batch"] for r in results]
        for name in results[0]["variants"]:
            ax.plot(batches, [r["variants"][name]["tokens_per_s"] for r in results], marker="o", label=name)
        ax.set(xlabel="decode batch", ylabel="tokens/s", xscale="log", yscale="log", title="per batch size")
        ax.legend()
    if budget:
        ax, names = axes.pop(0), list(budget["variants"])
        rows = [budget["variants"][n] for n in names]
        ax.bar(range(len(names)), [r["tokens_per_s"] for r in rows])
        ax.set_xticks(range(len(names)), [f"{n}\nB={r['batch']}, {r['num_pages']} pages" for n, r in zip(names, rows)],
                      rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="tokens/s", title=f"fixed KV budget, {budget['kv_cache_bytes']} bytes")
    save(fig, path)


def summarize(report) -> None:
    names = list(report["results"][0]["variants"]) if report["results"] else []
    print(f"{'batch':>5}  " + "  ".join(f"{n + ' tok/s':>16}" for n in names) + "  kv_len")
    for r in report["results"]:
        rows = r["variants"]
        print(f"{r['batch']:>5}  " + "  ".join(f"{rows[n]['tokens_per_s']:>9.1f} (x{r['speedup'][n]:.2f})"
                                             for n in names) + "  " + "/".join(str(rows[n]["kv_len"]) for n in names))
    if report["fixed_budget"]:
        b = report["fixed_budget"]
        print(f"budget {b['kv_cache_bytes']} bytes: " + "; ".join(
            f"{n} {r['num_pages']} pages, batch {r['batch']} at {r['tokens_per_s']:.1f} tok/s "
            f"(together: {r['all_decoded_together']})" for n, r in b["variants"].items()))


main = bench_main(parse_args, run, summarize, plot)


if __name__ == "__main__":
    sys.exit(main())
