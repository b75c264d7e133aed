"""Tensor parallelism over a `jax.sharding.Mesh` axis, and several hosts through `jax.distributed`.

Megatron-style layouts on one mesh axis, "tp": the q/k/v and gate/up projections are split by
output columns (whole heads per device), o and down by input rows, so each layer needs one
all-reduce after attention and one after the MLP, which XLA inserts (GSPMD). Embeddings, lm_head,
norms and vision towers stay replicated (small beside the layers and the KV cache). The KV cache,
dense or paged, int8 included, is split over KV heads: each device holds Hkv / tp heads of every
layer, so attention, CCM (its MLPs act per head) and per-head presses run with no cross-device
traffic; a press that reduces over heads gets the collective XLA inserts for it. Pallas kernels
cannot be partitioned by XLA, so they run per shard under `shard_map` (`per_shard`).

The mesh travels with the weights: `shard_model` places them, the steps read the mesh back from
their shardings (`mesh_of`), place a cache that is not yet on it, and trace under it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kvjax.errors import KVJaxError

AXIS = "tp"
# Module names (HF's, so every family maps) split by output columns / input rows.
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "query_key_value", "dense_h_to_4h")
ROW_PARALLEL = ("o_proj", "down_proj", "dense", "dense_4h_to_h")
# The LM's decoder layers; vision towers (vision_tower, vpm, resampler) stay replicated.
_LM_LAYERS = ("layers",)
_VISION = ("vision_tower", "vpm", "resampler", "multi_modal_projector")


def make_mesh(tensor_parallel: int, devices=None) -> jax.sharding.Mesh:
    """A 1-D mesh of `tensor_parallel` devices (default: the first ones of jax.devices(), which spans
    every process after `initialize_distributed`)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise KVJaxError(f"--tensor-parallel must be a positive integer, got {tensor_parallel!r}")
    if tensor_parallel > len(devices):
        raise KVJaxError(f"--tensor-parallel {tensor_parallel} needs {tensor_parallel} devices but "
                         f"{len(devices)} are visible ({devices[0].platform}); lower it, or on CPU set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={tensor_parallel}")
    return jax.sharding.Mesh(np.asarray(devices[:tensor_parallel]), (AXIS,),
                             axis_types=(jax.sharding.AxisType.Auto,))


def tp_size(mesh) -> int:
    """The tensor-parallel size of a Mesh or AbstractMesh (1 for None or an empty one)."""
    return 1 if mesh is None or mesh.empty else int(mesh.shape.get(AXIS, 1))


def check_divisible(cfg, tensor_parallel: int) -> None:
    """KV heads (and query heads, MLP width) must split evenly: each device holds whole heads."""
    for name in ("num_kv_heads", "num_heads", "intermediate_size"):
        value = getattr(cfg, name)
        if value % tensor_parallel:
            raise KVJaxError(f"the model's {name} ({value}) is not divisible by --tensor-parallel "
                             f"{tensor_parallel}; choose a size that divides {value} (KV heads are never "
                             "split inside a head and are not replicated)")


def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_spec(path) -> P:
    """The PartitionSpec of one parameter, by its HF path (nnx Linear kernels are [in, out])."""
    names = [n for n in _names(path) if n != "value"]
    if not any(n in _LM_LAYERS for n in names) or any(n in _VISION for n in names) or len(names) < 2:
        return P()
    module, leaf = names[-2], names[-1]
    if module in COLUMN_PARALLEL:
        return P(None, AXIS) if leaf == "kernel" else P(AXIS)
    if module in ROW_PARALLEL and leaf == "kernel":
        return P(AXIS, None)
    return P()


def placement(model, mesh) -> Callable[[tuple], NamedSharding]:
    """parameter path -> its NamedSharding on `mesh`, for `model` (an eval_shape'd one will do: the
    loaders place each tensor as it is read, never whole on one device); checks the model splits."""
    cfg = getattr(getattr(model, "cfg", None), "text", None) or model.cfg
    check_divisible(cfg, tp_size(mesh))
    return lambda path: NamedSharding(mesh, param_spec(path))


def shard_model(model, mesh):
    """Place an NNX model's weights on `mesh` (in place; returns the model). tp 1 is a no-op
    placement on the mesh's single device."""
    from flax import nnx

    where = placement(model, mesh)
    nnx.update(model, jax.tree_util.tree_map_with_path(lambda path, x: jax.device_put(x, where(path)),
                                                       nnx.state(model)))
    return model


