"""Time the Pallas kernels against their XLA (jnp) references at LLaVA-7B cache shapes.

    python scripts/bench_kernels.py --out bench_kernels.json            # on a GPU
    python scripts/bench_kernels.py --small --out smoke.json            # CPU smoke run (interpret)

Shapes: 32 KV heads, head_dim 128, bf16 (LLaVA-1.5-7B's Llama-2-7B LM). Reported, as JSON:
- decode_attention: ms per call for kv_len 128 and 640 at batch 1/32/128 (reference, Pallas, Pallas
  over an int8 cache and, on GPU, jax's own Pallas `gqa` decode kernel), and the 640/128 time
  ratio (linear would be 5x).
- compact_kv: ms and GB/s (bytes read + written by the move) against --hbm-gbps.
- ccm_compress: ms against the time to read the valid K/V once (a jnp reduction over them).
Each figure is the median of --repeats timed calls after one warm-up (which compiles). On CPU the
Pallas kernels run interpreted: correct, but their timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import bench_common  # noqa: F401  (first: it makes a source checkout importable)
import jax
import jax.numpy as jnp
import numpy as np

from kvjax.cache import kernel_operands, quantize
from pallas_kernels.ccm_compress import CCMWeights, GroupMLP, ccm_compress_pallas, ccm_compress_reference
from pallas_kernels.compact_kv import compact_kv_pallas, compact_kv_reference
from pallas_kernels.decode_attention import decode_attention_pallas, decode_attention_reference

LLAVA = dict(layers=32, kv_heads=32, q_heads=32, head_dim=128, max_len=1024, batch_sizes="1,32,128",
             kv_lens="128,640", compact_batch=8, image_len=576)
SMALL = dict(layers=2, kv_heads=2, q_heads=4, head_dim=16, max_len=64, batch_sizes="1,2",
             kv_lens="16,48", compact_batch=2, image_len=24)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    p.add_argument("--out", help="write the JSON report here")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per figure (median)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--cf", type=int, default=4, help="ccm_compress compression factor")
    p.add_argument("--min-seq-len", type=int, default=2, help="ccm_compress min groups per span")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM)")
    p.add_argument("--ops", default="decode_attention,compact_kv,ccm_compress")
    p.add_argument("--quiet", action="store_true")
    for key, value in LLAVA.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), help=f"default {value} ({SMALL[key]} with --small)")
    args = p.parse_args(argv)
    for key, value in (SMALL if args.small else LLAVA).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def median_ms(fn, state, repeats):
    """Median wall ms of `state = fn(*state)` (outputs fed back, so donated buffers stay valid)."""
    state = jax.block_until_ready(fn(*state))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state = jax.block_until_ready(fn(*state))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_decode(args, rng, dtype, interpret, on_gpu):
    rows = []
    kv_lens = [int(n) for n in args.kv_lens.split(",")]
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        shape = (batch, args.kv_heads, args.max_len, args.head_dim)
        q = jnp.asarray(rng.standard_normal((batch, args.q_heads, args.head_dim)), dtype)
        k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
        pallas = functools.partial(decode_attention_pallas, interpret=interpret)
        (kq, ks), (vq, vs) = (kernel_operands(quantize(x)) for x in (k, v))  # int8 + scales, as kvjax stores them
        impls = {"reference": (jax.jit(decode_attention_reference), (k, v)),
                 "pallas": (jax.jit(pallas), (k, v)),
                 "pallas_int8": (jax.jit(lambda q, k, v, n, ks, vs: pallas(q, k, v, n, None, ks, vs)), (kq, vq))}
        if on_gpu:  # jax's own split-K Pallas decode kernel, cache in its [B, S, Hkv, D] layout
            from jax.experimental.pallas.ops.gpu.decode_attention import gqa
            impls["jax_gqa"] = (jax.jit(lambda q, k, v, n: gqa(q, k, v, kv_seq_len=n)),
                                (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)))
        for name, (fn, cache) in impls.items():
            ms = {}
            for n in kv_lens:
                lengths = jnp.full((batch,), n, jnp.int32)
                extra = (ks, vs) if name == "pallas_int8" else ()
                # The output (same shape as q) is the next call's query.
                ms[n] = median_ms(lambda q_, f=fn, a=(*cache, lengths, *extra): (f(q_, *a),), (q,), args.repeats)
            row = dict(op="decode_attention", impl=name, batch=batch, ms={str(n): ms[n] for n in kv_lens})
            if len(kv_lens) == 2:
                row["ratio_long_over_short"] = ms[kv_lens[1]] / ms[kv_lens[0]]
            rows.append(row)
    return rows


def bench_compact(args, rng, dtype, interpret):
    shape = (args.layers, args.compact_batch, args.kv_heads, args.max_len, args.head_dim)
    kv_len = max(int(n) for n in args.kv_lens.split(","))
    kept = kv_len // 2  # e.g. a press at ratio 0.5, different tokens per head
    src = np.sort(np.argsort(rng.random(shape[1:3] + (kv_len,)), axis=-1)[..., :kept], axis=-1)
    src, new_len = jnp.asarray(src[None], jnp.int32), jnp.full((shape[1],), kept, jnp.int32)
    k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    moved_bytes = 2 * 2 * np.prod(shape[:3]) * kept * args.head_dim * jnp.dtype(dtype).itemsize  # K+V, read+write
    rows = []
    for name, fn in (("reference", compact_kv_reference),
                     ("pallas", functools.partial(compact_kv_pallas, interpret=interpret))):
        step = jax.jit(lambda k, v, f=fn: f(k, v, src, new_len), donate_argnums=(0, 1))
        ms = median_ms(step, (k, v), args.repeats)
        k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))  # donated above
        gbps = moved_bytes / ms / 1e6
        rows.append(dict(op="compact_kv", impl=name, shape=list(shape), kept=kept, ms=ms, gb_per_s=gbps,
                         fraction_of_hbm=gbps / args.hbm_gbps))
    return rows


def bench_ccm(args, rng, dtype, interpret):
    shape = (args.layers, args.compact_batch, args.kv_heads, args.max_len, args.head_dim)
    kv_len = max(int(n) for n in args.kv_lens.split(","))
    lengths = jnp.full((shape[1],), kv_len, jnp.int32)
    image = jnp.full((shape[1],), min(args.image_len, kv_len), jnp.int32)
    d, cf = args.head_dim, args.cf

    def mlp():
        dims = [(cf * d, d), (d,), (d, d), (d,), (d, d), (d,)]
        return GroupMLP(*(jnp.asarray(rng.standard_normal((args.layers, *s)) * 0.05, dtype) for s in dims))

    weights = CCMWeights(mlp(), mlp(), mlp(), mlp())
    k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    read_once = jax.jit(lambda k, v: (k[:, :, :, :kv_len].astype(jnp.float32).sum()
                                      + v[:, :, :, :kv_len].astype(jnp.float32).sum()))
    read_ms = median_ms(lambda k, v: (jax.block_until_ready(read_once(k, v)), k, v)[1:], (k, v), args.repeats)
    rows = []
    for name, fn in (("reference", ccm_compress_reference),
                     ("pallas", functools.partial(ccm_compress_pallas, interpret=interpret))):
        step = jax.jit(lambda k, v, w, f=fn: f(k, v, lengths, image, w, cf=cf, min_seq_len=args.min_seq_len)[:2],
                       donate_argnums=(0, 1))
        ms = median_ms(lambda k, v, s=step: s(k, v, weights), (k, v), args.repeats)
        k, v = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
        rows.append(dict(op="ccm_compress", impl=name, shape=list(shape), kv_len=kv_len, cf=cf, ms=ms,
                         read_kv_once_ms=read_ms, over_one_read=ms / read_ms))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = jax.default_backend() == "gpu"
    interpret = not on_gpu
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    ops = args.ops.split(",")
    results = []
    if "decode_attention" in ops:
        results += bench_decode(args, rng, dtype, interpret, on_gpu)
    if "compact_kv" in ops:
        results += bench_compact(args, rng, dtype, interpret)
    if "ccm_compress" in ops:
        results += bench_ccm(args, rng, dtype, interpret)
    report = dict(
        environment=dict(date=datetime.date.today().isoformat(), device=str(jax.devices()[0].device_kind),
                         jax_platform=jax.default_backend(), jax=jax.__version__, python=platform.python_version(),
                         pallas_interpreted=interpret,
                         command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])),
        config={k: getattr(args, k) for k in (*LLAVA, "dtype", "cf", "min_seq_len", "repeats", "hbm_gbps")},
        results=results)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    if not args.quiet:
        for row in results:
            figures = {k: v for k, v in row.items() if k not in ("op", "impl", "shape")}
            print(f"{row['op']:17s} {row['impl']:10s} {json.dumps(figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
