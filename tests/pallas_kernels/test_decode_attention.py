"""decode_attention: the Pallas kernel (interpreted on CPU) against its jnp reference."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.compact_kv import compact_kv_reference
from pallas_kernels.decode_attention import (decode_attention, decode_attention_pallas,
                                             decode_attention_reference)
from tests.pallas_kernels._util import assert_close, fast_jit, normal, poison_past

reference = fast_jit(decode_attention_reference)

# (batch, kv heads, group, head_dim, max_len, dtype, block_k, num_splits, kv_len or None = random)
# Lengths cover 0, 1, block-1, block+1 and full; splits cover 1, more than the blocks, uneven.
CASES = [
    (1, 1, 1, 16, 16, jnp.float32, 16, 1, [16]),
    (3, 1, 4, 64, 128, jnp.bfloat16, 32, 2, [31, 0, 128]),
    (4, 4, 1, 16, 96, jnp.float16, 64, None, [33, 1, 96, 65]),
    (2, 3, 2, 128, 256, jnp.bfloat16, 64, 8, None),
    (2, 2, 4, 32, 512, jnp.float32, 64, 3, [511, 0]),
]


def _pallas(block_k=64, num_splits=None):
    return fast_jit(functools.partial(decode_attention_pallas, block_k=block_k, num_splits=num_splits,
                                      interpret=True))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}g{}d{}s{}".format(*c[:5]))
def test_pallas_equals_reference(case):
    batch, num_kv_heads, group, head_dim, max_len, dtype, block_k, num_splits, lengths = case
    rng = np.random.default_rng(sum(case[:5]))
    if lengths is None:
        lengths = rng.integers(0, max_len + 1, batch)
    kv_len = jnp.asarray(lengths, jnp.int32)
    q = jnp.asarray(normal(rng, (batch, num_kv_heads * group, head_dim), dtype))
    k, v = (jnp.asarray(poison_past(normal(rng, (batch, num_kv_heads, max_len, head_dim), dtype), lengths, 0, 2))
            for _ in range(2))
    out = _pallas(block_k, num_splits)(q, k, v, kv_len)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference(q, k, v, kv_len), dtype)
    assert not np.asarray(out[np.asarray(lengths) == 0], np.float32).any(), "kv_len 0 must give zeros"


def test_compacted_cache_equals_dense_attention_over_kept_tokens():
    # Each head keeps its own token set; attention over the compacted prefix must equal attention
    # over the same tokens gathered into a fresh dense array.
    rng = np.random.default_rng(7)
    batch, heads, group, max_len, head_dim, kept = 2, 2, 2, 64, 32, 20
    k, v = (normal(rng, (1, batch, heads, max_len, head_dim)) for _ in range(2))
    src = np.stack([np.stack([np.sort(rng.choice(50, kept, replace=False)) for _ in range(heads)])
                    for _ in range(batch)])[None].astype(np.int32)  # [1, B, H, N]
    new_len = jnp.asarray([kept, 13], jnp.int32)
    ck, cv = fast_jit(compact_kv_reference)(jnp.asarray(k), jnp.asarray(v), jnp.asarray(src), new_len)
    q = jnp.asarray(normal(rng, (batch, heads * group, head_dim)))
    out = _pallas(16)(q, ck[0], cv[0], new_len)
    dense_k = jnp.asarray(np.take_along_axis(k[0], src[0][..., None], axis=2))
    dense_v = jnp.asarray(np.take_along_axis(v[0], src[0][..., None], axis=2))
    assert_close(out, reference(q, dense_k, dense_v, new_len), jnp.float32)


def test_dispatcher_modes_and_fallback(monkeypatch):
    rng = np.random.default_rng(3)
    q = jnp.asarray(normal(rng, (2, 4, 24)))  # head_dim 24: not a power of two -> reference
    k = jnp.asarray(normal(rng, (2, 2, 32, 24)))
    kv_len = jnp.asarray([5, 32], jnp.int32)
    _dispatch._warned.discard(("decode_attention", "head_dim 24 is not a power of two >= 16"))
    with pytest.warns(UserWarning, match="decode_attention: using the jnp reference"):
        out = fast_jit(functools.partial(decode_attention, mode="pallas"))(q, k, k, kv_len)
    np.testing.assert_array_equal(out, reference(q, k, k, kv_len))
    with pytest.raises(ValueError, match="not a power of two"):
        decode_attention_pallas(q, k, k, kv_len, interpret=True)


def test_cached_attention_uses_the_kernel_for_decode(monkeypatch):
    from kvjax.models.attention import cached_attention

    rng = np.random.default_rng(5)
    q = jnp.asarray(normal(rng, (3, 1, 4, 32)))
    k, v = (jnp.asarray(normal(rng, (3, 2, 48, 32))) for _ in range(2))
    visible = jnp.asarray([[1], [30], [48]], jnp.int32)
    expected = fast_jit(cached_attention)(q, k, v, visible)  # CPU default: the jnp path
    monkeypatch.setenv("KVJAX_KERNELS", "interpret")  # read at trace time, so trace anew
    assert_close(fast_jit(lambda *a: cached_attention(*a))(q, k, v, visible), expected, jnp.float32)


def test_whole_cache_with_layer_reads_that_layer():
    # Decode passes the whole [L, B, Hkv, S, D] cache and a static layer, so the kernel reads the
    # layer in place; it must equal attention over that layer's slice. Other layers hold NaN.
    rng = np.random.default_rng(11)
    k, v = (normal(rng, (3, 2, 2, 64, 32)) for _ in range(2))
    k[[0, 2]], v[[0, 2]] = np.nan, np.nan
    q = jnp.asarray(normal(rng, (2, 4, 32)))
    kv_len = jnp.asarray([40, 7], jnp.int32)
    out = fast_jit(functools.partial(decode_attention_pallas, block_k=16, interpret=True), static_argnums=4)(
        q, jnp.asarray(k), jnp.asarray(v), kv_len, 1)
    assert_close(out, reference(q, jnp.asarray(k[1]), jnp.asarray(v[1]), kv_len), jnp.float32)
    np.testing.assert_array_equal(decode_attention_reference(q, k, v, kv_len, 1), reference(q, k[1], v[1], kv_len))


@pytest.mark.parametrize("dtype,layer", [(jnp.float32, None), (jnp.bfloat16, 1)])
def test_int8_cache_is_dequantized_in_the_kernel(dtype, layer):
    # int8 values + float32 scales (kvjax.quantization's layout): the kernel reading int8 blocks
    # equals the reference, and the reference equals attention over the dequantized cache.
    from kvjax.cache import dequantize, kernel_operands, quantize

    rng = np.random.default_rng(11)
    batch, num_kv_heads, group, head_dim, max_len = 3, 2, 2, 32, 128
    kv_len = jnp.asarray([0, 77, 128], jnp.int32)
    shape = (2, batch, num_kv_heads, max_len, head_dim) if layer is not None else (batch, num_kv_heads, max_len, head_dim)
    k, v = (quantize(jnp.asarray(normal(rng, shape, dtype)), dtype) for _ in range(2))
    (kq, ks), (vq, vs) = kernel_operands(k), kernel_operands(v)
    assert kq.dtype == jnp.int8 and ks.shape == shape[:-1]
    q = jnp.asarray(normal(rng, (batch, num_kv_heads * group, head_dim), dtype))
    want = reference(q, kq, vq, kv_len, layer, ks, vs)
    assert_close(want, reference(q, dequantize(k), dequantize(v), kv_len, layer), dtype)
    got = fast_jit(functools.partial(decode_attention_pallas, block_k=32, interpret=True),
                   static_argnums=4)(q, kq, vq, kv_len, layer, ks, vs)
    assert got.dtype == q.dtype
    assert_close(got, want, dtype)
