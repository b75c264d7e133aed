"""Token sampling: greedy, temperature, top-k and top-p, as one frozen (static) config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.errors import KVJaxError


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise KVJaxError(f"temperature must be >= 0, got {self.temperature}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise KVJaxError(f"top_k must be an integer >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise KVJaxError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


GREEDY = Sampling()


def sample(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """logits float32 [B, V] -> token ids int32 [B]."""
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest logit still inside the nucleus (the top token always is).
        num_kept = jnp.maximum(jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True), 1)
        threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
