"""Tensor-parallel checks, run in a subprocess with forced host devices (test_parallel.py), so the
rest of the suite keeps one device:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python -m tests.kvjax.parallel_checks MODEL_DIR OUT.json
    XLA_FLAGS=...=4 KVJAX_KERNELS=interpret python -m tests.kvjax.parallel_checks MODEL_DIR OUT.json --kernels
    XLA_FLAGS=...=2 python -m tests.kvjax.parallel_checks MODEL_DIR OUT.json --process-id I --port P

The last is one of two processes that join through jax.distributed (2 CPU devices each) and run
one greedy generate at tp 4 across them.

For tp 1, 2 and 4 (and one device without a mesh, the reference): logits of a prefill and of one
decode step after it, and greedy tokens, under no compression, CCM, SnapKV, PyramidKV, int8 and
ccm+int8 at tp 4 (one KV head per device, the finest split); tp 1 (a mesh of one device) and tp 2
run ONE_PER_STRUCTURE, one method per cache structure; the shardings of the cache leaves; how many
programs each step compiled; the paged engine's greedy tokens (dense and int8 pages, mixed methods
in one batch); the server's and the chat command's answers on the shipped model at tp 2 and on one
device; how loading placed the weights (a Llama, the shipped LLaVA). With --kernels the same runs
with KVJAX_KERNELS=interpret, so the Pallas kernels run per shard under shard_map.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

import kvjax
from kvjax import defaults, parallel
from kvjax.compression import Int8KV

PROMPTS = np.random.default_rng(0).integers(3, 500, (2, 40)).astype(np.int32)
LENGTHS = np.array([40, 33], np.int32)
NEW_TOKENS = 6
ONE_PER_STRUCTURE = ["none", "pyramidkv", "ccm+int8"]  # dense, per-layer lengths, int8


def methods(cfg, names):
    ccm = kvjax.build_compressor(kvjax.CompressorConfig.for_model(cfg, compression_factor=2), rngs=nnx.Rngs(1))
    table = {"none": None, "ccm": ccm, "int8": Int8KV(), "ccm+int8": (ccm, Int8KV()),
             "snapkv": kvjax.presses.get_press("snapkv", compression_ratio=0.5, window_size=8),
             "pyramidkv": kvjax.presses.get_press("pyramidkv", compression_ratio=0.5, window_size=8)}
    return {name: table[name] for name in names}


def spec_of(x) -> str:
    """'heads' (split over KV heads on axis 2, as intended), 'replicated', 'single device' or the spec."""
    x = getattr(x, "values", x)  # an int8 leaf: its values carry the layout
    sharding = x.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return "single device"
    if x.ndim >= 4 and parallel.has_sharding(x, jax.sharding.NamedSharding(sharding.mesh, parallel.kv_spec(x.ndim))):
        return "heads"
    if parallel.has_sharding(x, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())):
        return "replicated" if x.ndim < 4 or parallel.tp_size(sharding.mesh) > 1 else "heads"
    return str(sharding.spec)


def dense_runs(model_dir, tp: int | None, names) -> dict:
    mesh = None if tp is None else parallel.make_mesh(tp)
    model, _, cfg = kvjax.load(model_dir, "float32", tokenizer=False, mesh=mesh)
    out = {}
    for name, method in methods(cfg, names).items():
        cache = kvjax.KVCache.for_model(cfg, 2, 96)
        logits, cache = kvjax.prefill_and_compress(model, cache, PROMPTS, LENGTHS, method=method)
        shardings = {"k": spec_of(cache.k), "v": spec_of(cache.v), "kv_len": spec_of(cache.kv_len)}
        if isinstance(cache.k, kvjax.cache.QuantizedArray):
            shardings["k_scales"] = spec_of(cache.k.scales)
        gen = kvjax.generate_from(model, cache, logits, max_new_tokens=NEW_TOKENS)
        step_logits, cache = kvjax.decode_step(model, gen.cache, gen.tokens[:, -1])
        for _ in range(3):  # more decode steps of the same shape: no new program
            step_logits2, cache = kvjax.decode_step(model, cache, np.asarray(step_logits).argmax(-1))
        out[name] = {"logits": np.asarray(logits).tolist(), "step_logits": np.asarray(step_logits).tolist(),
                     "tokens": gen.tokens.tolist(), "kv_len": np.asarray(cache.kv_len).tolist(),
                     "shardings": shardings}
    out["compiles"] = {"decode_step": kvjax.steps._decode._cache_size()}
    kvjax.steps._decode.clear_cache()
    return out


def engine_runs(model_dir, tp: int | None) -> dict:
    from inference.engine import Engine
    from inference.scheduler import Request

    out = {}
    for kv_cache_dtype in (None, "int8"):
        model, _, cfg = kvjax.load(model_dir, "float32", tokenizer=False)
        compressions = [None] + list(methods(cfg, ["ccm", "snapkv"]).values())
        engine = Engine(model, max_model_len=128, max_num_seqs=4, page_size=8, tensor_parallel=tp,
                        kv_cache_dtype=kv_cache_dtype)
        requests = [Request(prompt=PROMPTS[i % 2, :LENGTHS[i % 2]].tolist(), max_new_tokens=NEW_TOKENS,
                            compression=method) for i, method in enumerate(compressions)]
        results = engine.generate(requests)
        out[str(kv_cache_dtype)] = {"tokens": [r.token_ids for r in results],
                                    "pages": spec_of(engine.runner.cache.k_pages)}
    return out


def multi_host(model_dir, process_id: int, port: int) -> dict:
    parallel.initialize_distributed(f"localhost:{port}", 2, process_id)
    model, _, cfg = kvjax.load(model_dir, "float32", tokenizer=False, tensor_parallel=4)
    gen = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 2, 96), PROMPTS, LENGTHS, max_new_tokens=NEW_TOKENS)
    return {"processes": jax.process_count(), "devices": len(jax.devices()),
            "local_devices": len(jax.local_devices()), "tokens": gen.tokens.tolist()}


def kernel_runs(model_dir) -> dict:
    """Under KVJAX_KERNELS=interpret: the Pallas kernels (decode attention, CCM, compaction) run, and
    under a mesh they run per shard; counts the shard_map wrappers traced."""
    calls = []
    shard_map = jax.shard_map

    def counting(fn, **kwargs):
        calls.append(getattr(fn, "__name__", "?"))
        return shard_map(fn, **kwargs)

    jax.shard_map = counting
    names = ["ccm", "snapkv", "int8"]  # every kernel: decode attention (dense, int8), CCM, compaction
    report = {"dense": {str(tp): dense_runs(model_dir, tp, names) for tp in (None, 2)}}
    report["shard_map_calls"] = len(calls)
    return report


def serve_runs(tp: int | None) -> dict:
    """`python -m kvjax.serve --tensor-parallel` as its flags build it, over HTTP with the openai
    client: a greedy chat answer from the shipped model (with its shipped CCM, cf 5)."""
    import openai

    from inference.server import BackgroundServer
    from kvjax.cli import serve

    flags = ["--max-num-seqs", "2", "--max-model-len", "256", "--dtype", "float32"]
    service = serve.load_service(serve.build_parser().parse_args(flags + (["--tensor-parallel", str(tp)] if tp else [])))
    out = {"mesh": parallel.tp_size(service.engine.parts.mesh)}
    with BackgroundServer(service) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        for method in ("none", "ccm"):
            reply = client.chat.completions.create(
                model=service.name, max_tokens=12, temperature=0.0,
                messages=[{"role": "user", "content": "The code of Ada is 4821. What is the code of Ada?"}],
                extra_body={"kv_compression": {"method": method}})
            out[method] = reply.choices[0].message.content
    service.live.shutdown(0)
    return out


def chat_runs() -> dict:
    """`python -m kvjax.chat --kv-compress` on the shipped model (its main, in this process): the
    answer on one device and at --tensor-parallel 2, and the exit code and error of a tp the
    visible devices cannot hold."""
    import contextlib
    import io

    from kvjax.cli import chat

    question = ["--question", "The code of Ada is 4821. What is the code of Ada?", "--quiet", "--max-new-tokens", "12",
                "--kv-compress"]
    out = {}
    for name, extra in (("None", []), ("2", ["--tensor-parallel", "2"]), ("8", ["--tensor-parallel", "8"])):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = chat.main(question + extra)
        out[name] = {"code": code, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}
    return out


def load_placement(model_dir, tp: int) -> dict:
    """How `kvjax.load(tensor_parallel=tp)` put the weights on the devices: every host -> device copy
    (`jax.device_put`) it made, and how many went straight to the mesh's shardings (the rest would
    have landed whole on one device first)."""
    from jax.sharding import NamedSharding

    real, puts = jax.device_put, []

    def spy(x, device=None, *args, **kwargs):
        puts.append(isinstance(device, NamedSharding) and parallel.tp_size(device.mesh) == tp)
        return real(x, device, *args, **kwargs)

    jax.device_put = spy
    try:
        kvjax.load(model_dir, "float32", tokenizer=False, tensor_parallel=tp)
    finally:
        jax.device_put = real
    return {"puts": len(puts), "on_the_mesh": sum(puts)}


def main(argv) -> int:
    model_dir, out_path, *rest = argv
    if "--process-id" in rest:
        report = multi_host(model_dir, int(rest[rest.index("--process-id") + 1]), int(rest[rest.index("--port") + 1]))
    elif "--kernels" in rest:
        report = kernel_runs(model_dir)
    else:
        names = ["none", "ccm", "snapkv", "pyramidkv", "int8", "ccm+int8"]
        report = {"devices": len(jax.devices()), "dense": {}, "engine": {}}
        for tp in (None, 1, 2, 4):
            report["dense"][str(tp)] = dense_runs(model_dir, tp, ONE_PER_STRUCTURE if tp in (1, 2) else names)
        for tp in (None, 2):
            report["engine"][str(tp)] = engine_runs(model_dir, tp)
        report["serve"] = {str(tp): serve_runs(tp) for tp in (None, 2)}
        report["chat"] = chat_runs()
        report["load"] = {"llama": load_placement(model_dir, 2), "llava": load_placement(defaults.DEFAULT_VLM, 2)}
        try:  # 4 KV heads do not split over 3 devices: one clear error
            kvjax.load(model_dir, "float32", tokenizer=False, tensor_parallel=3)
            report["indivisible"] = "no error"
        except kvjax.KVJaxError as e:
            report["indivisible"] = str(e)
    with open(out_path, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
