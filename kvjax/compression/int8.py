"""int8 KV quantization as a compression method: symmetric, one scale per token per KV head.

    cache = kvjax.compress(cache, Int8KV())                 # k and v become QuantizedArray
    cache = kvjax.compress(cache, (press, Int8KV()))        # a press, then int8 on what it kept
    logits, cache = kvjax.decode_step(model, cache, tokens) # new tokens are quantized on write

The storage type and the write/read path live in `kvjax.cache`; decode kernels dequantize int8
blocks in registers (`pallas_kernels`).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from kvjax.cache import dequantize, is_quantized, quantize
from kvjax.errors import KVJaxError


@dataclasses.dataclass(frozen=True, slots=True)
class Int8KV:
    """int8 per-token-per-head symmetric KV quantization, as a method for `kvjax.compress`.
    kv_len and positions are unchanged; the saving is in bytes (see `bytes_report`)."""

    name: str = "int8"


@jax.jit
def _quantize_cache(cache):
    return cache.replace(k=quantize(cache.k), v=quantize(cache.v))


def quantize_cache(cache):
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
