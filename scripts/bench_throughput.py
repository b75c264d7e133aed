"""Decode throughput of the serving engine's paged cache, baseline vs CCM-compressed, per batch size.

    python scripts/bench_throughput.py --like llama-2-7b --dtype bfloat16 --batch-sizes 1,32,64,128   # GPU
    python scripts/bench_throughput.py --model-dir DIR --batch-sizes 1,4,16 --json out.json           # CPU

Each batch size runs the engine (inference.Engine) on B requests of --prompt-len random tokens
(the first --image-kv-len form the image span), prefilled, optionally compressed with a randomly
initialised CCM compressor (--compression-factor), then decoded as one batch; tokens/s is B over
the median decode-step time (steps after --warmup-steps; a step that recompiles is an outlier).
The fixed-budget case sizes a page pool for --budget-seqs uncompressed sequences and finds the
largest batch that fits it with compression (checked: all of them decode together, no preemption).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

try:
    import kvjax
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import kvjax

import numpy as np
from tqdm import tqdm

from bench_decode import DTYPES, add_model_source, environment, model_dir_for
from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compressor_checkpoint import compressor_for


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument("--batch-sizes", default="1,32,64,128")
    p.add_argument("--prompt-len", type=int, default=640)
    p.add_argument("--image-kv-len", type=int, default=576)
    p.add_argument("--decode-steps", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--budget-seqs", type=int, default=4, help="KV budget = this many uncompressed sequences (0: skip)")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot tokens/s per batch size here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def run_decode(parts, compressor, batch, args, num_pages=None, prefill_batch=None) -> dict:
    """B requests through the engine; median decode-step time once all of them decode together."""
    num_steps = args.warmup_steps + args.decode_steps
    engine = Engine(parts, page_size=args.page_size, num_pages=num_pages, max_num_seqs=batch,
                    max_model_len=args.prompt_len + num_steps + 1, prefill_batch_size=prefill_batch or min(batch, 8),
                    compress_batch_size=min(batch, 8), decoding_batch_size=batch, eos_ids=())
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
    return {"batch": batch, "compressed": compressor is not None, "tokens_per_s": batch / decode_s,
            "step_ms": 1e3 * decode_s, "kv_len": int(np.mean(kv_len)), "pages_in_use": used_pages,
            "peak_pages": peak_pages, "page_bytes": engine.runner.cache.page_bytes(),
            "all_decoded_together": engine.stats["max_running"] == batch,
            "preempted": sum(s.num_preempted for s in engine.finished)}


def budget_case(parts, compressor, args, per_batch) -> dict:
    """Largest batch within the pages of --budget-seqs uncompressed sequences, with and without CCM."""
    pages = -(-(args.prompt_len + args.warmup_steps + args.decode_steps + 1) // args.page_size)
    budget = args.budget_seqs * pages
    compressed_len = per_batch[-1]["kv_len"] if per_batch else args.prompt_len // args.compression_factor
    pages_c = -(-(compressed_len + args.warmup_steps + args.decode_steps + 1) // args.page_size)
    # Prefill one at a time: each sequence is compressed before the next is admitted.
    fit_c = (budget - pages) // pages_c + 1
    base = run_decode(parts, None, args.budget_seqs, args, num_pages=budget, prefill_batch=1)
    comp = run_decode(parts, compressor, fit_c, args, num_pages=budget, prefill_batch=1)
    return {"budget_pages": budget, "baseline": base, "compressed": comp,
            "batch_ratio": fit_c / args.budget_seqs, "throughput_ratio": comp["tokens_per_s"] / base["tokens_per_s"]}


def run(args, argv) -> dict:
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    model_dir = model_dir_for(args)
    model, _, cfg = kvjax.load(model_dir, dtype=args.dtype, tokenizer=False)
    parts = kvjax.split(model)
    compressor = compressor_for(cfg, compression_factor=args.compression_factor, min_seq_len=args.min_seq_len,
                                dtype=args.dtype)  # random decoupled: speed does not depend on weights
    results = []
    for batch in tqdm(batch_sizes, disable=args.quiet, desc="batch"):
        base = run_decode(parts, None, batch, args)
        comp = run_decode(parts, compressor, batch, args)
        results.append({"batch": batch, "baseline": base, "compressed": comp,
                        "speedup": comp["tokens_per_s"] / base["tokens_per_s"]})
    budget = budget_case(parts, compressor, args, [r["compressed"] for r in results]) if args.budget_seqs else None
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "png", "quiet")}
    model_info = {"family": cfg.family, "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads,
                  "head_dim": cfg.head_dim, "hidden_size": cfg.hidden_size}
    return {"settings": dict(settings, model_dir=str(model_dir)), "model": model_info,
            "environment": environment(argv), "results": results, "fixed_budget": budget}


def plot(report, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print("--png: matplotlib is not installed; skipped", file=sys.stderr)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [r["batch"] for r in report["results"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in ("baseline", "compressed"):
        ax.plot(batches, [r[key]["tokens_per_s"] for r in report["results"]], marker="o", label=key)
    ax.set(xlabel="decode batch", ylabel="tokens/s", xscale="log", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        if min(args.prompt_len, args.decode_steps, args.page_size) <= 0 or args.warmup_steps < 0:
            raise kvjax.KVJaxError("--prompt-len, --decode-steps, --page-size must be > 0, --warmup-steps >= 0")
        report = run(args, argv)
    except (kvjax.KVJaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'batch':>5}  {'base tok/s':>10}  {'comp tok/s':>10}  {'speedup':>7}  {'kv_len base/comp':>16}")
    for r in report["results"]:
        print(f"{r['batch']:>5}  {r['baseline']['tokens_per_s']:>10.1f}  {r['compressed']['tokens_per_s']:>10.1f}  "
              f"{r['speedup']:>7.2f}  {r['baseline']['kv_len']:>8}/{r['compressed']['kv_len']}")
    if report["fixed_budget"]:
        b = report["fixed_budget"]
        print(f"budget {b['budget_pages']} pages: baseline batch {b['baseline']['batch']} "
              f"({b['baseline']['tokens_per_s']:.1f} tok/s), compressed batch {b['compressed']['batch']} "
              f"({b['compressed']['tokens_per_s']:.1f} tok/s; all together: {b['compressed']['all_decoded_together']}); "
              f"x{b['batch_ratio']:.2f} sequences, x{b['throughput_ratio']:.2f} throughput")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    if args.png:
        plot(report, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
