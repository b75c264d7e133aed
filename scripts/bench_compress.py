"""CCM compress-step time and KV bytes before/after, beside the prefill time of the same batch.

    python scripts/bench_compress.py --like llama-100m --batch-sizes 1,8 --json docs/bench_compress_cpu.json
    python scripts/bench_compress.py --like llama-2-7b --dtype bfloat16 --batch-sizes 1,8,32,64   # GPU

Each repeat prefills --prompt-len random tokens per sequence (timed), then compresses the cache
with a randomly initialised compressor of the model's shape (timed; --image-len tokens form the
image span). The cache holds exactly the prompt. Medians of --repeats after one warm-up run.
Weights are random: times and byte counts do not depend on their values.
"""

import argparse
import statistics
import sys
import time

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, bench_main, model_dir_for, report_head

import jax
import jax.numpy as jnp
import kvjax
import numpy as np
from tqdm import tqdm

from kvjax.compression.ccm import CompressorConfig, build_compressor


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--prompt-len", type=int, default=640, help="tokens per sequence (LLaVA-1.5: 576 image + text)")
    p.add_argument("--image-len", type=int, default=576, help="image span at the start of each prompt")
    p.add_argument("--compression-factor", type=int, default=5)
    p.add_argument("--min-seq-len", type=int, default=2)
    p.add_argument("--kind", default="decoupled", choices=["decoupled", "hybrid"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def timed(fn, *args):
    """(result, seconds) with the device synchronised on both sides."""
    jax.block_until_ready(args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def bench_batch(parts, cfg, compressor, batch, args) -> dict:
    tokens = np.random.default_rng(batch).integers(0, cfg.vocab_size, (batch, args.prompt_len), dtype=np.int32)
    image_len = np.full(batch, min(args.image_len, args.prompt_len), np.int32)
    dtype = jnp.dtype(args.dtype)

    def prefill(cache):
        return kvjax.prefill(parts, cache, tokens)[1]

    prefill_s, compress_s = [], []
    for _ in range(args.repeats + 1):  # the first run compiles
        cache, seconds = timed(prefill, kvjax.KVCache.for_model(cfg, batch, args.prompt_len, dtype))
        prefill_s.append(seconds)
        before = cache.used_bytes()
        cache, seconds = timed(lambda c: kvjax.compress(c, compressor, image_len), cache)
        compress_s.append(seconds)
        after = cache.used_bytes()
    prefill_ms = 1e3 * statistics.median(prefill_s[1:])
    compress_ms = 1e3 * statistics.median(compress_s[1:])
    return {"batch": batch, "prefill_ms": prefill_ms, "compress_ms": compress_ms,
            "compress_over_prefill": compress_ms / prefill_ms,
            "kv_bytes_before": int(before.sum()), "kv_bytes_after": int(after.sum()),
            "kv_len_after": int(np.asarray(cache.kv_len)[0]),
            "bytes_ratio": float(before.sum() / max(after.sum(), 1)),
            "prefill_s": prefill_s, "compress_s": compress_s}


def run(args, argv) -> dict:
    if args.prompt_len <= 0 or args.repeats <= 0 or args.image_len < 0:
        raise kvjax.KVJaxError("--prompt-len and --repeats must be > 0, --image-len >= 0")
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    model_dir = model_dir_for(args)
    model, _, cfg = kvjax.load(model_dir, dtype=args.dtype, tokenizer=False)
    parts = kvjax.split(model)
    compressor = build_compressor(CompressorConfig(
        num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        compression_factor=args.compression_factor, min_seq_len=args.min_seq_len,
        image_mode="image_mlp" if args.kind == "decoupled" else "keep", dtype=args.dtype))
    results = []
    for batch in tqdm(batch_sizes, disable=args.quiet, desc="batch"):
        results.append(bench_batch(parts, cfg, compressor, batch, args))
    return {**report_head(args, argv, cfg, model_dir), "results": results}


def summarize(report) -> None:
    print(f"{'batch':>5}  {'prefill ms':>10}  {'compress ms':>11}  {'% of prefill':>12}  {'KV MB before':>12}  "
          f"{'KV MB after':>11}  {'ratio':>6}")
    for r in report["results"]:
        print(f"{r['batch']:>5}  {r['prefill_ms']:>10.1f}  {r['compress_ms']:>11.2f}  "
              f"{100 * r['compress_over_prefill']:>11.2f}%  {r['kv_bytes_before'] / 1e6:>12.1f}  "
              f"{r['kv_bytes_after'] / 1e6:>11.1f}  {r['bytes_ratio']:>5.2f}x")


main = bench_main(parse_args, run, summarize)


if __name__ == "__main__":
    sys.exit(main())
