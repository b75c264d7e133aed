"""Compile every Pallas kernel, and the decode step of two 7B LMs, for an H100, on a machine without a GPU.

    python3 -m venv .venv-gpu && .venv-gpu/bin/pip install "jax[cuda12]==0.10.2" -e .
    .venv-gpu/bin/python scripts/gpu_compile_check.py --json gpu_compile.json

XLA's GPU compiler runs deviceless: `jax.experimental.topologies` gives a compile-only H100 from a
GpuTargetConfigProto (default: scripts/gpu/h100_sxm.txtpb, a copy of shared/gpu/h100_sxm.txtpb so that
a bare clone runs it), and `jit(f).lower(abstract args on that device).compile()` runs the whole pipeline, Pallas ->
Triton -> PTX -> ptxas for sm_90a. So what a real H100 compile rejects (Triton lowering, ptxas, a
block over the shared-memory limit: `RESOURCE_EXHAUSTED: Shared memory size limit exceeded`) fails here.

Cases, bf16, at LLaVA-1.5-7B (its Llama-2-7B LM: 32 layers, 32 KV heads, head_dim 128) and
MiniCPM-V-2.6 (its Qwen2-7B LM: 28 layers, 28 query / 4 KV heads) shapes, max_len 640 and 1024,
batch 1 and 64: decode_attention (one layer; `layer=` over the whole cache; int8 with `layer=`),
paged_attention (`layer=`, 16-slot pages; bf16 and int8), compact_kv (a per-head plan over the
whole cache) and ccm_compress (cf 5, image and text MLPs). Then kvjax's jitted `decode_step` of
both LMs, built abstractly (nnx.eval_shape: no weights) under KVJAX_KERNELS=pallas at max_len
1024 (batch 1 and 64 with a bf16 cache, batch 64 with an int8 one), compiled whole: it must hold
one Triton decode_attention call per layer and warn of no reference fallback. And the same step
tensor-parallel over a compile-only 2-GPU topology (`kvjax.parallel` layouts; the kernels per shard
under shard_map), whose collectives (count and bytes all-reduced) are recorded too.

Per kernel it records, from XLA's dump (thunk sequence, PTX) and ptxas -v (which XLA logs with
TF_CPP_VMODULE=subprocess_compilation=2): grid, threads, shared memory, registers, spills and
MMA instructions (for a decode step: the largest figure over its per-layer calls). A case fails on
a compile error, a register spill, a missing kernel or a fallback.
Exit status: 0 all passed, 1 a case failed, 2 not runnable here (no jax CUDA plugin, no target config).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = REPO / "scripts" / "gpu" / "h100_sxm.txtpb"  # a copy of shared/gpu/h100_sxm.txtpb
MODELS = {"llava-1.5-7b": "llama-2-7b", "minicpm-v-2.6": "qwen2-7b"}  # -> kvjax.testing.text LIKE_PRESETS
KERNELS = ("decode_attention", "decode_attention_layer", "decode_attention_int8", "paged_attention",
           "paged_attention_int8", "compact_kv", "ccm_compress")
STEP_MAX_LEN, PAGE_SIZE, CCM_CF, CCM_MIN_SEQ_LEN = 1024, 16, 5, 2
FIGURES = ("threads", "shared_memory_bytes", "registers", "stack_frame_bytes", "spill_store_bytes",
           "spill_load_bytes", "wgmma", "mma_sync")

_THUNK = re.compile(r"(kvjax_\w+) grid: \[([\d, ]+)\] threads: \[([\d, ]+)\]\s+shared_memory: (\d+) bytes")
_PTXAS = re.compile(r"Function properties for (kvjax_\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                    r"(\d+) bytes spill loads\s+ptxas info\s*: Used (\d+) registers")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-config", default=str(DEFAULT_TARGET), help="GpuTargetConfigProto text (.txtpb)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma list (empty: none)")
    p.add_argument("--batch-sizes", default="1,64", help="of the kernel cases")
    p.add_argument("--max-lens", default="640,1024", help="of the kernel cases")
    p.add_argument("--steps", default="1:bfloat16,64:bfloat16,64:int8",
                   help=f"decode_step cases BATCH:KV_DTYPE at max_len {STEP_MAX_LEN} (empty: none)")
    p.add_argument("--tp-steps", default="1:bfloat16,64:int8",
                   help="decode_step cases BATCH:KV_DTYPE tensor-parallel over 2 GPUs (empty: none)")
    p.add_argument("--json", help="write every case's figures here")
    p.add_argument("--markdown", help="write the per-kernel table here")
    p.add_argument("--dump-dir", help="keep XLA's dumps and logs here (default: a temporary directory, "
                   "removed if every case passed)")
    return p.parse_args(argv)


@dataclasses.dataclass
class Case:
    kernel: str  # one of KERNELS, or decode_step
    model: str  # a key of MODELS
    batch: int
    max_len: int
    kv_dtype: str = "bfloat16"  # decode_step's cache
    tensor_parallel: int = 1  # decode_step over this many GPUs
    result: dict = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        suffix = ("/int8" if self.kv_dtype == "int8" else "") + (f"/tp{self.tensor_parallel}"
                                                                   if self.tensor_parallel > 1 else "")
        return f"{self.kernel}/{self.model}/b{self.batch}/s{self.max_len}{suffix}"


def make_cases(args) -> list[Case]:
    models = [m for m in args.models.split(",") if m]
    kernels = [k for k in args.kernels.split(",") if k]
    if bad := [m for m in models if m not in MODELS] + [k for k in kernels if k not in KERNELS]:
        raise ValueError(f"unknown {', '.join(bad)}; models: {', '.join(MODELS)}; kernels: {', '.join(KERNELS)}")
    cases = [Case(k, m, int(b), int(s)) for m in models for s in args.max_lens.split(",") if s
             for b in args.batch_sizes.split(",") if b for k in kernels]
    for m in models:
        for flag, tp in (("steps", 1), ("tp_steps", 2)):
            for step in filter(None, getattr(args, flag).split(",")):
                batch, _, kv_dtype = step.partition(":")
                if kv_dtype not in ("bfloat16", "int8"):
                    raise ValueError(f"--{flag.replace('_', '-')}: {step!r} is not BATCH:bfloat16 or BATCH:int8")
                cases.append(Case("decode_step", m, int(batch), STEP_MAX_LEN, kv_dtype, tp))
    return cases


def prepare_environment() -> None:
    """Before jax is imported: the CPU platform (the compile-only GPU comes from the topology), no
    check for a CUDA driver, and ptxas -v output in XLA's log."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"  # XLA's VLOG lines are INFO
    vmodule = os.environ.get("TF_CPP_VMODULE", "")
    if "subprocess_compilation" not in vmodule:
        os.environ["TF_CPP_VMODULE"] = ",".join(filter(None, [vmodule, "subprocess_compilation=2"]))


