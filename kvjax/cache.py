"""The dense KV cache: a pytree of the K/V buffers plus per-sequence lengths and RoPE positions.

K/V leaves may also be int8 (`QuantizedArray`: int8 values + one float32 scale per token and KV
head). The model reaches the cache only through `store` and `read_layer`, which are plain
`.at[].set` / indexing for dense arrays, so the dense path is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.errors import KVJaxError
from pallas_kernels._splitk import dequantize as _dequantize_rows

INT8_MAX = 127


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scales"), meta_fields=("dtype",))
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Stands in for a [L, B, Hkv, S, D] cache array (or inference/'s [L, P, Hkv, page_size, D]
    page pool): x ~= values * scales, read back as `dtype` (see `kvjax.compression.int8`)."""

    values: jax.Array  # int8 [L, B, Hkv, S, D]
    scales: jax.Array  # float32 [L, B, Hkv, S, 1]: max |x| over D / 127
    dtype: Any  # the dtype attention computes in (the model's)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def ndim(self) -> int:
        return self.values.ndim


def quantize(x: jax.Array, dtype: Any = None) -> QuantizedArray:
    """x [..., D] -> int8 values and per-row scales; |x - dequantize(.)| <= scale / 2 per element."""
    x32 = x.astype(jnp.float32)
    scales = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / INT8_MAX
    safe = jnp.where(scales > 0, scales, 1.0)  # an all-zero row stays zero with scale 0
    values = jnp.clip(jnp.round(x32 / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return QuantizedArray(values, scales, jnp.dtype(dtype or x.dtype))


def dequantize(x: QuantizedArray) -> jax.Array:
    """[..., D] in x.dtype (the one dequantization, shared with the kernels)."""
    return _dequantize_rows(x.values, x.scales[..., 0], x.dtype)


def store(cache_x, layer: int, rows, slots, new: jax.Array):
    """Write new [B, T, Hkv, D] at cache_x[layer, rows, :, slots] (slot S = dropped, for padding)."""
    if isinstance(cache_x, QuantizedArray):
        q = quantize(new, cache_x.dtype)
        return QuantizedArray(cache_x.values.at[layer, rows, :, slots].set(q.values, mode="drop"),
                              cache_x.scales.at[layer, rows, :, slots].set(q.scales, mode="drop"), cache_x.dtype)
    return cache_x.at[layer, rows, :, slots].set(new.astype(cache_x.dtype), mode="drop")


def read_layer(cache_x, layer: int) -> jax.Array:
    """cache_x[layer] as [B, Hkv, S, D] in the compute dtype (dequantized if quantized)."""
    return as_dense(jax.tree.map(lambda x: x[layer], cache_x))


def kernel_operands(x) -> tuple[jax.Array, jax.Array | None]:
    """(values, scales [.., S] or None) as the Pallas attention kernels take them: int8 blocks are
    dequantized inside the kernel, so only a quarter of float32's bytes is read."""
    if isinstance(x, QuantizedArray):
        return x.values, x.scales[..., 0]
    return x, None


def as_dense(x) -> jax.Array:
    """x itself, or dequantized if it is a QuantizedArray (e.g. int8 pages gathered by the engine)."""
    return dequantize(x) if isinstance(x, QuantizedArray) else x


def is_quantized(cache) -> bool:
    """True if the KVCache holds quantized K/V."""
    return isinstance(cache.k, QuantizedArray)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Dense cache; see DESIGN.md "The cache".

    kv_len counts valid slots (the next token is written at kv_len; attention reads [0, kv_len)).
    positions is the RoPE position of the next token: it counts real tokens and never shrinks,
    so after compression positions >= kv_len.

    layer_kv_len (optional, None by default) gives each layer its own length, for presses with
    per-layer budgets (PyramidKV): layer l writes at and reads below layer_kv_len[l], and kv_len
    is then the largest of them, the slots a sequence occupies (capacity checks stay per sequence).
    """

    k: jax.Array  # [L, B, Hkv, S, D], keys after RoPE
    v: jax.Array  # [L, B, Hkv, S, D]
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]
    layer_kv_len: jax.Array | None = None  # int32 [L, B]; None: every layer holds kv_len

    @classmethod
    def create(cls, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
               dtype: Any = jnp.float32) -> KVCache:
        """An empty cache (kv_len = positions = 0)."""
        for name, value in (("num_layers", num_layers), ("batch", batch),
                            ("num_kv_heads", num_kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
            if int(value) <= 0:
                raise KVJaxError(f"KVCache.create: {name} must be > 0, got {value}")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        # Distinct buffers: the steps donate every leaf, and a buffer cannot be donated twice.
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   kv_len=jnp.zeros(batch, jnp.int32), positions=jnp.zeros(batch, jnp.int32))

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache shaped for `cfg`."""
        return cls.create(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)

    def lengths_per_layer(self) -> jax.Array:
        """int32 [L, B]: the valid slots of every layer."""
        if self.layer_kv_len is not None:
            return self.layer_kv_len
        return jnp.broadcast_to(self.kv_len, (self.num_layers, self.batch))

    def bytes_per_slot(self) -> int:
        """Bytes of K and V one slot holds across all layers (int8 scales included); shapes only."""
        leaves = jax.tree.leaves((self.k, self.v))
        return sum(leaf.size // (self.batch * self.max_len) * leaf.dtype.itemsize for leaf in leaves)

    def used_bytes(self) -> np.ndarray:
        """Bytes of K and V held in valid slots, per sequence [B] (host array; syncs). Counts every
        leaf of k and v, so a quantized cache's scales are included (kvjax.quantization)."""
        per_slot = self.bytes_per_slot()
        layer_slots = np.asarray(self.lengths_per_layer(), np.int64).sum(axis=0)  # [B], over layers
        return layer_slots * (per_slot // self.num_layers)
