"""Building blocks shared by the LMs: RMSNorm and RoPE (full or partial) as a function of explicit positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.config import RopeConfig


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, cast back before the weight, as HF's LlamaRMSNorm does."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


def rope_frequencies(rope: RopeConfig, head_dim: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] and the cos/sin scale, per transformers' rope types."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    scale = 1.0
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    elif rope.rope_type == "yarn":
        inv_freq, scale = _yarn(rope, head_dim, inv_freq)
    # transformers computes the frequencies in float32.
    return inv_freq.astype(np.float32), scale


def _yarn(rope: RopeConfig, dim: int, inv_freq: np.ndarray) -> tuple[np.ndarray, float]:
    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    if rope.attention_factor is not None:
        attention = rope.attention_factor
    elif rope.mscale and rope.mscale_all_dim:
        attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
    else:
        attention = mscale(factor)

    def correction_dim(num_rotations):
        old_len = rope.original_max_position_embeddings
        return dim * math.log(old_len / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    mixed = inv_freq / factor * (1 - extrapolation) + inv_freq * extrapolation
    return mixed, float(attention)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float) -> jax.Array:
    """Rotate x [B, T, H, D] at integer positions [B, T] (HF's rotate-half convention).

    inv_freq [R/2] rotates the first R dims of each head; the other D - R pass through unchanged
    (GPT-NeoX's partial rotary: pass `rope_frequencies(rope, R)`)."""
    rope_dim = 2 * inv_freq.shape[-1]
    x, x_pass = x[..., :rope_dim], x[..., rope_dim:]
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos = (jnp.cos(angles) * scale).astype(x.dtype)
    sin = (jnp.sin(angles) * scale).astype(x.dtype)
    half = rope_dim // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x = x * cos + rotated * sin
    return jnp.concatenate([x, x_pass], axis=-1) if x_pass.shape[-1] else x


def run_layers(layers, x, positions, cache_k, cache_v, write_slots, visible_len, tap=None):
    """Run decoder blocks over the cache: block(x, positions, cache_k, cache_v, layer, write_slots,
    visible_len, tap) -> (x, cache_k, cache_v). write_slots, visible_len: int32 [B, T], or
    [L, B, T] when layers hold different lengths (per-layer budgets)."""
    per_layer = write_slots.ndim == 3
    for layer, block in enumerate(layers):
        x, cache_k, cache_v = block(x, positions, cache_k, cache_v, layer,
                                    write_slots[layer] if per_layer else write_slots,
                                    visible_len[layer] if per_layer else visible_len, tap)
    return x, cache_k, cache_v
