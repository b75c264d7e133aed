"""Key-norm presses: kvpress's KnormPress and seed 004's l2_compress / fix_size_l2.

Paper: Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(arXiv 2406.11430): keys with a *low* L2 norm draw high attention, so those are kept.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kvjax.compression.presses.base import Press, PressInputs, ScorerPress, protect, require, slot_index


def key_norms(inputs: PressInputs) -> jax.Array:
    """[L, B, Hkv, S] L2 norms of the cached keys, in float32 (as kvpress 0.5.5, so bf16 does not tie)."""
    return jnp.linalg.norm(inputs.keys.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True, slots=True)
class KnormPress(ScorerPress):
    """score = -||k||: keep the compute_n_kept(n, compression_ratio) lowest-norm keys per KV head."""

    def score(self, inputs):
        return -key_norms(inputs)


@dataclasses.dataclass(frozen=True, slots=True)
class L2CompressPress(Press):
    """Seed 004's `l2_compress`: in every layer not in skip_layers, a sequence of n >= prune_after
    tokens keeps its ceil(keep_ratio * n) lowest-norm keys per KV head.

    Assumptions (the issue is the spec): ceil as in the l2compress reference code; layers in
    skip_layers keep everything, so the pressed cache holds one length per layer
    (`KVCache.layer_kv_len`) unless no layer is skipped."""

    keep_ratio: float = 1.0
    prune_after: int = 2048
    skip_layers: tuple[int, ...] = ()

    def __post_init__(self):
        require(0.0 < self.keep_ratio <= 1.0, f"l2_compress: keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        require(self.prune_after >= 0, f"l2_compress: prune_after must be >= 0, got {self.prune_after!r}")
        object.__setattr__(self, "skip_layers", tuple(int(x) for x in self.skip_layers))

    def num_kept(self, n, layer, num_layers):
        if layer in self.skip_layers or n < self.prune_after:
            return n
        return min(n, math.ceil(self.keep_ratio * n))

    def score(self, inputs):
        return -key_norms(inputs)


FIX_SIZE_STRATEGIES = ("keep_low", "keep_high", "random")


@dataclasses.dataclass(frozen=True, slots=True)
class FixSizeL2Press(Press):
    """Seed 004's `fix_size_l2`: a sequence longer than cache_size keeps exactly cache_size tokens:
    the int(protected_ratio * cache_size) most recent ones always, the rest chosen among the older
    tokens by `strategy`: keep_low (lowest key norm), keep_high (highest) or random (seeded).

    Assumption: the protected fraction is of cache_size, and it is the most recent tokens."""

    cache_size: int = 1024
    protected_ratio: float = 0.1
    strategy: str = "keep_low"
    seed: int = 0

    def __post_init__(self):
        require(self.cache_size > 0, f"fix_size_l2: cache_size must be > 0, got {self.cache_size!r}")
        require(0.0 <= self.protected_ratio <= 1.0,
                f"fix_size_l2: protected_ratio must be in [0, 1], got {self.protected_ratio!r}")
        require(self.strategy in FIX_SIZE_STRATEGIES,
                f"fix_size_l2: strategy must be one of {', '.join(FIX_SIZE_STRATEGIES)}; got {self.strategy!r}")

    def num_kept(self, n, layer, num_layers):
        return min(n, self.cache_size)

    def score(self, inputs):
        if self.strategy == "random":
            scores = jax.random.uniform(jax.random.key(self.seed), inputs.keys.shape[:4])
        else:
            norms = key_norms(inputs)
            scores = -norms if self.strategy == "keep_low" else norms
        num_protected = int(self.protected_ratio * self.cache_size)
        recent = slot_index(inputs)[None, :] >= inputs.kv_len[:, None] - num_protected
        return protect(scores, recent)
