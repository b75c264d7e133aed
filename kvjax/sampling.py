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
    """logits float32 [B, V] -> token ids int32 [B]: one config and one key for the batch."""
    if sampling.is_greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = logits.shape[0]
    kept = filtered(logits, jnp.full(rows, sampling.temperature, jnp.float32), jnp.full(rows, sampling.top_k),
                    jnp.full(rows, sampling.top_p, jnp.float32))
    return jax.random.categorical(rng, kept, axis=-1).astype(jnp.int32)


def sample_rows(logits: jax.Array, seeds: jax.Array, counters: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Each row with its own config and key (the serving engine's batches mix requests):
    logits float32 [B, V]; seeds, counters int32 [B] (row b draws with key(seeds[b]) folded with
    counters[b], so its tokens do not depend on its batch); temperature, top_p float32 [B], top_k
    int32 [B], as in `Sampling` (temperature 0: greedy). -> int32 [B]."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw(_):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered(logits, temperature, top_k, top_p))
        return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    return jax.lax.cond(jnp.all(temperature <= 0), lambda _: greedy, draw, None)


def filtered(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """logits / temperature with -inf outside each row's top-k and top-p nucleus (per-row [B]
    settings; top_k 0 and top_p 1 keep every token; a row at temperature 0 is divided by 1)."""
    scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
    ranked = jnp.sort(scaled, axis=-1)[:, ::-1]
    use_k = (top_k > 0)[:, None]
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, logits.shape[-1] - 1)[:, None], axis=-1)
    scaled = jnp.where(use_k & (scaled < kth), -jnp.inf, scaled)
    ranked = jnp.where(use_k & (ranked < kth), -jnp.inf, ranked)
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest logit still inside the nucleus (the top token always is).
    num_kept = jnp.maximum(jnp.sum(mass_before < top_p[:, None], axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ranked, num_kept - 1, axis=-1)
    return jnp.where((top_p[:, None] < 1) & (scaled < threshold), -jnp.inf, scaled)
