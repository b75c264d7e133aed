"""Recomputing a layer's queries (and keys) from its attention input, for query-aware presses.

Each model's attention module owns its projection (`Attention.project`: q/k projections, q/k
norms, full or partial RoPE), as kvpress's `get_prerope_query_states` / `compute_window_attention`
mirror the transformers modules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kvjax.models.attention import MASK_VALUE


def project(attn, h: jax.Array, kind: str = "q", positions: jax.Array | None = None) -> jax.Array:
    """h [B, T, H] -> queries [B, T, Hq, D] (kind 'q') or keys [B, T, Hkv, D] (kind 'k'),
    rotated to `positions` int32 [B, T] if given (pre-RoPE otherwise)."""
    return attn.project(h, kind, positions)


def last_rows(h: jax.Array, lengths: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    """The last `window` real rows of each sequence: (h [B, w, H], their positions int32 [B, w])."""
    positions = jnp.maximum(lengths[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :], 0)
    return jnp.take_along_axis(h, positions[:, :, None], axis=1), positions


def window_attention(queries: jax.Array, keys: jax.Array, kv_len: jax.Array) -> jax.Array:
    """Softmax attention of the last w queries of each row over all its keys, causal.

    queries [L, B, w, Hq, D] (RoPE applied, at positions kv_len - w + i); keys [L, B, Hkv, S, D].
    Returns [L, B, Hkv, G, w, S]: float32 softmax cast to the query dtype (as kvpress), 0 on
    masked slots."""
    num_layers, batch, window, num_heads, head_dim = queries.shape
    num_kv_heads = keys.shape[2]
    q = queries.reshape(num_layers, batch, window, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("lbwhgd,lbhsd->lbhgws", q, keys).astype(jnp.float32) * head_dim ** -0.5
    query_pos = kv_len[:, None] - window + jnp.arange(window, dtype=jnp.int32)[None, :]  # [B, w]
    slots = jnp.arange(keys.shape[3], dtype=jnp.int32)
    visible = slots[None, None, :] <= query_pos[:, :, None]  # [B, w, S]
    logits = jnp.where(visible[None, :, None, None], logits, MASK_VALUE)
    return jax.nn.softmax(logits, axis=-1).astype(queries.dtype)
