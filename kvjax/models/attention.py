"""Attention of new queries over a layer of the dense KV cache.

One function serves prefill (T new tokens) and decode (T = 1): which cache slots a query may
read is given by `visible_len`, so the same code handles ragged batches and caches whose
positions differ from their lengths (after compression).
"""

from __future__ import annotations

import jax

from kvjax import parallel
from kvjax.cache import as_dense, kernel_operands, read_layer, store
from pallas_kernels._dispatch import kernel_mode
from pallas_kernels.decode_attention import attention_reference, decode_attention
from pallas_kernels.paged_attention import PagedKV, paged_attention
from pallas_kernels._splitk import MASK_VALUE  # noqa: F401 (re-exported: large finite negative, no NaN rows)


def cached_attention(
    q: jax.Array,  # [B, T, Hq, D], RoPE applied
    k: jax.Array,  # [B, Hkv, S, D], or [L, B, Hkv, S, D] with `layer`
    v: jax.Array,
    visible_len: jax.Array,  # int32 [B, T]: query (b, t) reads slots [0, visible_len[b, t])
    layer: int | None = None,  # given: k, v are the whole cache [L, B, Hkv, S, D]
) -> jax.Array:  # [B, T, Hq, D]
    """GQA softmax attention (`pallas_kernels.decode_attention.attention_reference` on CPU and for
    prefill: the matmuls in the input dtype, the mask and softmax in float32, as HF's eager attention).
    Passing the whole cache with `layer` lets the decode kernel read the layer in place.
    k, v may be `PagedKV` views (inference/'s paged cache): decode reads through the page table
    (int8 pages: gathered and dequantized, as the dense int8 cache)."""
    batch, num_new, num_heads, head_dim = q.shape
    if isinstance(k, PagedKV):
        if num_new == 1:  # int8 pages pass their scales; the kernel dequantizes per page
            (k_pages, k_scales), (v_pages, v_scales) = kernel_operands(k.pages), kernel_operands(v.pages)
            pages = parallel.LAYER_HEADS if layer is not None else parallel.HEADS

            def paged(q, k_pages, v_pages, table, lengths, k_scales, v_scales):
                return paged_attention(q, k_pages, v_pages, table, lengths, layer, k_scales, v_scales)

            args = (q[:, 0], k_pages, v_pages, k.page_table, visible_len[:, 0], k_scales, v_scales)
            specs = (parallel.HEADS, pages, pages, parallel.REPLICATED, parallel.REPLICATED, pages, pages)
            return _kernel(paged, args, specs)[:, None]
        # Prefill: a dense (dequantized) view of the layer's pages.
        k, v, layer = as_dense(k.read_layer(layer)), as_dense(v.read_layer(layer)), None
    if num_new == 1 and kernel_mode() != "reference":
        # Decode on GPU: the ragged split-K kernel reads only visible slots (int8: dequantized in the
        # kernel). CPU keeps the code below.
        (k_values, k_scales), (v_values, v_scales) = kernel_operands(k), kernel_operands(v)
        heads = parallel.LAYER_HEADS if layer is not None else parallel.HEADS

        def dense(q, k_values, v_values, lengths, k_scales, v_scales):
            return decode_attention(q, k_values, v_values, lengths, layer, k_scales, v_scales)

        args = (q[:, 0], k_values, v_values, visible_len[:, 0], k_scales, v_scales)
        return _kernel(dense, args, (parallel.HEADS, heads, heads, parallel.REPLICATED, heads, heads))[:, None]
    if layer is not None:  # an int8 cache is dequantized here (kvjax.quantization)
        k, v = read_layer(k, layer), read_layer(v, layer)
    return attention_reference(q, k, v, visible_len).astype(v.dtype)


def _kernel(fn, args, specs):
    """A decode kernel over its operands, per shard of the KV heads when tensor-parallel (XLA cannot
    partition a Pallas call; the reference path below it is partitioned by XLA itself)."""
    return parallel.per_shard(fn, args, specs, out_specs=parallel.HEADS)


def store_kv(cache_x, layer: int, rows, slots, new: jax.Array):
    """Write new [B, T, Hkv, D] at `slots` int32 [B, T] of layer `layer` (slot max_len = dropped):
    into the dense or int8 cache (kvjax.quantization.store) or through a PagedKV's page table."""
    if isinstance(cache_x, PagedKV):  # the same write, at (page, offset) instead of (row, slot)
        page, offset = cache_x.locate(slots)
        return PagedKV(store(cache_x.pages, layer, page, offset, new), cache_x.page_table)
    return store(cache_x, layer, rows, slots, new)