@contextlib.contextmanager
def stderr_to(path: Path):
    """Send fd 2 (XLA's C++ log, where the ptxas -v output lands) to `path`."""
    sys.stderr.flush()
    saved = os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def compile_only_devices(target_config: str, count: int = 1) -> list:
    """The devices of a compile-only topology of `count` GPUs in one process (GpuTargetConfigProto)."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=target_config).devices


def model_config(like: str):
    """kvjax's ModelConfig of a LIKE_PRESETS language model, without writing any weights."""
    import transformers

    from kvjax.config import ModelConfig
    from kvjax.testing import text as demo

    arch, fields = demo.LIKE_PRESETS[like]
    hf = getattr(transformers, demo._CONFIG_CLASSES[arch])(architectures=[demo._ARCHITECTURES[arch]], **fields)
    return ModelConfig.from_hf_config(hf)


def lower(case: Case, devices):
    """(jit(f).lower(abstract arguments placed on `devices`), the Triton kernel name expected)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    sharding = SingleDeviceSharding(devices[0])

    def arg(shape, dtype):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)

    cfg = model_config(MODELS[case.model])
    bf16, layers, head_dim, kernel = jnp.bfloat16, cfg.num_layers, cfg.head_dim, case.kernel
    if kernel == "decode_step":
        return lower_decode_step(cfg, case, devices), "kvjax_decode_attention"
    cache = (layers, case.batch, cfg.num_kv_heads, case.max_len, head_dim)  # [L, B, Hkv, S, D]
    q, lengths = arg((case.batch, cfg.num_heads, head_dim), bf16), arg((case.batch,), jnp.int32)
    last = layers - 1  # the layer farthest from the base pointer
    dtype = jnp.int8 if kernel.endswith("int8") else bf16
    if kernel.startswith("decode_attention"):
        from pallas_kernels.decode_attention import decode_attention_pallas as f

        if kernel == "decode_attention":
            one = arg(cache[1:], bf16)
            return jax.jit(f).lower(q, one, one, lengths), "kvjax_decode_attention"
        scales = (arg(cache[:-1], jnp.float32),) * 2 if dtype == jnp.int8 else ()
        step = jax.jit(lambda q, k, v, n, *s: f(q, k, v, n, last, *s))
        return step.lower(q, arg(cache, dtype), arg(cache, dtype), lengths, *scales), "kvjax_decode_attention"
    if kernel.startswith("paged_attention"):
        from pallas_kernels.paged_attention import paged_attention_pallas as f

        width = case.max_len // PAGE_SIZE
        pool = (layers, case.batch * width, cfg.num_kv_heads, PAGE_SIZE, head_dim)  # every row's pages
        scales = (arg(pool[:-1], jnp.float32),) * 2 if dtype == jnp.int8 else ()
        step = jax.jit(lambda q, k, v, t, n, *s: f(q, k, v, t, n, last, *s))
        return (step.lower(q, arg(pool, dtype), arg(pool, dtype), arg((case.batch, width), jnp.int32), lengths,
                           *scales), "kvjax_paged_attention")
    if kernel == "compact_kv":
        from pallas_kernels.compact_kv import compact_kv_pallas as f

        src = arg(cache[:-1], jnp.int32)  # a press's plan: kept slots per layer and head
        return jax.jit(f, donate_argnums=(0, 1)).lower(arg(cache, bf16), arg(cache, bf16), src, lengths), \
            "kvjax_compact_kv"
    from pallas_kernels.ccm_compress import CCMWeights, GroupMLP, ccm_compress_pallas as f

    d = head_dim
    mlp = GroupMLP(*(arg((layers, *s), bf16) for s in [(CCM_CF * d, d), (d,), (d, d), (d,), (d, d), (d,)]))
    step = jax.jit(lambda k, v, n, i, w: f(k, v, n, i, w, cf=CCM_CF, min_seq_len=CCM_MIN_SEQ_LEN),
                   donate_argnums=(0, 1))
    return step.lower(arg(cache, bf16), arg(cache, bf16), lengths, lengths, CCMWeights(mlp, mlp, mlp, mlp)), \
        "kvjax_ccm_compress"


def lower_decode_step(cfg, case: Case, devices):
    """kvjax's jitted decode step of an abstract bf16 model (nnx.eval_shape: no weights), with the
    Pallas kernels forced (KVJAX_KERNELS=pallas, read when the step traces); tensor-parallel over
    case.tensor_parallel devices with kvjax.parallel's layouts (weights, cache over KV heads)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P

    from kvjax import parallel, steps
    from kvjax.cache import KVCache, QuantizedArray
    from kvjax.models.llama import CausalLM

    mesh = parallel.make_mesh(case.tensor_parallel, devices[:case.tensor_parallel])

    def arg(shape, dtype, spec=P()):
        return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=NamedSharding(mesh, spec))

    model = nnx.eval_shape(lambda: CausalLM(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    state = jax.tree_util.tree_map_with_path(lambda path, x: arg(x.shape, x.dtype, parallel.param_spec(path)),
                                             state)
    shape = (cfg.num_layers, case.batch, cfg.num_kv_heads, case.max_len, cfg.head_dim)
    heads = parallel.kv_spec(len(shape))

    def kv():
        if case.kv_dtype == "int8":
            return QuantizedArray(arg(shape, jnp.int8, heads), arg((*shape[:-1], 1), jnp.float32, heads),
                                  jnp.dtype(jnp.bfloat16))
        return arg(shape, jnp.bfloat16, heads)

    rows = arg((case.batch,), jnp.int32)
    cache = KVCache(k=kv(), v=kv(), kv_len=rows, positions=rows)
    saved = os.environ.get("KVJAX_KERNELS")
    os.environ["KVJAX_KERNELS"] = "pallas"
    try:
        with parallel.tracing_under(mesh):
            return steps._decode.lower(graphdef, state, cache, rows, arg((case.batch,), jnp.bool_))
    finally:
        if saved is None:
            del os.environ["KVJAX_KERNELS"]
        else:
            os.environ["KVJAX_KERNELS"] = saved


def kernel_figures(dump: Path, log: str) -> dict:
    """{kernel: figures} of one compile. Calls of one kernel (a step's layers: name, name__1, ...)
    are merged: count, the first grid, and the largest of every other figure."""
    calls: dict[str, dict] = {}
    for path in dump.glob("*.thunk_sequence.txt"):
        for name, grid, threads, smem in _THUNK.findall(path.read_text()):
            sizes = [int(x) for x in threads.split(",")]
            calls.setdefault(name, {}).update(grid=[int(x) for x in grid.split(",")],
                                              threads=sizes[0] * sizes[1] * sizes[2], shared_memory_bytes=int(smem))
    for name, stack, stores, loads, registers in _PTXAS.findall(log):
        calls.setdefault(name, {}).update(registers=int(registers), stack_frame_bytes=int(stack),
                                          spill_store_bytes=int(stores), spill_load_bytes=int(loads))
    for path in dump.glob("*.ptx"):
        ptx = path.read_text()
        for name in re.findall(r"\.entry (kvjax_\w+)\(", ptx):
            calls.setdefault(name, {}).update(wgmma=ptx.count("wgmma.mma_async"), mma_sync=ptx.count("mma.sync"))
    merged: dict[str, dict] = {}
    for name, fig in sorted(calls.items()):
        out = merged.setdefault(re.sub(r"__\d+$", "", name), {"calls": 0})
        out["calls"] += 1
        out.setdefault("grid", fig.get("grid"))
        for key in FIGURES:
            if key in fig:
                out[key] = max(out.get(key, 0), fig[key])
            else:
                out.setdefault("missing", set()).add(key)
    for fig in merged.values():
        fig["missing"] = sorted(fig.get("missing", ()))
    return merged


def problems_of(figures: dict, expect: str) -> list[str]:
    """What a real H100 would suffer from, or what this check could not see."""
    problems = [] if expect in figures or f"{expect}_int8" in figures else [f"no Triton kernel {expect} compiled"]
    for name, fig in figures.items():
        if fig["missing"]:
            problems.append(f"{name}: no {', '.join(fig['missing'])} in XLA's dump/log")
        if fig.get("spill_store_bytes") or fig.get("spill_load_bytes"):
            problems.append(f"{name}: register spills ({fig['spill_store_bytes']} B stored, "
                            f"{fig['spill_load_bytes']} B loaded)")
    return problems


_ALL_REDUCE = re.compile(r"= (\w+)\[([\d,]*)\][^ ]* all-reduce(?:-start)?\(")
_OTHER_COLLECTIVE = re.compile(r" (all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "s8": 1, "u8": 1, "pred": 1}


def collectives_of(hlo: str) -> dict:
    """All-reduces (count, payload bytes, dtypes) and any other collective in a compiled module."""
    found = _ALL_REDUCE.findall(hlo)
    payload = sum(_BYTES.get(t, 4) * math.prod(int(n) for n in d.split(",") if n) for t, d in found)
    return {"all_reduce": len(found), "all_reduce_bytes": payload, "all_reduce_dtypes": sorted({t for t, _ in found}),
            "other": sorted(set(_OTHER_COLLECTIVE.findall(hlo)))}


def run_case(case: Case, devices, dump: Path) -> None:
    dump.mkdir(parents=True, exist_ok=True)
    log = dump / "xla.log"
    start = time.perf_counter()
    problems, figures, collectives = [], {}, None
    try:
        with warnings.catch_warnings(record=True) as caught, stderr_to(log):
            warnings.simplefilter("always")
            lowered, expect = lower(case, devices)
            compiled = lowered.compile(compiler_options={"xla_dump_to": str(dump)})
        figures = kernel_figures(dump, log.read_text(errors="replace"))
        problems += problems_of(figures, expect)
        problems += [f"fallback: {w.message}" for w in caught if str(w.message).startswith("pallas_kernels.")]
        if case.kernel == "decode_step":
            num_calls = len(re.findall(r'name = "kvjax_decode_attention(?:_int8)?(?:__\d+)?"', compiled.as_text()))
            num_layers = model_config(MODELS[case.model]).num_layers
            if num_calls != num_layers:
                problems.append(f"{num_calls} Triton decode_attention calls in the step for {num_layers} layers")
            if case.tensor_parallel > 1:
                collectives = collectives_of(compiled.as_text())
                cfg = model_config(MODELS[case.model])
                # Megatron: o_proj and down_proj each leave partial sums of [B, H]: 2 bf16 all-reduces per layer.
                collectives["formula_bytes"] = 2 * num_layers * case.batch * cfg.hidden_size * 2
                if collectives["all_reduce"] != 2 * num_layers or collectives["other"] or \
                        collectives["all_reduce_bytes"] != collectives["formula_bytes"]:
                    problems.append(f"collectives {collectives} differ from 2 bf16 all-reduces of [B, H] per layer")
    except Exception as e:  # noqa: BLE001  (a compile error is the finding)
        problems.append(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:500]}")
    case.result = dict(seconds=round(time.perf_counter() - start, 2), ok=not problems, problems=problems,
                       kernels=figures)
    if collectives is not None:
        case.result["collectives"] = collectives


def describe(figures: dict) -> str:
    return "; ".join(f"{name}{' x%d' % f['calls'] if f['calls'] > 1 else ''}: {f.get('threads', '?')} threads, "
                     f"{f.get('shared_memory_bytes', '?')} B smem, {f.get('registers', '?')} regs, "
                     f"spills {f.get('spill_store_bytes', '?')}/{f.get('spill_load_bytes', '?')} B"
                     for name, f in figures.items())


def markdown_table(cases) -> str:
    rows = ["| case | kernel (calls) | grid | threads | shared memory (B) | registers | spill st/ld (B) "
            "| wgmma / mma.sync | compile s |", "|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        if not c.result["ok"]:
            rows.append(f"| {c.name} | FAILED: {'; '.join(c.result['problems'])} | | | | | | | {c.result['seconds']} |")
        for name, f in c.result["kernels"].items():
            rows.append(f"| {c.name} | {name} ({f['calls']}) | {'x'.join(map(str, f.get('grid') or []))} "
                        f"| {f.get('threads', '?')} | {f.get('shared_memory_bytes', '?')} | {f.get('registers', '?')} "
                        f"| {f.get('spill_store_bytes', '?')}/{f.get('spill_load_bytes', '?')} "
                        f"| {f.get('wgmma', '?')} / {f.get('mma_sync', '?')} | {c.result['seconds']} |")
    return "\n".join(rows) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if importlib.util.find_spec("jax_plugins") is None or importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
        print("error: this Python has no jax CUDA plugin, which the compile-only H100 needs; in a separate "
              'venv: python3 -m venv .venv-gpu && .venv-gpu/bin/pip install "jax[cuda12]==<jax version>" -e .',
              file=sys.stderr)
        return 2
    target = Path(args.target_config)
    if not target.is_file():
        print(f"error: no GPU target config at {target}; pass --target-config PATH to a GpuTargetConfigProto "
              "text file (kvjax's is scripts/gpu/h100_sxm.txtpb)", file=sys.stderr)
        return 2
    try:
        cases = make_cases(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prepare_environment()
    sys.path.insert(0, str(REPO))  # a source checkout works uninstalled too
    started = time.perf_counter()
    dump_root = Path(args.dump_dir or tempfile.mkdtemp(prefix="kvjax-gpu-compile-"))
    dump_root.mkdir(parents=True, exist_ok=True)
    with stderr_to(dump_root / "startup.log"):  # the plugin's INFO lines
        topologies = {n: compile_only_devices(target.read_text(), n) for n in {c.tensor_parallel for c in cases} | {1}}
    device = topologies[1][0]
    print(f"compile-only {device.device_kind} from {target}: {len(cases)} cases, dumps in {dump_root}", flush=True)
    for i, case in enumerate(cases):
        run_case(case, topologies[case.tensor_parallel], dump_root / f"{i:03d}")
        comm = case.result.get("collectives")
        comm = f"; {comm['all_reduce']} all-reduces, {comm['all_reduce_bytes']:,} B {comm['all_reduce_dtypes']}, " \
               f"other collectives {comm['other'] or 'none'}" if comm else ""
        print(f"{'ok  ' if case.result['ok'] else 'FAIL'} {case.name:45s} {case.result['seconds']:5.1f} s  "
              + ("; ".join(case.result["problems"]) or describe(case.result["kernels"])) + comm, flush=True)
    failed = [c.name for c in cases if not c.result["ok"]]
    seconds = time.perf_counter() - started
    print(f"{len(cases) - len(failed)}/{len(cases)} cases compiled for {device.device_kind} with no error or spill "
          f"in {seconds:.0f} s" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if args.json:
        report = dict(device=f"compile-only {device.device_kind} target ({target.name})", seconds=round(seconds, 1),
                      command=" ".join([Path(sys.executable).name, sys.argv[0], *argv]), failed=failed,
                      cases=[dict(name=c.name, **dataclasses.asdict(c)) for c in cases])
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(cases))
    if not args.dump_dir and not failed:  # ~170 MB for the full matrix; kept when a case failed
        shutil.rmtree(dump_root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
