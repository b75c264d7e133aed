"""KV-cache quantization: int8, symmetric, one scale per token per KV head.

    cache = kvjax.compress(cache, kvjax.quantization.Int8KV())   # k and v become QuantizedArray
    logits, cache = kvjax.decode_step(model, cache, tokens)      # new tokens are quantized on write

A quantized cache is the same `KVCache` whose `k` and `v` leaves are `QuantizedArray`s (int8
values + float32 scales beside them). The model reaches the cache only through `store` and
`read_layer`, which are the plain `.at[].set` / indexing for dense arrays, so the dense path is
unchanged; attention dequantizes the layer it reads (jnp reference path; a kernel can come later).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.errors import KVJaxError

INT8_MAX = 127


@functools.partial(jax.tree_util.register_dataclass, data_fields=("values", "scales"), meta_fields=("dtype",))
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """Stands in for a [L, B, Hkv, S, D] cache array (or inference/'s [L, P, Hkv, page_size, D]
    page pool): x ~= values * scales, read back as `dtype`."""

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
    """[..., D] in x.dtype."""
    return (x.values.astype(jnp.float32) * x.scales).astype(x.dtype)


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


@dataclasses.dataclass(frozen=True, slots=True)
class Int8KV:
    """int8 per-token-per-head symmetric KV quantization, as a method for `kvjax.compress`.
    kv_len and positions are unchanged; the saving is in bytes (see `bytes_report`)."""

    name: str = "int8"


@jax.jit
def _quantize_cache(cache):
    return cache.replace(k=quantize(cache.k), v=quantize(cache.v))


def quantize_cache(cache, method: Int8KV | None = None):
    """Dense KVCache -> the same cache with int8 K/V (a new cache; the dense one stays usable)."""
    if is_quantized(cache):
        raise KVJaxError("the KV cache is already quantized")
    return _quantize_cache(cache)


@jax.jit
def _dequantize_cache(cache):
    return cache.replace(k=dequantize(cache.k), v=dequantize(cache.v))


def dequantize_cache(cache):
    """Quantized KVCache -> a dense one holding exactly the values attention reads (the reference)."""
    if not is_quantized(cache):
        raise KVJaxError("the KV cache is not quantized")
    return _dequantize_cache(cache)


def bytes_report(before, after) -> dict:
    """Bytes of valid K/V (scales included) in two caches, summed over the batch, and the saving."""
    used_before, used_after = int(np.sum(before.used_bytes())), int(np.sum(after.used_bytes()))
    return {"bytes_before": used_before, "bytes_after": used_after, "bytes_saved": used_before - used_after,
            "ratio": used_after / used_before if used_before else 1.0}
