"""decode_attention: one new query token per sequence against a ragged GQA KV cache.

q [B, Hq, D] attends over slots [0, kv_len[b]) of k, v [B, Hkv, S, D]; query head i reads KV head
i // (Hq // Hkv). With `layer=l`, k and v are a whole cache [L, B, Hkv, S, D] and layer l is read
in place: slicing it first would make XLA copy the layer before the kernel on every step. Scores are q.k / sqrt(D) softmaxed in float32; kv_len 0 gives zeros. Slots at or
past kv_len are never read by the kernel (and may hold anything, NaN included), so a compacted
cache costs time in proportion to its kv_len, not to S.

An int8 cache passes its float32 scales (k_scales, v_scales: k's shape without D); the kernel
reads int8 blocks and dequantizes them in registers, so it moves a quarter of float32's bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._dispatch import choose_mode
from pallas_kernels._splitk import (MASK_VALUE, MIN_DOT, TARGET_PROGRAMS, decode_split, dequantize,
                                    head_dim_reason, split_call)



def attention_reference(
    q: jax.Array,  # [B, T, Hq, D]
    k: jax.Array,  # [B, Hkv, S, D]
    v: jax.Array,  # [B, Hkv, S, D]
    visible_len: jax.Array,  # int32 [B, T]: query (b, t) reads slots [0, visible_len[b, t])
) -> jax.Array:  # [B, T, Hq, D], q.dtype
    """GQA attention of T queries per row over a dense cache, the definition every path equals: as
    HF's eager attention, the matmuls in the input dtype, the mask and softmax in float32."""
    batch, num_new, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k.shape[1], k.shape[2]
    qg = q.reshape(batch, num_new, num_kv_heads, num_heads // num_kv_heads, head_dim)
    visible = jnp.arange(max_len, dtype=jnp.int32)[None, None, :] < visible_len[:, :, None]  # [B, T, S]
    scores = jnp.einsum("bthgd,bhsd->bhgts", qg, k).astype(jnp.float32) * (head_dim ** -0.5)
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    v = jnp.where(visible.any(axis=1)[:, None, :, None], v, jnp.zeros((), v.dtype))  # 0 * NaN padding is NaN
    out = jnp.einsum("bhgts,bhsd->bthgd", probs, v)
    out = jnp.where((visible_len > 0)[:, :, None, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(batch, num_new, num_heads, head_dim).astype(q.dtype)


def decode_attention_reference(
    q: jax.Array,  # [B, Hq, D]
    k: jax.Array,  # [B, Hkv, S, D]
    v: jax.Array,  # [B, Hkv, S, D]
    kv_len: jax.Array,  # int32 [B]: slots [0, kv_len) are attended
    layer: int | None = None,  # given: k, v are [L, B, Hkv, S, D]
    k_scales: jax.Array | None = None,  # float32, k.shape[:-1]: k and v are int8 (kvjax.cache.QuantizedArray)
    v_scales: jax.Array | None = None,
) -> jax.Array:  # [B, Hq, D], q.dtype
    """The definition: `attention_reference` of one query per row (int8 K/V dequantized first)."""
    if layer is not None:
        k, v = k[layer], v[layer]
        k_scales, v_scales = (None if x is None else x[layer] for x in (k_scales, v_scales))
    k, v = dequantize(k, k_scales, q.dtype), dequantize(v, v_scales, q.dtype)
    return attention_reference(q[:, None], k, v, kv_len[:, None])[:, 0]


@dataclasses.dataclass(frozen=True, slots=True)
class DecodeAttentionBlocks:
    """Tiling knobs. block_k: KV slots per inner step (a power of two >= 16 dividing S, lowered to
    fit). num_splits: programs sharing one (sequence, KV head); None picks enough to fill the GPU."""

    block_k: int = 64
    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2


def unsupported_reason(q_shape, k_shape) -> str | None:
    """Why the Pallas kernel cannot take these shapes (the dispatcher then uses the reference)."""
    head_dim, max_len = q_shape[-1], k_shape[-2]
    if reason := head_dim_reason(head_dim):
        return reason
    if _compat.largest_power_of_2_dividing(max_len, 1 << 30) < MIN_DOT:
        return f"max_len {max_len} is not a multiple of {MIN_DOT}"
    return None


def _decode_kernel(kv_len_ref, q_ref, k_ref, v_ref, *refs, block_k, num_splits, scale, quantized):
    """One (sequence, KV head, split) over the split's share of the blocks of block_k slots.
    q_ref [Hp, D]; k_ref, v_ref [S, D]; refs: (scales [S] if quantized), o [Hp, D], m, l [Hp]."""
    decode_split(kv_len_ref, q_ref, k_ref, v_ref, refs, block=block_k, num_splits=num_splits, scale=scale,
                 quantized=quantized, locate=lambda i: pl.ds(pl.multiple_of(i * block_k, block_k), block_k))


def decode_attention_pallas(
    q: jax.Array,  # [B, Hq, D]
    k: jax.Array,  # [B, Hkv, S, D]
    v: jax.Array,  # [B, Hkv, S, D]
    kv_len: jax.Array,  # int32 [B]
    layer: int | None = None,  # given: k, v are [L, B, Hkv, S, D], layer read in place
    k_scales: jax.Array | None = None,  # float32, k.shape[:-1]: k and v are int8
    v_scales: jax.Array | None = None,
    *,
    block_k: int = 64,
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D], q.dtype
    """Split-K flash decoding; one program per (sequence, KV head, split), the group's query heads
    padded to >= 16 rows for the tensor-core dot, partial results merged by log-sum-exp."""
    return _decode_attention_pallas(q, k, v, kv_len, k_scales, v_scales, layer,
                                    DecodeAttentionBlocks(block_k, num_splits), interpret)


@functools.partial(jax.jit, static_argnums=(6, 7, 8))
def _decode_attention_pallas(q, k, v, kv_len, k_scales, v_scales, layer, blocks: DecodeAttentionBlocks,
                             interpret: bool):
    batch, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k.shape[-3], k.shape[-2]
    if (k.shape != v.shape or k.ndim != (4 if layer is None else 5) or k.shape[-4] != batch
            or k.shape[-1] != head_dim or num_heads % num_kv_heads):
        raise ValueError(f"decode_attention: q {q.shape} does not fit k {k.shape} / v {v.shape}")
    reason = unsupported_reason(q.shape, k.shape)
    if reason:
        raise ValueError(f"decode_attention_pallas: {reason}; use decode_attention (falls back)")
    if not _compat.is_power_of_2(blocks.block_k) or blocks.block_k < MIN_DOT:
        raise ValueError(f"decode_attention_pallas: block_k must be a power of two >= 16, got {blocks.block_k}")
    _compat.quiet_triton_deprecation()
    block_k = _compat.largest_power_of_2_dividing(max_len, blocks.block_k)
    num_splits = blocks.num_splits or min(max_len // block_k, 16,
                                          pl.cdiv(TARGET_PROGRAMS, batch * num_kv_heads))
    num_splits = max(1, min(num_splits, max_len // block_k))
    if layer is None:
        kv_spec = pl.BlockSpec((None, None, max_len, head_dim), lambda b, h, s: (b, h, 0, 0))
        scale_spec = pl.BlockSpec((None, None, max_len), lambda b, h, s: (b, h, 0))
    else:
        kv_spec = pl.BlockSpec((None, None, None, max_len, head_dim), lambda b, h, s: (layer, b, h, 0, 0))
        scale_spec = pl.BlockSpec((None, None, None, max_len), lambda b, h, s: (layer, b, h, 0))
    return split_call(functools.partial(_decode_kernel, block_k=block_k), q, kv_len, (), k, v, k_scales, v_scales,
                      num_kv_heads=num_kv_heads, num_splits=num_splits, extra_specs=(), kv_spec=kv_spec,
                      scale_spec=scale_spec, blocks=blocks, interpret=interpret, name="kvjax_decode_attention")


def decode_attention(q, k, v, kv_len, layer: int | None = None, k_scales=None, v_scales=None, *,
                     mode: str | None = None):
    """Dispatcher: Pallas on GPU, the reference on CPU; `mode` or $KVJAX_KERNELS overrides, and
    shapes the kernel cannot take use the reference with a one-time warning."""
    mode = choose_mode("decode_attention", mode, unsupported_reason(q.shape, k.shape))
    if mode == "reference":
        return decode_attention_reference(q, k, v, kv_len, layer, k_scales, v_scales)
    return decode_attention_pallas(q, k, v, kv_len, layer, k_scales, v_scales, interpret=mode == "interpret")
