"""paged_attention: the reference against the dense decode-attention reference (pages rebuilt from
dense K/V), and the Pallas kernel (interpreted on CPU) against the reference over shuffled,
NaN-poisoned pools."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels import paged_attention as paged_module
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import (PagedKV, gather_pages, paged_attention, paged_attention_pallas,
                                            paged_attention_reference)
from tests.pallas_kernels._util import assert_close, fast_jit, normal

reference = fast_jit(paged_attention_reference, static_argnums=5)


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
    want = fast_jit(decode_attention_reference)(q, k, v, kv_len)
    got = fast_jit(functools.partial(paged_attention, mode="reference"))(q, k_pool, v_pool, table, kv_len)
    assert not np.isnan(np.asarray(got)).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # With a layer axis, read in place.
    got_layer = reference(q, jnp.stack([k_pool * 0, k_pool]), jnp.stack([v_pool * 0, v_pool]), table, kv_len, 1)
    np.testing.assert_allclose(got_layer, want, rtol=1e-5, atol=1e-5)


def test_write_then_gather_roundtrip():
    rng = np.random.default_rng(0)
    pages = jnp.zeros((1, 6, 2, 4, 8), jnp.float32)  # [L, P, Hkv, ps, D]
    table = jnp.asarray([[5, 1, 3]], jnp.int32)
    view = PagedKV(pages, table)
    new = jnp.asarray(rng.normal(size=(1, 3, 2, 8)), jnp.float32)
    slots = jnp.asarray([[3, 4, view.max_len]], jnp.int32)  # the last one is padding: dropped

    def write(view, slots, new):
        page, offset = view.locate(slots)
        return PagedKV(view.pages.at[0, page, :, offset].set(new, mode="drop"), view.page_table)

    out = jax.jit(write)(view, slots, new)
    dense = jax.jit(gather_pages)(out.pages[0], table)  # [1, Hkv, 12, D]
    np.testing.assert_array_equal(dense[0, :, 3], new[0, 0])
    np.testing.assert_array_equal(dense[0, :, 4], new[0, 1])
    assert float(jnp.abs(out.pages).sum()) == pytest.approx(float(jnp.abs(new[:, :2]).sum()), rel=1e-6)
    assert jax.tree.structure(out) == jax.tree.structure(view)


def _pool(rng, num_pages, num_kv_heads, page_size, head_dim, dtype, kv_len, width, num_layers=None):
    """A shuffled pool and table for kv_len [B]: each row owns random distinct pages; every slot a
    row does not own for its kv_len (unused pages, a last page's tail, other layers) is NaN, and
    table entries past a row's pages name random (NaN) pages. (k, v, table)"""
    batch = len(kv_len)
    table = rng.permutation(num_pages)[:batch * width].reshape(batch, width).astype(np.int32)
    shape = (num_pages, num_kv_heads, page_size, head_dim)
    k, v = np.full(shape, np.nan, np.float32), np.full(shape, np.nan, np.float32)
    for row, length in enumerate(kv_len):
        for index in range(-(-int(length) // page_size)):
            n = min(page_size, int(length) - index * page_size)
            page = table[row, index]
            k[page, :, :n] = normal(rng, (num_kv_heads, n, head_dim))
            v[page, :, :n] = normal(rng, (num_kv_heads, n, head_dim))
    if num_layers is not None:  # the data in the last layer; the others all NaN
        k = np.stack([np.full(shape, np.nan, np.float32)] * (num_layers - 1) + [k])
        v = np.stack([np.full(shape, np.nan, np.float32)] * (num_layers - 1) + [v])
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(table)


# (batch, kv heads, group, head_dim, page_size, table width W, pool pages, dtype, num_splits, layers,
#  kv_len or None = random). Lengths cover 0, 1, page-1, page+1 and full (W * page_size); GQA 1/2/4;
# splits cover default, uneven, more than the pages; a layer axis read in place.
CASES = [
    (4, 2, 2, 16, 16, 4, 24, jnp.float32, None, None, [0, 15, 17, 64]),
    (3, 1, 4, 32, 16, 5, 20, jnp.bfloat16, 2, 3, [80, 1, 33]),
    (2, 4, 1, 64, 32, 3, 9, jnp.float16, 5, None, None),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}d{}ps{}w{}".format(*c[:6]))
def test_pallas_equals_reference(case):
    batch, num_kv_heads, group, head_dim, page_size, width, num_pages, dtype, num_splits, num_layers, lengths = case
    layer = None if num_layers is None else num_layers - 1
    pallas = fast_jit(functools.partial(paged_attention_pallas, num_splits=num_splits, interpret=True),
                      static_argnums=5)
    for seed in range(2):  # a seeded sweep over one compiled shape
        rng = np.random.default_rng([seed, *case[:7]])
        kv_len = np.asarray(lengths if lengths is not None and seed == 0
                            else rng.integers(0, width * page_size + 1, batch), np.int32)
        k, v, table = _pool(rng, num_pages, num_kv_heads, page_size, head_dim, dtype, kv_len, width, num_layers)
        q = jnp.asarray(normal(rng, (batch, num_kv_heads * group, head_dim), dtype))
        out = pallas(q, k, v, table, jnp.asarray(kv_len), layer)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, reference(q, k, v, table, jnp.asarray(kv_len), layer), dtype)
        assert not np.asarray(out[kv_len == 0], np.float32).any(), "kv_len 0 must give zeros"


def test_dispatcher_modes_and_fallback():
    rng = np.random.default_rng(3)
    kv_len = np.asarray([5, 7], np.int32)
    k, v, table = _pool(rng, 6, 2, 4, 16, jnp.float32, kv_len, 2)  # page_size 4: too small for Triton
    q = jnp.asarray(normal(rng, (2, 4, 16)))
    reason = "page_size 4 is not a power of two >= 16"
    _dispatch._warned.discard(("paged_attention", reason))
    with pytest.warns(UserWarning, match="paged_attention: using the jnp reference"):
        out = fast_jit(functools.partial(paged_attention, mode="pallas"))(q, k, v, table, jnp.asarray(kv_len))
    np.testing.assert_array_equal(out, reference(q, k, v, table, jnp.asarray(kv_len)))
    with pytest.raises(ValueError, match="page_size 4"):
        paged_attention_pallas(q, k, v, table, jnp.asarray(kv_len), interpret=True)


def test_cached_attention_sends_paged_decode_to_the_kernel(monkeypatch):
    # A PagedKV decode goes through the paged dispatcher: the reference on CPU, Pallas when the
    # mode says so (as on GPU), with the same result either way.
    from kvjax.models.attention import cached_attention

    rng = np.random.default_rng(5)
    kv_len = np.asarray([1, 30, 48], np.int32)
    k, v, table = _pool(rng, 12, 2, 16, 32, jnp.float32, kv_len, 3, num_layers=2)
    q = jnp.asarray(normal(rng, (3, 1, 4, 32)))
    calls = []
    kernel = paged_module.paged_attention_pallas
    monkeypatch.setattr(paged_module, "paged_attention_pallas", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    def attend(q, k, v, table, visible):
        return cached_attention(q, PagedKV(k, table), PagedKV(v, table), visible, 1)

    visible = jnp.asarray(kv_len)[:, None]
    expected = fast_jit(attend)(q, k, v, table, visible)  # CPU default: the reference
    assert not calls
    monkeypatch.setenv("KVJAX_KERNELS", "interpret")  # read at trace time, so trace anew
    assert_close(fast_jit(lambda *a: attend(*a))(q, k, v, table, visible), expected, jnp.float32)
    assert calls


def test_int8_pages_are_dequantized_in_the_kernel():
    # int8 pages with per-slot scales (the engine's kv_cache_dtype="int8"), a layer axis read in
    # place: kernel == reference == the reference over the dequantized pool.
    from kvjax.cache import dequantize, kernel_operands, quantize

    rng = np.random.default_rng(13)
    kv_len = np.asarray([0, 40, 64], np.int32)
    k, v, table = _pool(rng, 16, 2, 16, 32, jnp.float32, kv_len, 4, num_layers=2)
    k, v = (quantize(jnp.nan_to_num(x)) for x in (k, v))  # int8 has no NaN: poisoned slots become 0
    (kq, ks), (vq, vs) = kernel_operands(k), kernel_operands(v)
    q = jnp.asarray(normal(rng, (3, 4, 32)))
    lengths = jnp.asarray(kv_len)
    want = reference(q, kq, vq, table, lengths, 1, ks, vs)
    assert_close(want, reference(q, dequantize(k), dequantize(v), table, lengths, 1), jnp.float32)
    got = fast_jit(functools.partial(paged_attention_pallas, interpret=True), static_argnums=5)(
        q, kq, vq, table, lengths, 1, ks, vs)
    assert_close(got, want, jnp.float32)
