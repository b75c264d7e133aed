"""Decode tokens/s of kvjax vs transformers (PyTorch) on the same weights, same machine, one run.

    python scripts/bench_decode.py --like llama-100m --batch-sizes 1,8 --json bench.json
    python scripts/bench_decode.py --model-dir /models/llama-2-7b --dtype bfloat16 --backends kvjax

Each (backend, batch) repeat prefills the same random unpadded prompt of --context-len tokens,
runs --warmup-steps greedy decode steps (kvjax compiles here), then times --decode-steps steps
that feed the argmax back. The median repeat is reported. Threads: XLA's CPU backend uses every
core the process may run on and has no per-call knob; --threads only sets torch.set_num_threads.
For a like-for-like CPU comparison leave --threads unset (torch then uses all cores) or pin the
whole process with `taskset -c ...`. torch runs on CUDA when torch sees a GPU.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time

# bench_common first: it makes a source checkout importable.
from bench_common import DTYPES, add_model_source, environment, model_dir_for, write_outputs

import jax
import jax.numpy as jnp
import kvjax
from kvjax.cli.common import add_parallel_flags
import numpy as np
from tqdm import tqdm

from kvjax.testing import text as demo
from kvjax.loading.hf import hf_config, read_config_json

BACKENDS = ("kvjax", "torch")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_source(p)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--context-len", type=int, default=128, help="prompt tokens cached before timing")
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--warmup-steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--dtype", default="float32", help=", ".join(DTYPES))
    add_parallel_flags(p, hosts=False)
    p.add_argument("--backends", default="kvjax,torch")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (XLA CPU uses all cores)")
    p.add_argument("--hbm-gbps", type=float, default=3350.0, help="GPU memory bandwidth (H100 SXM)")
    p.add_argument("--json", help="write all results here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_args(args) -> None:
    """Turn the comma lists into tuples and reject values that cannot run."""
    try:
        args.batch_sizes = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise kvjax.KVJaxError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}")
    args.backends = tuple(args.backends.split(","))
    for name in ("context_len", "decode_steps", "repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise kvjax.KVJaxError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.warmup_steps < 0 or min(args.batch_sizes) <= 0:
        raise kvjax.KVJaxError("--warmup-steps must be >= 0 and every --batch-sizes entry > 0")
    for flag, values, valid in (("--dtype", [args.dtype], DTYPES), ("--backends", args.backends, BACKENDS),
                                ("--like", [args.like] if args.like else [], demo.LIKE_PRESETS)):
        if bad := [v for v in values if v not in valid]:
            raise kvjax.KVJaxError(f"{flag}: unknown {', '.join(bad)}; choose from {', '.join(valid)}")
    if "torch" in args.backends and importlib.util.find_spec("torch") is None:
        raise kvjax.KVJaxError("the torch backend needs torch: pip install torch, or pass --backends kvjax")


def decode(step, carry, num_steps: int, sync):
    """num_steps greedy steps from carry = (token [B], cache) -> (carry, seconds)."""
    sync(carry[0])
    start = time.perf_counter()
    for _ in range(num_steps):
        carry = step(carry)
    sync(carry[0])
    return carry, time.perf_counter() - start


def measure(backend: str, prompts, args, bar, start, step, sync) -> list[dict]:
    """Per batch size, `repeats` x (prefill, warm up, timed decode); reports the median repeat."""
    results = []
    for batch, prompt in prompts.items():
        seconds = []
        for _ in range(args.repeats):
            bar.set_description(f"{backend} bs={batch}")
            carry, _ = decode(step, start(prompt), args.warmup_steps, sync)
            seconds.append(decode(step, carry, args.decode_steps, sync)[1])
            bar.update()
        median = statistics.median(seconds)
        results.append({"backend": backend, "batch": batch, "seconds": seconds,
                        "tokens_per_s": batch * args.decode_steps / median,
                        "ms_per_step": 1e3 * median / args.decode_steps})
    return results


@jax.jit
def _greedy(logits):  # float32 [B, V] -> int32 [B]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def run_kvjax(model_dir, args, prompts, bar) -> list[dict]:
    model, _, cfg = kvjax.load(model_dir, dtype=args.dtype, tokenizer=False, tensor_parallel=args.tensor_parallel)
    parts = kvjax.split(model)
    max_len = -(-(args.context_len + args.warmup_steps + args.decode_steps) // 16) * 16
    actives = {batch: jnp.ones(batch, bool) for batch in prompts}

    def start(prompt):  # int32 [B, T] -> (token [B], cache)
        cache = kvjax.KVCache.for_model(cfg, len(prompt), max_len, jnp.dtype(args.dtype))
        logits, cache = kvjax.prefill(parts, cache, prompt)
        return _greedy(logits), cache

    def step(carry):
        token, cache = carry
        logits, cache = kvjax.decode_step(parts, cache, token, actives[len(token)])
        return _greedy(logits), cache

    results = measure("kvjax", prompts, args, bar, start, step, jax.block_until_ready)
    weights_bytes = sum(x.nbytes for x in jax.tree.leaves(parts.state))
    # A decode step gathers B rows of the input embedding; every other weight is read in full.
    itemsize = jnp.dtype(args.dtype).itemsize
    embed_bytes = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * itemsize
    return [dict(r, max_len=max_len, weights_bytes=weights_bytes,
                 weights_read_bytes=weights_bytes - embed_bytes) for r in results]


def run_torch(model_dir, args, prompts, bar) -> list[dict]:
    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, args.dtype)).to(device).eval()
    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

    def start(prompt):  # int32 [B, T] -> (token [B], past_key_values)
        ids = torch.from_numpy(prompt).long().to(device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    def step(carry):
        token, past = carry
        out = model(input_ids=token[:, None], past_key_values=past, use_cache=True)
        return out.logits[:, -1].argmax(-1), out.past_key_values

    with torch.inference_mode():
        results = measure("torch", prompts, args, bar, start, step, sync)
    extra = dict(device=device, threads=torch.get_num_threads(),
                 attn_implementation=model.config._attn_implementation)
    return [dict(r, **extra) for r in results]


def roofline(results, hbm_gbps: float) -> dict | None:
    """GPU only: a bs=1 step reads each weight once, so ms/step >= weights read / HBM bandwidth."""
    row = next((r for r in results if r["backend"] == "kvjax" and r["batch"] == 1), None)
    if row is None or jax.devices()[0].platform != "gpu":
        return None
    bound_ms = 1e3 * row["weights_read_bytes"] / (hbm_gbps * 1e9)
    return {"weights_bytes": row["weights_bytes"], "weights_read_bytes": row["weights_read_bytes"],
            "hbm_gbps": hbm_gbps, "bound_ms_per_step": bound_ms,
            "bound_tokens_per_s": 1e3 / bound_ms, "achieved_fraction": bound_ms / row["ms_per_step"]}


def print_report(report) -> None:
    print(f"{'batch':>5}  {'backend':<7}  {'tokens/s':>10}  {'ms/step':>9}  {'kvjax/torch':>11}")
    for r in sorted(report["results"], key=lambda r: (r["batch"], r["backend"])):
        speedup = report["speedup_kvjax_over_torch"].get(str(r["batch"]))
        shown = f"{speedup:.2f}x" if speedup and r["backend"] == "kvjax" else "-"
        print(f"{r['batch']:>5}  {r['backend']:<7}  {r['tokens_per_s']:>10.1f}  "
              f"{r['ms_per_step']:>9.2f}  {shown:>11}")
    if roof := report["roofline"]:
        print(f"weights {roof['weights_bytes'] / 1e9:.2f} GB ({roof['weights_read_bytes'] / 1e9:.2f} GB read "
              f"per step); bs=1 bound at {roof['hbm_gbps']:.0f} GB/s: {roof['bound_ms_per_step']:.2f} ms/step "
              f"= {roof['bound_tokens_per_s']:.0f} tokens/s; kvjax reaches {100 * roof['achieved_fraction']:.0f}%")


def run(args, argv) -> dict:
    model_dir = model_dir_for(args)
    cfg = kvjax.ModelConfig.from_hf_config(hf_config(*read_config_json(model_dir)))
    rng = np.random.default_rng(0)  # the same unpadded prompts for every backend
    prompts = {b: rng.integers(0, cfg.vocab_size, (b, args.context_len), dtype=np.int32)
               for b in args.batch_sizes}
    runners = {"kvjax": run_kvjax, "torch": run_torch}
    with tqdm(total=len(args.backends) * len(prompts) * args.repeats, disable=args.quiet) as bar:
        results = [r for name in args.backends for r in runners[name](model_dir, args, prompts, bar)]
    tps = {(r["backend"], r["batch"]): r["tokens_per_s"] for r in results}
    speedup = {str(b): tps[("kvjax", b)] / tps[("torch", b)] for b in prompts
               if ("kvjax", b) in tps and ("torch", b) in tps}
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "quiet")}
    model = {"family": cfg.family, "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
             "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size}
    return {"settings": dict(settings, model_dir=str(model_dir)), "model": model,
            "environment": environment(argv), "results": results,
            "speedup_kvjax_over_torch": speedup, "roofline": roofline(results, args.hbm_gbps)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        check_args(args)
        if "torch" in args.backends:  # else JAX takes 75% of GPU memory before torch loads
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        report = run(args, argv)
    except kvjax.KVJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_report(report)
    write_outputs(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
