"""compact_kv: move kept tokens (and optionally new vectors) to the front of each cache row, in place.

A row is one (layer, batch, kv head) slice `[S, D]` of the `[L, B, H, S, D]` buffers. For each
destination slot j < min(new_len[b], N) the row receives

    old[src[j]]        if src[j] <  S   (a kept token; needs src[j] >= j: tokens only move left)
    new[src[j] - S]    if src[j] >= S   (a new vector, e.g. a CCM-compressed group)

Slots at or beyond new_len are left as they were. `src` is `[Ls, B, Hs, N]` with Ls in {1, L} and
Hs in {1, H}: a plan shared by all layers or heads is passed once, not broadcast in memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import kernel_mode


def _gather_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows [L, B, H, R, D], index int32 [L, B, H, N] in [0, R) -> [L, B, H, N, D]."""
    return jnp.take_along_axis(rows, index[..., None], axis=3, mode="clip")


def compact_kv_reference(k, v, src, new_len, new_k=None, new_v=None):
    """The definition of compact_kv (see the module docstring) in plain jnp; returns (k, v)."""
    num_layers, batch, num_heads, max_len, _ = k.shape
    num_dst = src.shape[-1]
    src = jnp.broadcast_to(src, (num_layers, batch, num_heads, num_dst)).astype(jnp.int32)
    in_prefix = (jnp.arange(num_dst, dtype=jnp.int32) < new_len[:, None])[None, :, None, :, None]
    from_new = (src >= max_len)[..., None]

    def one(cache, new):
        moved = _gather_rows(cache, jnp.minimum(src, max_len - 1))
        if new is not None:
            moved = jnp.where(from_new, _gather_rows(new, jnp.maximum(src - max_len, 0)), moved)
        prefix = jnp.where(in_prefix, moved.astype(cache.dtype), cache[:, :, :, :num_dst])
        return jax.lax.dynamic_update_slice_in_dim(cache, prefix, 0, axis=3)

    return one(k, new_k), one(v, new_v)


# compact_kv_pallas(k, v, src, new_len, new_k=None, new_v=None, *, interpret=False) goes here.


def compact_kv(k, v, src, new_len, new_k=None, new_v=None, *, mode: str | None = None):
    """Dispatcher: Pallas on GPU, the reference on CPU; `mode` or $KVJAX_KERNELS overrides."""
    mode = kernel_mode(mode)
    if mode == "reference":
        return compact_kv_reference(k, v, src, new_len, new_k, new_v)
    return compact_kv_pallas(k, v, src, new_len, new_k, new_v, interpret=mode == "interpret")
