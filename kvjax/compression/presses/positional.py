"""Presses that ignore the cache contents: StreamingLLM (kvpress and seed 004) and RandomPress."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.compression.presses.base import Press, ScorerPress, protect, require, slot_index


def sinks_then_recent(inputs, num_sinks: int):
    """Recency scores with the first num_sinks slots protected: the top n_kept are the sinks plus the
    n_kept - num_sinks most recent tokens (kvpress's 0/1 scores select the same set)."""
    slots = slot_index(inputs)
    recency = jnp.broadcast_to(slots.astype(jnp.float32), inputs.keys.shape[:4])
    return protect(recency, jnp.broadcast_to(slots < num_sinks, inputs.keys.shape[1:2] + slots.shape))


@dataclasses.dataclass(frozen=True, slots=True)
class StreamingLLMPress(ScorerPress):
    """kvpress StreamingLLMPress (Xiao et al., "Efficient Streaming Language Models with Attention
    Sinks", arXiv 2309.17453): keep the first n_sink tokens and the most recent ones."""

    n_sink: int = 4

    def check(self, n):
        require(n > self.n_sink, f"StreamingLLMPress: sequence length {n} must exceed n_sink={self.n_sink}")

    def score(self, inputs):
        return sinks_then_recent(inputs, self.n_sink)


@dataclasses.dataclass(frozen=True, slots=True)
class StartRecentPress(Press):
    """Seed 004's `streaming_llm`: keep start_size first and recent_size most recent tokens
    (a fixed budget; sequences of at most start_size + recent_size tokens are left alone)."""

    start_size: int = 4
    recent_size: int = 512

    def __post_init__(self):
        require(self.start_size >= 0 and self.recent_size >= 0,
                f"streaming_llm: start_size and recent_size must be >= 0, got {self.start_size}, {self.recent_size}")
        require(self.start_size + self.recent_size > 0, "streaming_llm: start_size + recent_size must be > 0")

    def num_kept(self, n, layer, num_layers):
        return min(n, self.start_size + self.recent_size)

    def score(self, inputs):
        return sinks_then_recent(inputs, self.start_size)


@dataclasses.dataclass(frozen=True, slots=True)
class RandomPress(ScorerPress):
    """kvpress RandomPress: uniform random scores. seed None means 0 here (kvjax is reproducible);
    the numbers differ from torch's generator, so only counts can match kvpress."""

    seed: int | None = None

    def score(self, inputs):
        return jax.random.uniform(jax.random.key(self.seed or 0), inputs.keys.shape[:4])
