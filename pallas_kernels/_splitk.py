"""What the split-K decode kernels (dense `decode_attention`, `paged_attention`) share: the query
grouping, the per-split outputs, and the log-sum-exp merge of the splits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat

# Large finite negative (never -inf), so masked scores and empty rows stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
MIN_DOT = 16  # Triton's smallest dot dimension
TARGET_PROGRAMS = 512  # enough (sequence, head, split) programs to fill an H100/H200 a few times over


def group_queries(q: jax.Array, num_kv_heads: int) -> tuple[jax.Array, int]:
    """q [B, Hq, D] -> ([B, Hkv, rows, D] with each KV head's query group padded to rows >= 16
    for the tensor-core dot, rows)."""
    batch, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    rows = max(MIN_DOT, pl.next_power_of_2(group))
    qg = q.reshape(batch, num_kv_heads, group, head_dim)
    return jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0))), rows


def split_outputs(batch: int, num_kv_heads: int, num_splits: int, rows: int, head_dim: int):
    """(out_specs, out_shape) of a kernel on grid (b, h, s) writing per split an unnormalised
    output [rows, D] and its running max and denominator [rows], all float32."""
    stat_spec = pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))
    stat_shape = jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows), jnp.float32)
    out_specs = [pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (b, h, s, 0, 0)),
                 stat_spec, stat_spec]
    out_shape = [jax.ShapeDtypeStruct((batch, num_kv_heads, num_splits, rows, head_dim), jnp.float32),
                 stat_shape, stat_shape]
    return out_specs, out_shape


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array, q: jax.Array) -> jax.Array:  # noqa: E741
    """Log-sum-exp merge of the splits -> [B, Hq, D] in q's dtype. An empty split has l = 0 and
    weight exp(MASK - max) = 0; a sequence with kv_len 0 (every split empty) gives zeros."""
    batch, num_heads, head_dim = q.shape
    group = num_heads // o.shape[1]
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # [B, Hkv, ns, rows]
    denom = (l * weight).sum(axis=2)
    out = (o * weight[..., None]).sum(axis=2)
    out = out / jnp.where(denom > 0, denom, 1.0)[..., None]
    return out[:, :, :group].reshape(batch, num_heads, head_dim).astype(q.dtype)


def dequantize(values: jax.Array, scales: jax.Array | None, dtype) -> jax.Array:
    """int8 values [..., n, D] with float32 scales [..., n] -> [..., n, D] in dtype, exactly as
    kvjax.quantization.dequantize; values pass through unchanged when scales is None."""
    if scales is None:
        return values
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def split_blocks(num_blocks, num_splits: int):
    """[first, last) of the blocks this program (split = program_id 2) walks. Splits divide the
    *valid* blocks, so a short sequence still spreads over all its programs."""
    per_split = pl.cdiv(num_blocks, num_splits)
    first = pl.program_id(2) * per_split
    return first, jnp.minimum(first + per_split, num_blocks)


def online_softmax(q, first, last, load_block, scale: float):
    """Flash-decoding over blocks [first, last) inside a kernel: load_block(i) -> (k [n, D],
    v [n, D], valid bool [n]). Returns the unnormalised output [rows, D], running max and
    denominator [rows], in float32; an empty range leaves m = MASK_VALUE and l = 0."""
    rows = q.shape[0]

    def step(block, carry):
        o, m, l = carry  # noqa: E741
        k, v, valid = load_block(block)
        scores = _compat.dot(q, k, trans_b=True) * scale  # [rows, n]
        scores = jnp.where(valid[None, :], scores, MASK_VALUE)
        m_new = jnp.maximum(m, scores.max(axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])
        v = jnp.where(valid[:, None], v, jnp.zeros((), v.dtype))  # 0 * NaN padding would be NaN
        o = o * correction[:, None] + _compat.dot(p.astype(v.dtype), v)
        return o, m_new, l * correction + p.sum(axis=1)

    init = (jnp.zeros((rows, q.shape[1]), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    return lax.fori_loop(first, last, step, init)
