"""paged_attention: one new query token per sequence against K/V held in a pool of fixed-size pages.

The pool is `pages [L, P, Hkv, page_size, D]` (or one layer, [P, Hkv, page_size, D]); sequence b
owns pages page_table[b, :], in order, so its slot s lives at page page_table[b, s // page_size],
offset s % page_size. Only slots [0, kv_len[b]) are read: table entries past a sequence's pages
may name any page, NaN-filled ones included. The reference gathers the whole table (its cost
follows the table width, so a serving engine passes the narrowest bucket covering the batch); the
Pallas kernel (split-K flash decoding, one program per sequence, KV head and split) looks each page
up in the table inside the kernel and walks only the sequence's valid pages, so its cost follows
kv_len and a compressed sequence costs less. It reads the pool in place (with `layer`, the whole
[L, P, Hkv, page_size, D] pool is passed and layer l read without a copy).

`PagedKV` is the paged cache as the model sees it (kvjax.models.attention dispatches on it): the
pool plus the batch's page table, an explicit attention-metadata pytree.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._dispatch import choose_mode
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels._splitk import MIN_DOT, TARGET_PROGRAMS, decode_split, head_dim_reason, split_call



@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKV:
    """K or V of a paged cache seen by one batch: the shared pool and the batch's page table.
    pages may also be a pytree of pools with the same page axes (kvjax's int8 pages: values and
    scales); `locate` and `read_layer` treat every leaf alike."""

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

    def locate(self, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(page, offset) int32 [B, T] of slots int32 [B, T]; slots >= max_len get page P (dropped
        by a `mode="drop"` write: padding). A write is `pages.at[layer, page, :, offset].set(...)`."""
        page_idx = jnp.minimum(slots // self.page_size, self.page_table.shape[1] - 1)
        page = jnp.take_along_axis(self.page_table, page_idx, axis=1)
        num_pages = jax.tree.leaves(self.pages)[0].shape[-4]
        return jnp.where(slots < self.max_len, page, num_pages), slots % self.page_size

    def read_layer(self, layer: int):
        """Layer `layer` gathered through the table as a dense [B, Hkv, W * page_size, D] (each leaf)."""
        return jax.tree.map(lambda pages: gather_pages(pages[layer], self.page_table), self.pages)


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
    k_scales: jax.Array | None = None,  # float32, k_pages.shape[:-1]: int8 pages (kvjax.quantization)
    v_scales: jax.Array | None = None,
) -> jax.Array:  # [B, Hq, D], q.dtype
    """The definition: gather through the table, then the matmuls in the input dtype and the
    softmax in float32 (as kvjax's cached_attention); kv_len 0 gives zeros."""
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scales, v_scales = (None if x is None else x[layer] for x in (k_scales, v_scales))
    k, v = gather_pages(k_pages, page_table), gather_pages(v_pages, page_table)  # [B, Hkv, S, D]
    # Scales [P, Hkv, ps] gather as pages with a unit D axis.
    k_scales, v_scales = (None if x is None else gather_pages(x[..., None], page_table)[..., 0]
                          for x in (k_scales, v_scales))
    return decode_attention_reference(q, k, v, kv_len, None, k_scales, v_scales)


@dataclasses.dataclass(frozen=True, slots=True)
class PagedAttentionBlocks:
    """Tiling knobs. One inner step reads one page (page_size slots). num_splits: programs sharing
    one (sequence, KV head); None picks enough to fill the GPU."""

    num_splits: int | None = None
    num_warps: int = 4
    num_stages: int = 2


def unsupported_reason(q_shape, pages_shape) -> str | None:
    """Why the Pallas kernel cannot take these shapes (the dispatcher then uses the reference)."""
    head_dim, page_size = q_shape[-1], pages_shape[-2]
    if reason := head_dim_reason(head_dim):
        return reason
    if not _compat.is_power_of_2(page_size) or page_size < MIN_DOT:
        return f"page_size {page_size} is not a power of two >= {MIN_DOT}"
    return None


def _paged_kernel(kv_len_ref, table_ref, q_ref, k_ref, v_ref, *refs, num_splits, scale, quantized):
    """One (sequence, KV head, split) over the split's share of the sequence's valid pages, each found
    through the table row [W]. q_ref [Hp, D]; k_ref, v_ref [P, page_size, D] (this KV head of the
    whole pool); refs: (scales [P, page_size] if quantized), o [Hp, D], m, l [Hp]."""
    decode_split(kv_len_ref, q_ref, k_ref, v_ref, refs, block=k_ref.shape[-2], num_splits=num_splits, scale=scale,
                 quantized=quantized, locate=lambda i: table_ref[i])


