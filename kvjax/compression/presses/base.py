"""What every press shares: its inputs, the n_kept rule, and the scorer interface.

A press scores the cached tokens of every layer and KV head (higher = keep); `kvjax.presses.apply`
keeps each row's top n_kept slots in positional order and compacts the cache. A press that reads
the prefill (queries, attention) says so with `uses_prefill` and implements `observe`, which
`kvjax.prefill_and_compress` calls per layer inside its prefill jit; key/value-only presses never pay for it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from kvjax.errors import KVJaxError

# Protected slots (sinks, windows) score above anything a press computes. kvpress uses max + 1;
# the kept *set* is the same, and a constant needs no reduction.
PROTECTED = float(jnp.finfo(jnp.float32).max)


def compute_n_kept(n: int, ratio: float) -> int:
    """kvpress 0.5.5's rule, in Python float64 with truncation (int(100 * (1 - 0.9)) == 9)."""
    if n <= 0:
        return 0
    return 0 if ratio >= 1 else max(1, int(n * (1 - ratio)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PressInputs:
    """The explicit pytree a press scores; slots of every row hold positions 0..kv_len-1 when the
    press runs right after a fresh prefill (query presses require that)."""

    keys: jax.Array  # [L, B, Hkv, S, D], after RoPE
    values: jax.Array  # [L, B, Hkv, S, D]
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]
    observations: Any = None  # per-layer pytree stacked on axis 0, from `Press.observe`; None if unused


class Press:
    """Base of all presses (frozen dataclasses, so hashable and usable as static jit arguments)."""

    uses_prefill: ClassVar[bool] = False  # True: score() reads observations recorded in the prefill

    def num_kept(self, n: int, layer: int, num_layers: int) -> int:
        """Slots a row of n valid tokens keeps at `layer` (host-side Python)."""
        raise NotImplementedError

    def check(self, n: int) -> None:
        """Refuse a sequence length the method cannot handle (host-side)."""

    def observe(self, attn, h: jax.Array, lengths: jax.Array) -> Any:
        """One layer's prefill data: attn is the layer's Attention module, h [B, T, H] its input
        (after the input norm), lengths int32 [B]. Traced inside the prefill jit."""
        return None

    def score(self, inputs: PressInputs) -> jax.Array:
        """Scores [L, B, Hkv, S] (higher = keep); slots >= kv_len are ignored by the caller.
        Must not depend on compression_ratio: budgets come from num_kept, so ratios share a compile."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, slots=True)
class ScorerPress(Press):
    """kvpress's ScorerPress: keep compute_n_kept(n, compression_ratio) tokens in every layer."""

    compression_ratio: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.compression_ratio < 1.0:
            raise KVJaxError(f"{type(self).__name__}: compression_ratio must be in [0, 1), got {self.compression_ratio!r}")

    def num_kept(self, n: int, layer: int, num_layers: int) -> int:
        return n if self.compression_ratio == 0 else compute_n_kept(n, self.compression_ratio)


def slot_index(inputs: PressInputs) -> jax.Array:
    """int32 [S]: the slot axis of the cache."""
    return jnp.arange(inputs.keys.shape[3], dtype=jnp.int32)


def protect(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Give slots where mask ([B, S], broadcast over [L, B, Hkv, S]) is True the protected score."""
    return jnp.where(mask[None, :, None, :], PROTECTED, scores)


def group_mean(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """[..., Hq, S] -> [..., Hkv, S]: mean over the query heads that share a KV head (GQA)."""
    shape = x.shape[:-2] + (num_kv_heads, x.shape[-2] // num_kv_heads, x.shape[-1])
    return x.reshape(shape).mean(axis=-2)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise KVJaxError(message)
