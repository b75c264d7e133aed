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

    layer_kv_len (optional, None by default) gives each layer its own length, for presses with
    per-layer budgets (PyramidKV): layer l writes at and reads below layer_kv_len[l], and kv_len
    is then the largest of them, the slots a sequence occupies (capacity checks stay per sequence).
    """

    k: jax.Array  # [L, B, Hkv, S, D], keys after RoPE
    v: jax.Array  # [L, B, Hkv, S, D]
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]
    layer_kv_len: jax.Array | None = None  # int32 [L, B]; None: every layer holds kv_len

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

    def lengths_per_layer(self) -> jax.Array:
        """int32 [L, B]: the valid slots of every layer."""
        if self.layer_kv_len is not None:
            return self.layer_kv_len
        return jnp.broadcast_to(self.kv_len, (self.num_layers, self.batch))

    def used_bytes(self) -> np.ndarray:
        """Bytes of K and V held in valid slots, per sequence [B] (host array; syncs). Counts every
        leaf of k and v, so a quantized cache's scales are included (kvjax.quantization)."""
        leaves = jax.tree.leaves((self.k, self.v))
        per_slot = sum(leaf.size // (self.batch * self.max_len) * leaf.dtype.itemsize for leaf in leaves)
        layer_slots = np.asarray(self.lengths_per_layer(), np.int64).sum(axis=0)  # [B], over layers
        return layer_slots * (per_slot // self.num_layers)