def paged_attention_pallas(
    q: jax.Array,  # [B, Hq, D]
    k_pages: jax.Array,  # [P, Hkv, page_size, D], or [L, P, Hkv, page_size, D] with `layer`
    v_pages: jax.Array,  # same as k_pages
    page_table: jax.Array,  # int32 [B, W]
    kv_len: jax.Array,  # int32 [B]: kv_len <= W * page_size
    layer: int | None = None,  # given: the pool has a layer axis and layer `layer` is read in place
    k_scales: jax.Array | None = None,  # float32, k_pages.shape[:-1]: int8 pages, dequantized per page
    v_scales: jax.Array | None = None,
    *,
    num_splits: int | None = None,
    interpret: bool = False,
) -> jax.Array:  # [B, Hq, D], q.dtype
    """Split-K paged flash decoding; one program per (sequence, KV head, split) walking only the
    sequence's valid pages, the group's query heads padded to >= 16 rows for the tensor-core dot,
    partial results merged by log-sum-exp."""
    return _paged_attention_pallas(q, k_pages, v_pages, page_table, kv_len, k_scales, v_scales, layer,
                                   PagedAttentionBlocks(num_splits), interpret)


@functools.partial(jax.jit, static_argnums=(7, 8, 9))
def _paged_attention_pallas(q, k_pages, v_pages, page_table, kv_len, k_scales, v_scales, layer,
                            blocks: PagedAttentionBlocks, interpret: bool):
    batch, num_heads, head_dim = q.shape
    num_pages, num_kv_heads, page_size = k_pages.shape[-4], k_pages.shape[-3], k_pages.shape[-2]
    width = page_table.shape[1]
    if (k_pages.shape != v_pages.shape or k_pages.ndim != (4 if layer is None else 5)
            or k_pages.shape[-1] != head_dim or num_heads % num_kv_heads or page_table.shape[0] != batch
            or kv_len.shape != (batch,)):
        raise ValueError(f"paged_attention: q {q.shape}, table {page_table.shape}, kv_len {kv_len.shape} "
                         f"do not fit k_pages {k_pages.shape} / v_pages {v_pages.shape}")
    reason = unsupported_reason(q.shape, k_pages.shape)
    if reason:
        raise ValueError(f"paged_attention_pallas: {reason}; use paged_attention (falls back)")
    _compat.quiet_triton_deprecation()
    num_splits = blocks.num_splits or min(width, 16, pl.cdiv(TARGET_PROGRAMS, batch * num_kv_heads))
    num_splits = max(1, min(num_splits, width))
    if layer is None:  # the program sees its KV head of every page: [P, page_size, D]
        pool_spec = pl.BlockSpec((num_pages, None, page_size, head_dim), lambda b, h, s: (0, h, 0, 0))
        scale_spec = pl.BlockSpec((num_pages, None, page_size), lambda b, h, s: (0, h, 0))
    else:
        pool_spec = pl.BlockSpec((None, num_pages, None, page_size, head_dim),
                                 lambda b, h, s: (layer, 0, h, 0, 0))
        scale_spec = pl.BlockSpec((None, num_pages, None, page_size), lambda b, h, s: (layer, 0, h, 0))
    table_spec = pl.BlockSpec((None, width), lambda b, h, s: (b, 0))
    return split_call(_paged_kernel, q, kv_len, (page_table.astype(jnp.int32),), k_pages, v_pages, k_scales, v_scales,
                      num_kv_heads=num_kv_heads, num_splits=num_splits, extra_specs=(table_spec,), kv_spec=pool_spec,
                      scale_spec=scale_spec, blocks=blocks, interpret=interpret, name="kvjax_paged_attention")


def paged_attention(q, k_pages, v_pages, page_table, kv_len, layer: int | None = None, k_scales=None,
                    v_scales=None, *, mode: str | None = None):
    """Dispatcher: Pallas on GPU, the reference on CPU; `mode` or $KVJAX_KERNELS overrides, and
    shapes the kernel cannot take use the reference with a one-time warning."""
    mode = choose_mode("paged_attention", mode, unsupported_reason(q.shape, k_pages.shape))
    if mode == "reference":
        return paged_attention_reference(q, k_pages, v_pages, page_table, kv_len, layer, k_scales, v_scales)
    return paged_attention_pallas(q, k_pages, v_pages, page_table, kv_len, layer, k_scales, v_scales,
                                  interpret=mode == "interpret")
