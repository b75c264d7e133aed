"""kvpress ExpectedAttentionPress (Devoto et al., "Expected Attention: KV Cache Compression by
Estimating Attention from Future Queries Distribution", arXiv 2510.00636, NVIDIA kvpress)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.models.attention import MASK_VALUE
from kvjax.models.layers import rope_frequencies
from kvjax.compression.presses.base import ScorerPress, group_mean, protect, require, slot_index
from kvjax.compression.presses.queries import project


def mean_rotation(attn, lengths, num_future: int) -> jax.Array:
    """R̄ [B, D, D] = mean of the RoPE matrices R(p) over p = n .. n + num_future - 1 (n = length).
    With partial rotary (GPT-NeoX) only the first rope_dim dims rotate; the rest is the identity."""
    head_dim, rope_dim = attn.cfg.head_dim, attn.cfg.rope_dim
    inv_freq, scale = rope_frequencies(attn.cfg.rope, rope_dim)
    future = lengths[:, None] + jnp.arange(num_future, dtype=jnp.int32)[None, :]  # [B, F]
    angles = future.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)  # [B, F, D]
    cos, sin = (jnp.cos(angles) * scale).mean(axis=1), (jnp.sin(angles) * scale).mean(axis=1)
    half = rope_dim // 2
    eye = jnp.eye(half)
    rotate_half = jnp.block([[jnp.zeros((half, half)), -eye], [eye, jnp.zeros((half, half))]])
    rotation = jax.vmap(jnp.diag)(cos) + sin[:, :, None] * rotate_half[None]  # [B, r, r]
    full = jnp.broadcast_to(jnp.eye(head_dim, dtype=rotation.dtype), (rotation.shape[0], head_dim, head_dim))
    return full.at[:, :rope_dim, :rope_dim].set(rotation)


@dataclasses.dataclass(frozen=True, slots=True)
class ExpectedAttentionPress(ScorerPress):
    """Scores keys by the attention the *future* queries are expected to give them: query mean and
    covariance of positions [n_sink, n), rotated by the average RoPE of the next
    n_future_positions positions; times ||v|| if use_vnorm. The first n_sink tokens are kept."""

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0
    uses_prefill = True

    def check(self, n):
        require(n > self.n_sink, f"ExpectedAttentionPress: sequence length {n} must exceed n_sink={self.n_sink}")

    def observe(self, attn, h, lengths):
        q = project(attn, h, "q").astype(jnp.float32)  # [B, T, Hq, D], pre-RoPE
        t = jnp.arange(h.shape[1], dtype=jnp.int32)[None, :]
        used = ((t >= self.n_sink) & (t < lengths[:, None]))[:, :, None, None]
        count = (lengths - self.n_sink).astype(jnp.float32)[:, None, None]
        mean = jnp.where(used, q, 0.0).sum(axis=1) / count  # [B, Hq, D]
        rotation = mean_rotation(attn, lengths, self.n_future_positions)  # [B, D, D]
        stats = {"mean": jnp.einsum("bij,bhj->bhi", rotation, mean)}
        if self.use_covariance:
            centered = jnp.where(used, q - mean[:, None], 0.0)
            cov = jnp.einsum("bthi,bthj->bhij", centered, centered) / count[..., None]
            stats["cov"] = jnp.einsum("bij,bhjk,blk->bhil", rotation, cov, rotation)
        return stats

    def score(self, inputs):
        head_dim, num_kv_heads = inputs.keys.shape[-1], inputs.keys.shape[2]
        slots = slot_index(inputs)
        scored = (slots[None, :] >= self.n_sink) & (slots[None, :] < inputs.kv_len[:, None])  # [B, S]

        def one_layer(args):  # per layer, so the covariance term never holds [L, ..., S, D] at once
            keys, values, stats = args
            keys = keys.astype(jnp.float32)
            mean = stats["mean"].reshape(keys.shape[0], num_kv_heads, -1, head_dim)
            z = jnp.einsum("bhgd,bhsd->bhgs", mean, keys) / head_dim ** 0.5
            if self.use_covariance:
                cov = stats["cov"].reshape(keys.shape[0], num_kv_heads, -1, head_dim, head_dim)
                z += jnp.einsum("bhsi,bhgij,bhsj->bhgs", keys, cov, keys) / head_dim / 2
            z = jnp.where(scored[:, None, None], z, MASK_VALUE)
            scores = group_mean(jax.nn.softmax(z, axis=-1).reshape(keys.shape[0], -1, keys.shape[2]), num_kv_heads)
            if self.use_vnorm:
                scores = (scores + self.epsilon) * jnp.linalg.norm(values.astype(jnp.float32), axis=-1)
            return scores

        scores = jax.lax.map(one_layer, (inputs.keys, inputs.values, inputs.observations))
        return protect(scores, slots[None, :] < self.n_sink)
