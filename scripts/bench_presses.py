"""Press time (score + compaction) of kvjax vs NVIDIA kvpress, same CPU, model and prompt, one run.

kvpress 0.5.5 needs transformers < 5.3, so it runs in its own venv (see scripts/kvpress_parity.py):

    python scripts/bench_presses.py --kvpress-python /tmp/kvpress-venv/bin/python --json bench_presses.json

The project venv writes a random-weight Llama (`kvjax.demo.write_checkpoint(like="llama-100m")`)
and a prompt of --context-len token ids; both sides prefill it in float32 with batch 1.
- kvjax: `kvjax.compress(cache, press, observations=obs)` after `kvjax.compression.prefill_observing`, timed
  from a fresh copy of the prefilled cache (compile excluded; median of --repeats).
- kvpress: the time spent in `press.compress` summed over the layers of one prefill (kvpress
  scores and prunes inside its forward hooks; median of --kvpress-repeats prefills).
Caveat: kvjax's query presses (snapkv, expected_attention, tova) record their window/statistics
inside the prefill (not in the press time); kvpress computes them inside `compress` (timed).
"""

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {  # kvjax registry name -> (kvpress class, kwargs, kvpress kwargs)
    "knorm": ("KnormPress", {}),
    "streaming_llm_press": ("StreamingLLMPress", {}),
    "snapkv": ("SnapKVPress", {}),
    "expected_attention": ("ExpectedAttentionPress", {}),
    "tova": ("TOVAPress", {}),
}


def run_kvpress(model_dir: Path, ratio: float, repeats: int) -> dict:
    """In the kvpress venv: {press: [seconds per prefill spent in press.compress]}."""
    import kvpress
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    prompt = torch.tensor([json.loads((model_dir / "prompt.json").read_text())])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    out = {"torch_threads": torch.get_num_threads()}
    for name, (cls, kwargs) in CASES.items():
        press = getattr(kvpress, cls)(compression_ratio=ratio, **kwargs)
        spent = [0.0]
        inner = press.compress

        def timed(*args, _inner=inner, **kw):  # the forward hook calls self.compress per layer
            start = time.perf_counter()
            result = _inner(*args, **kw)
            spent[0] += time.perf_counter() - start
            return result

        press.compress = timed
        out[name] = []
        for _ in range(repeats):
            spent[0] = 0.0
            with torch.no_grad(), press(model):
                model.model(input_ids=prompt, past_key_values=DynamicCache())
            out[name].append(spent[0])
    return out


def run_kvjax(model_dir: Path, ratio: float, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import kvjax
    from kvjax.compression import prefill_observing as prefill
    from kvjax.compression.presses import get_press

    model, _, cfg = kvjax.load(model_dir, dtype="float32", tokenizer=False)
    prompt = np.asarray(json.loads((model_dir / "prompt.json").read_text()), np.int32)[None]
    out = {"jax": jax.__version__, "backend": jax.default_backend()}
    for name in CASES:
        press = get_press(name, compression_ratio=ratio)
        _, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 1, prompt.shape[1]), prompt, press=press)
        times = []
        for _ in range(repeats + 1):  # the first call compiles
            fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache))
            start = time.perf_counter()
            jax.block_until_ready(kvjax.compress(fresh, press, observations=obs))
            times.append(time.perf_counter() - start)
        out[name] = times[1:]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kvpress-python", help="python of a venv with kvpress 0.5.5 installed")
    parser.add_argument("--like", default="llama-100m", help="kvjax.demo LIKE preset of the model")
    parser.add_argument("--context-len", type=int, default=2048)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5, help="kvjax press calls timed per press")
    parser.add_argument("--kvpress-repeats", type=int, default=2, help="kvpress prefills timed per press")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--run-kvpress", type=Path, help=argparse.SUPPRESS)  # the kvpress-venv side
    args = parser.parse_args(argv)
    if args.run_kvpress:
        print(json.dumps(run_kvpress(args.run_kvpress, args.ratio, args.kvpress_repeats)))
        return 0
    if not args.kvpress_python:
        parser.error("--kvpress-python is required")
    import numpy as np

    from kvjax.testing.text import write_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp) / "model", like=args.like, max_position_embeddings=args.context_len)
        prompt = np.random.default_rng(0).integers(3, 32000, args.context_len)
        (model_dir / "prompt.json").write_text(json.dumps(prompt.tolist()))
        ours = run_kvjax(model_dir, args.ratio, args.repeats)
        done = subprocess.run([args.kvpress_python, __file__, "--run-kvpress", str(model_dir), "--ratio",
                               str(args.ratio), "--kvpress-repeats", str(args.kvpress_repeats)],
                              capture_output=True, text=True, check=False)
    if done.returncode:
        print(f"kvpress side failed:\n{done.stderr[-3000:]}", file=sys.stderr)
        return 1
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    rows = {name: {"kvjax_ms": 1e3 * statistics.median(ours[name]), "kvpress_ms": 1e3 * statistics.median(theirs[name]),
                   "kvjax_all_ms": [1e3 * t for t in ours[name]], "kvpress_all_ms": [1e3 * t for t in theirs[name]]}
            for name in CASES}
    print(f"{'press':>20} {'kvjax ms':>10} {'kvpress ms':>11} {'speedup':>8}")
    for name, row in rows.items():
        print(f"{name:>20} {row['kvjax_ms']:10.1f} {row['kvpress_ms']:11.1f} {row['kvpress_ms'] / row['kvjax_ms']:7.1f}x")
    if args.json:
        env = {"platform": platform.platform(), "processor": platform.processor(), "jax": ours["jax"],
               "backend": ours["backend"], "torch_threads": theirs["torch_threads"]}
        args.json.write_text(json.dumps({"like": args.like, "context_len": args.context_len, "ratio": args.ratio,
                                         "env": env, "presses": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
