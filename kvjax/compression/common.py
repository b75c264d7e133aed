"""Checks and conventions every compression method shares (CCM and presses alike)."""

from __future__ import annotations

import jax
import numpy as np

from kvjax.errors import KVJaxError

# RoPE position of the next token after compression (DESIGN.md "RoPE positions after compression"):
# "original" keeps counting real tokens; "compressed" restarts from the compressed length.
ROPE_POSITIONS = ("original", "compressed")


def check_rope_positions(rope_positions: str | None) -> None:
    if rope_positions is not None and rope_positions not in ROPE_POSITIONS:
        raise KVJaxError(f"rope_positions must be one of {', '.join(ROPE_POSITIONS)}; got {rope_positions!r}")


def next_positions(cache, new_len: jax.Array, rope_positions: str) -> jax.Array:
    """The cache's `positions` after compressing it to new_len int32 [B] (traceable)."""
    return cache.positions if rope_positions == "original" else new_len


def per_row(name: str, values, batch: int) -> np.ndarray:
    """None, an int or [B] ints -> int32 [B] >= 0 (image_len, protect_last), else a KVJaxError."""
    values = np.zeros(batch, np.int32) if values is None else np.asarray(values)
    if values.ndim == 0:
        values = np.broadcast_to(values, (batch,))
    if values.shape != (batch,) or not np.issubdtype(values.dtype, np.integer) or (values < 0).any():
        raise KVJaxError(f"{name} must be {batch} non-negative integers (one per sequence), got {values.tolist()}")
    return values.astype(np.int32)
