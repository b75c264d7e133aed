"""paged_attention: one new query token per sequence against K/V held in a pool of fixed-size pages.

The pool is `pages [L, P, Hkv, page_size, D]` (or one layer, [P, Hkv, page_size, D]); sequence b
owns pages page_table[b, :], in order, so its slot s lives at page page_table[b, s // page_size],
offset s % page_size. Only slots [0, kv_len[b]) are read: table entries past a sequence's pages
may name any page (they are masked), and the cost follows the table width the caller passes, so
a serving engine passes the narrowest bucket that covers the batch (compressed sequences own
fewer pages, hence a narrower table and less work).

`PagedKV` is the paged cache as the model sees it (kvjax.models.attention dispatches on it): the
pool plus the batch's page table, an explicit attention-metadata pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import kernel_mode

# Large finite negative (never -inf), so masked scores and empty rows stay NaN-free.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """K or V of a paged cache seen by one batch: the shared pool and the batch's page table."""

    pages: jax.Array  # [L, P, Hkv, page_size, D]
    page_table: jax.Array  # int32 [B, W]: the pages of each row, in slot order

    @property
    def dtype(self):
        return self.pages.dtype

    @property
    def page_size(self) -> int:
        return self.pages.shape[-2]

    @property
    def max_len(self) -> int:
        """Slots addressable through the table: W * page_size."""
        return self.page_table.shape[1] * self.page_size

    def write(self, layer: int, slots: jax.Array, new: jax.Array) -> PagedKV:
        """Store new [B, T, Hkv, D] at slots int32 [B, T]; slots >= max_len are dropped (padding)."""
        page_idx = jnp.minimum(slots // self.page_size, self.page_table.shape[1] - 1)
        page = jnp.take_along_axis(self.page_table, page_idx, axis=1)
        page = jnp.where(slots < self.max_len, page, self.pages.shape[1])  # out of range = dropped
        pages = self.pages.at[layer, page, :, slots % self.page_size].set(new.astype(self.dtype), mode="drop")
        return PagedKV(pages, self.page_table)

    def read_layer(self, layer: int) -> jax.Array:
        """Layer `layer` gathered through the table as a dense [B, Hkv, W * page_size, D]."""
        return gather_pages(self.pages[layer], self.page_table)


def gather_pages(pages: jax.Array,  # [..., P, Hkv, page_size, D]
                 page_table: jax.Array,  # int32 [B, W]
                 ) -> jax.Array:  # [..., B, Hkv, W * page_size, D]
    """The dense view of each row's pages (leading dims, e.g. layers, are kept)."""
    g = jnp.take(pages, page_table, axis=-4, mode="clip")  # [..., B, W, Hkv, ps, D]
    g = jnp.moveaxis(g, -3, -4)  # [..., B, Hkv, W, ps, D]
    return g.reshape(*g.shape[:-3], g.shape[-3] * g.shape[-2], g.shape[-1])


def paged_attention_reference(
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [P, Hkv, page_size, D], or [L, P, Hkv, page_size, D] with `layer`
    v_pages: jax.Array,  # same as k_pages
    page_table: jax.Array,  # int32 [B, W]
    kv_len: jax.Array,  # int32 [B]: slots [0, kv_len) are attended; kv_len <= W * page_size
    layer: int | None = None,
) -> jax.Array:  # [B, Hq, D], q.dtype
    """The definition: gather through the table, then the matmuls in the input dtype and the
    softmax in float32 (as kvjax's cached_attention); kv_len 0 gives zeros."""
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
    k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)  # [B, Hkv, S, D]
    batch, num_heads, head_dim = q.shape
    num_kv_heads, max_len = k.shape[1], k.shape[2]
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    visible = jnp.arange(max_len, dtype=jnp.int32)[None, :] < kv_len[:, None]  # [B, S]
    scores = jnp.einsum("bhgd,bhsd->bhgs", qg, k).astype(jnp.float32) * (head_dim ** -0.5)
    scores = jnp.where(visible[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    v = jnp.where(visible[:, None, :, None], v, jnp.zeros((), v.dtype))  # 0 * NaN padding would be NaN
    out = jnp.einsum("bhgs,bhsd->bhgd", probs, v)
    out = jnp.where((kv_len > 0)[:, None, None, None], out, jnp.zeros((), out.dtype))
    return out.reshape(batch, num_heads, head_dim).astype(q.dtype)


def paged_attention(q, k_pages, v_pages, page_table, kv_len, layer: int | None = None, *,
                    mode: str | None = None):
    """Dispatcher. Only the reference exists so far: every mode runs it (see the module docstring
    of inference/ for the planned kernel)."""
    kernel_mode(mode)  # validates `mode` / $KVJAX_KERNELS
    return paged_attention_reference(q, k_pages, v_pages, page_table, kv_len, layer)
