"""The dense KV cache: a pytree of the K/V buffers plus per-sequence lengths and RoPE positions."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax.config import ModelConfig
from kvjax.errors import KVJaxError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Dense cache; see DESIGN.md "The cache".

    kv_len counts valid slots (the next token is written at kv_len; attention reads [0, kv_len)).
    positions is the RoPE position of the next token: it counts real tokens and never shrinks,
    so after compression positions >= kv_len.
    """

    k: jax.Array  # [L, B, Hkv, S, D], keys after RoPE
    v: jax.Array  # [L, B, Hkv, S, D]
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]

    @classmethod
    def create(cls, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
               dtype: Any = jnp.float32) -> KVCache:
        """An empty cache (kv_len = positions = 0)."""
        for name, value in (("num_layers", num_layers), ("batch", batch),
                            ("num_kv_heads", num_kv_heads), ("max_len", max_len), ("head_dim", head_dim)):
            if int(value) <= 0:
                raise KVJaxError(f"KVCache.create: {name} must be > 0, got {value}")
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        # Distinct buffers: the steps donate every leaf, and a buffer cannot be donated twice.
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   kv_len=jnp.zeros(batch, jnp.int32), positions=jnp.zeros(batch, jnp.int32))

    @classmethod
    def for_model(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty cache shaped for `cfg`."""
        return cls.create(cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim, dtype)

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def replace(self, **changes) -> KVCache:
        return dataclasses.replace(self, **changes)

    def used_bytes(self) -> np.ndarray:
        """Bytes of K and V held in valid slots, per sequence [B] (host array; syncs). Counts every
        leaf of k and v, so a quantized cache's scales are included (kvjax.quantization)."""
        leaves = jax.tree.leaves((self.k, self.v))
        per_slot = sum(leaf.size // (self.batch * self.max_len) * leaf.dtype.itemsize for leaf in leaves)
        return np.asarray(self.kv_len, np.int64) * per_slot
