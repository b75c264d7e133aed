"""kvpress ObservedAttentionPress (H2O-like; Zhang et al., "H2O: Heavy-Hitter Oracle", arXiv
2306.14048): the attention each key received during the prefill, averaged over its observers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.models.attention import MASK_VALUE
from kvjax.compression.presses.base import ScorerPress, group_mean
from kvjax.compression.presses.queries import project


@dataclasses.dataclass(frozen=True, slots=True)
class ObservedAttentionPress(ScorerPress):
    """s_t = (sum_i A[i, t]) / (n - t), mean over the group. The only press that materialises a
    prompt's full attention ([B, Hq, T, T], one layer at a time, inside the prefill jit)."""

    uses_prefill = True

    def observe(self, attn, h, lengths):
        num_new = h.shape[1]
        positions = jnp.broadcast_to(jnp.arange(num_new, dtype=jnp.int32), h.shape[:2])
        q, k = project(attn, h, "q", positions), project(attn, h, "k", positions)
        num_kv_heads, head_dim = k.shape[2], k.shape[3]
        q = q.reshape(q.shape[0], num_new, num_kv_heads, -1, head_dim)
        logits = jnp.einsum("bihgd,bthd->bhgit", q, k).astype(jnp.float32) * head_dim ** -0.5
        t = jnp.arange(num_new, dtype=jnp.int32)
        logits = jnp.where((t[None, :] <= t[:, None])[None, None, None], logits, MASK_VALUE)
        probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype).astype(jnp.float32)  # eager: model dtype
        real_query = (t[None, :] < lengths[:, None])[:, None, None, :, None]  # padding rows observe nothing
        sums = jnp.where(real_query, probs, 0.0).sum(axis=3).reshape(q.shape[0], -1, num_new)  # [B, Hq, T]
        observers = jnp.maximum(lengths[:, None] - t[None, :], 1).astype(jnp.float32)  # n - t
        return group_mean(sums / observers[:, None, :], num_kv_heads)  # [B, Hkv, T]

    def score(self, inputs):
        scores = inputs.observations  # [L, B, Hkv, T], T <= S
        return jnp.pad(scores, [(0, 0)] * 3 + [(0, inputs.keys.shape[3] - scores.shape[-1])])
