"""What the split-K decode kernels (dense `decode_attention`, `paged_attention`) share: the
program body (`decode_split`: block walk, int8 dequantization, online softmax), the pallas_call
around it (`split_call`: query grouping, per-split outputs, log-sum-exp merge), and the head_dim
check. The two kernels differ only in how a block is located: a slot range, or a page."""

from __future__ import annotations

import functools

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
    """int8 values [..., n, D] with float32 scales [..., n] -> [..., n, D] in dtype, the one
    definition (kvjax.cache.dequantize calls it); values pass through unchanged when scales is None."""
    if scales is None:
        return values
    return (values.astype(jnp.float32) * scales[..., None]).astype(dtype)


def split_call(kernel, q, kv_len, extra, k, v, k_scales, v_scales, *, num_kv_heads: int, num_splits: int,
               extra_specs, kv_spec, scale_spec, blocks, interpret: bool, name: str) -> jax.Array:
    """Run a split-K decode kernel on grid (B, Hkv, splits) and merge the splits -> [B, Hq, D].

    The kernel gets kv_len, *extra (e.g. the page table), the grouped queries, k, v, the float32
    int8 scales if given (kernel(..., quantized=True)), then the outputs of `split_outputs`."""
    batch, _, head_dim = q.shape
    qg, rows = group_queries(q, num_kv_heads)
    quantized = k_scales is not None
    scales = (k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)) if quantized else ()
    out_specs, out_shape = split_outputs(batch, num_kv_heads, num_splits, rows, head_dim)
    o, m, l = pl.pallas_call(  # noqa: E741
        functools.partial(kernel, num_splits=num_splits, scale=head_dim ** -0.5, quantized=quantized),
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[pl.BlockSpec((None,), lambda b, h, s: (b,)), *extra_specs,
                  pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  kv_spec, kv_spec, *[scale_spec] * len(scales)],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compat.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name=name + ("_int8" if quantized else ""),
    )(kv_len.astype(jnp.int32), *extra, qg, k, v, *scales)
    return merge_splits(o, m, l, q)


def split_blocks(num_blocks, num_splits: int):
    """[first, last) of the blocks this program (split = program_id 2) walks. Splits divide the
    *valid* blocks, so a short sequence still spreads over all its programs."""
    per_split = pl.cdiv(num_blocks, num_splits)
    first = pl.program_id(2) * per_split
    return first, jnp.minimum(first + per_split, num_blocks)


def head_dim_reason(head_dim: int) -> str | None:
    """Why a split-K kernel cannot take this head_dim (the tensor-core dot needs a power of two >= 16)."""
    if not _compat.is_power_of_2(head_dim) or head_dim < MIN_DOT:
        return f"head_dim {head_dim} is not a power of two >= {MIN_DOT}"
    return None


def decode_split(kv_len_ref, q_ref, k_ref, v_ref, refs, *, block: int, num_splits: int, scale: float,
                 quantized: bool, locate) -> None:
    """The body of one (sequence, KV head, split) program of both decode kernels: walk the split's
    share of the blocks of `block` slots that hold [0, kv_len) and write its partial result.

    refs: (k and v scale refs if quantized, int8 blocks are dequantized in registers), then the
    outputs o [Hp, D], m, l [Hp] (float32). locate(i) -> the index of block i into k_ref / v_ref
    and the scale refs (a slot range of a dense row, or a page looked up in the table)."""
    scale_refs, (o_ref, m_ref, l_ref) = (refs[:2], refs[2:]) if quantized else ((None, None), refs)
    kv_len = kv_len_ref[()]
    first, last = split_blocks(pl.cdiv(kv_len, block), num_splits)

    def load_block(index):
        at = locate(index)
        valid = index * block + lax.broadcasted_iota(jnp.int32, (block,), 0) < kv_len  # only the last block is partial
        k, v = (dequantize(ref[at], None if s is None else s[at], q_ref.dtype)
                for ref, s in zip((k_ref, v_ref), scale_refs))
        return k, v, valid

    o_ref[...], m_ref[...], l_ref[...] = online_softmax(q_ref[...], first, last, load_block, scale)


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
