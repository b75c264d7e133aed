"""Presses scored by the attention of the prompt's last queries: SnapKV, PyramidKV, TOVA.

All three recompute the window attention from the recorded window queries (kvpress does the same
under sdpa), never the full prompt attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.compression.presses.base import ScorerPress, protect, require, slot_index
from kvjax.compression.presses.queries import last_rows, project, window_attention


def observe_window(attn, h, lengths, window: int) -> jax.Array:
    """[B, w, Hq, D]: RoPE'd queries of each row's last `window` tokens."""
    rows, positions = last_rows(h, lengths, window)
    return project(attn, rows, "q", positions)


def window_scores(inputs, window: int, kernel_size: int) -> jax.Array:
    """SnapKV's scores [L, B, Hkv, S]: mean window attention, zero-padded average pooling (divisor
    kernel_size), mean over the group; the window itself is protected."""
    slots = slot_index(inputs)
    before_window = slots[None, :] < (inputs.kv_len - window)[:, None]  # [B, S]
    pad = kernel_size // 2

    def one_layer(args):  # a layer at a time: its [B, Hkv, G, w, S] probabilities stay in cache (~20% on CPU)
        queries, keys = args
        probs = window_attention(queries[None], keys[None], inputs.kv_len)[0].astype(jnp.float32)
        scores = jnp.where(before_window[:, None, None], probs.mean(axis=3), 0.0)  # [B, Hkv, G, S]
        pooled = jax.lax.reduce_window(scores, 0.0, jax.lax.add, (1, 1, 1, kernel_size), (1,) * 4,
                                       [(0, 0)] * 3 + [(pad, pad)]) / kernel_size
        return pooled.mean(axis=2)

    return protect(jax.lax.map(one_layer, (inputs.observations, inputs.keys)), ~before_window)


@dataclasses.dataclass(frozen=True, slots=True)
class SnapKVPress(ScorerPress):
    """kvpress SnapKVPress (Li et al., "SnapKV: LLM Knows What You are Looking for Before
    Generation", arXiv 2404.14469)."""

    window_size: int = 64
    kernel_size: int = 5
    uses_prefill = True

    def check(self, n):
        require(n > self.window_size, f"SnapKVPress: sequence length {n} must exceed window_size={self.window_size}")

    def observe(self, attn, h, lengths):
        return observe_window(attn, h, lengths, self.window_size)

    def score(self, inputs):
        return window_scores(inputs, self.window_size, self.kernel_size)


def pyramid_budgets(n: int, ratio: float, window: int, beta: int, num_layers: int) -> list[int]:
    """kvpress 0.5.5 PyramidKV budgets per layer (Python round, as kvpress)."""
    capacity = window + n * (1 - ratio)
    low = (capacity - window) / beta
    high = 2 * (capacity - window) - low
    if high >= n - window:
        high = n - window
        low = 2 * (capacity - window) - high
    if not n >= high >= low >= window:
        return [max(1, round(n * (1 - ratio)))] * num_layers
    step = (high - low) / (num_layers - 1) if num_layers > 1 else 0
    return [round(high - layer * step) for layer in range(num_layers)]


@dataclasses.dataclass(frozen=True, slots=True)
class PyramidKVPress(SnapKVPress):
    """kvpress PyramidKVPress (Cai et al., "PyramidKV", arXiv 2406.02069): SnapKV scores with
    budgets that shrink linearly with depth. `kvjax.compress` gives the cache one length per
    layer (`KVCache.layer_kv_len`); decode then reads and appends per layer."""

    beta: int = 20

    def num_kept(self, n, layer, num_layers):
        if self.compression_ratio == 0:
            return n
        return pyramid_budgets(n, self.compression_ratio, self.window_size, self.beta, num_layers)[layer]


@dataclasses.dataclass(frozen=True, slots=True)
class TOVAPress(ScorerPress):
    """kvpress TOVAPress (Oren et al., "Transformers are Multi-State RNNs", arXiv 2401.06104): the
    last query's attention averaged over *all* query heads, so every KV head keeps the same set."""

    uses_prefill = True

    def check(self, n):
        require(n > 1, f"TOVAPress: sequence length {n} must exceed 1")

    def observe(self, attn, h, lengths):
        return observe_window(attn, h, lengths, 1)

    def score(self, inputs):
        probs = window_attention(inputs.observations, inputs.keys, inputs.kv_len).astype(jnp.float32)
        scores = probs[:, :, :, :, 0].mean(axis=(2, 3))[:, :, None, :]  # [L, B, 1, S]
        last = slot_index(inputs)[None, :] >= (inputs.kv_len - 1)[:, None]
        return protect(jnp.broadcast_to(scores, inputs.keys.shape[:4]), last)

