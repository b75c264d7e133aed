"""paged_attention against the dense decode-attention reference (pages rebuilt from dense K/V)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import PagedKV, gather_pages, paged_attention, paged_attention_reference


def _paged(dense, page_size, num_pages, rng):
    """Scatter dense [B, Hkv, S, D] into a shuffled, NaN-poisoned pool; (pool, table)."""
    batch, num_kv_heads, max_len, head_dim = dense.shape
    width = max_len // page_size
    ids = rng.permutation(num_pages)[:batch * width].reshape(batch, width).astype(np.int32)
    pool = np.full((num_pages, num_kv_heads, page_size, head_dim), np.nan, np.float32)
    blocks = np.asarray(dense).reshape(batch, num_kv_heads, width, page_size, head_dim).transpose(0, 2, 1, 3, 4)
    pool[ids] = blocks
    return jnp.asarray(pool), jnp.asarray(ids)


@pytest.mark.parametrize("page_size", [4, 16])
def test_equals_dense_reference(page_size):
    rng = np.random.default_rng(page_size)
    batch, num_heads, num_kv_heads, head_dim, max_len = 4, 8, 2, 16, 64
    q = jnp.asarray(rng.normal(size=(batch, num_heads, head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(batch, num_kv_heads, max_len, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, num_kv_heads, max_len, head_dim)), jnp.float32)
    kv_len = jnp.asarray([1, page_size - 1, page_size + 1, max_len], jnp.int32)  # ragged edges
    # Dense padding past kv_len is NaN too: both sides must never read it.
    visible = np.arange(max_len)[None, None, :, None] < np.asarray(kv_len)[:, None, None, None]
    k, v = jnp.where(visible, k, jnp.nan), jnp.where(visible, v, jnp.nan)
    num_pages = 3 * batch * max_len // page_size
    k_pool, table = _paged(k, page_size, num_pages, np.random.default_rng(1))
    v_pool, _ = _paged(v, page_size, num_pages, np.random.default_rng(1))  # same permutation: same table
    want = decode_attention_reference(q, k, v, kv_len)
    got = paged_attention(q, k_pool, v_pool, table, kv_len)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # With a layer axis, read in place.
    got_layer = paged_attention_reference(q, jnp.stack([k_pool * 0, k_pool]), jnp.stack([v_pool * 0, v_pool]),
                                          table, kv_len, layer=1)
    np.testing.assert_allclose(got_layer, want, rtol=1e-5, atol=1e-5)


def test_write_then_gather_roundtrip():
    rng = np.random.default_rng(0)
    pages = jnp.zeros((1, 6, 2, 4, 8), jnp.float32)  # [L, P, Hkv, ps, D]
    table = jnp.asarray([[5, 1, 3]], jnp.int32)
    view = PagedKV(pages, table)
    new = jnp.asarray(rng.normal(size=(1, 3, 2, 8)), jnp.float32)
    slots = jnp.asarray([[3, 4, view.max_len]], jnp.int32)  # the last one is padding: dropped
    out = view.write(0, slots, new)
    dense = gather_pages(out.pages[0], table)  # [1, Hkv, 12, D]
    np.testing.assert_array_equal(dense[0, :, 3], new[0, 0])
    np.testing.assert_array_equal(dense[0, :, 4], new[0, 1])
    assert float(jnp.abs(out.pages).sum()) == pytest.approx(float(jnp.abs(new[:, :2]).sum()), rel=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(view)