def replicate_module(module, mesh) -> None:
    """Put an NNX module's state whole on every device of `mesh` (in place; once: later calls find
    it there), e.g. a CCM compressor beside a tensor-parallel cache."""
    from flax import nnx

    state = nnx.state(module)
    replicated = NamedSharding(mesh, P())
    if all(has_sharding(x, replicated) for x in jax.tree.leaves(state)):
        return
    nnx.update(module, jax.device_put(state, replicated))


def mesh_of(tree) -> jax.sharding.Mesh | None:
    """The tensor-parallel mesh a pytree's arrays live on, or None (single device)."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and AXIS in sharding.mesh.shape:
            return sharding.mesh
    return None


def kv_spec(ndim: int) -> P:
    """K/V arrays ([L, B, Hkv, S, D], pages [L, P, Hkv, page, D], int8 scales alike): heads on axis 2."""
    return P(None, None, AXIS, *([None] * (ndim - 3)))


def cache_shardings(cache, mesh):
    """The intended sharding of every leaf of a KVCache / PagedKVCache: K/V split over KV heads,
    lengths and positions replicated."""
    def leaf(x):
        return NamedSharding(mesh, kv_spec(x.ndim) if x.ndim >= 4 else P())
    return jax.tree.map(leaf, cache)


def shard_cache(cache, mesh):
    """The cache on `mesh` (a no-op for a cache already there)."""
    if mesh is None:
        return cache
    shardings = cache_shardings(cache, mesh)
    if all(has_sharding(x, s) for x, s in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings))):
        return cache
    return jax.device_put(cache, shardings)


def has_sharding(x, sharding) -> bool:
    """Whether x is laid out as `sharding` (equivalence: a 1-device mesh's P() is its P(.., 'tp'))."""
    current = getattr(x, "sharding", None)
    return current is not None and current.is_equivalent_to(sharding, x.ndim)


def zeros(shape, dtype, mesh):
    """An array of zeros created on the mesh with the K/V layout (never whole on one device)."""
    import jax.numpy as jnp

    shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
    if mesh is None:
        return jnp.zeros(shape, dtype)
    spec = kv_spec(len(shape)) if len(shape) >= 4 else P()
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=NamedSharding(mesh, spec))()


def tracing_under(mesh):
    """Context for calling a jitted step: the mesh becomes the one `per_shard` kernels see."""
    if mesh is None or tp_size(mesh) == 1:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def current_tp() -> int:
    """The tensor-parallel size of the mesh being traced under (1 outside `tracing_under`)."""
    return tp_size(jax.sharding.get_abstract_mesh())


def per_shard(fn: Callable, args: tuple, specs: tuple, out_specs):
    """fn(*args) on one device; under a tensor-parallel mesh, fn per shard (jax.shard_map over the
    context mesh), for Pallas kernels, which XLA cannot partition. specs (one per arg; None args
    are passed through) name AXIS where an operand is split over heads, P() where it is replicated."""
    if current_tp() == 1:
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]

    def local(*xs):
        full = [None] * len(args)
        for i, x in zip(present, xs):
            full[i] = x
        return fn(*full)

    return jax.shard_map(local, in_specs=tuple(specs[i] for i in present), out_specs=out_specs,
                         check_vma=False)(*(args[i] for i in present))


LAYER_HEADS = P(None, None, AXIS)  # [L, B, Hkv, S, D] caches, [L, P, Hkv, page, D] pages, their scales
HEADS = P(None, AXIS)  # [B, Hq, D] decode queries, [B, Hkv, S, D] one layer of a cache
REPLICATED = P()


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids: Any = None) -> None:
    """Join a multi-host run (jax.distributed): arguments from flags, else from the environment
    (KVJAX_COORDINATOR, KVJAX_NUM_PROCESSES, KVJAX_PROCESS_ID, or what jax.distributed reads itself
    on SLURM / Open MPI / TPU pods). Afterwards jax.devices() lists every host's devices, so
    `make_mesh` spans them; every process runs the same program on the same inputs."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("KVJAX_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _int_env("KVJAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _int_env("KVJAX_PROCESS_ID")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise KVJaxError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
    # CPU devices of different processes talk over TCP (gloo); GPUs use NCCL whatever this says.
    # (No backend call before initialize: that would start JAX single-process.)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids)
    except (RuntimeError, ValueError) as e:
        raise KVJaxError(f"jax.distributed.initialize failed ({e}); check --coordinator (host:port reachable "
                         "from every process), --num-processes and --process-id") from e


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise KVJaxError(f"${name} must be an integer, got {value!r}") from None
