"""What the split-K decode kernels (dense `decode_attention`, `paged_attention`) share: the query
grouping, the per-split outputs, and the log-sum-exp merge of the splits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

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
