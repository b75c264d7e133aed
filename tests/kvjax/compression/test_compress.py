"""kvjax.compress equals a deliberately simple per-sequence numpy loop over groups."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.compression.ccm import CompressorConfig, build_compressor
from tests.pallas_kernels.ccm_loop import naive_ccm


def naive_compress(k, v, kv_len, image_len, compressor):
    """The numpy loop for a compressor: text_mlp sends every token through the text MLPs."""
    cfg = compressor.cfg
    image_len = np.zeros_like(image_len) if cfg.image_mode == "text_mlp" else image_len
    weights = jax.tree.map(np.asarray, compressor.ccm_weights())
    return naive_ccm(k, v, kv_len, image_len, weights, cfg.compression_factor, cfg.min_seq_len, cfg.keep_last)


def random_cache(seed, layers=2, batch=4, heads=2, max_len=40, head_dim=8, kv_len=(40, 23, 0, 7)):
    rng = np.random.default_rng(seed)
    shape = (layers, batch, heads, max_len, head_dim)
    k, v = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    kv_len = np.array(kv_len, np.int32)
    positions = kv_len + 3  # distinct from kv_len, as after an earlier compression
    return kvjax.KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_len), jnp.asarray(positions)), k, v


CASES = [  # (cf, min_seq_len, image_mode, image_len per sequence[, keep_last])
    (2, 2, "image_mlp", (0, 0, 0, 0)),
    (3, 2, "image_mlp", (13, 2, 5, 7)),       # image not a multiple of cf; < cf; past kv_len
    (5, 2, "image_mlp", (9, 11, 0, 3)),       # image 9 < 2*cf: falls back, text compressed
    (5, 1, "image_mlp", (25, 20, 0, 0)),
    (4, 3, "keep", (17, 6, 0, 4)),
    (3, 2, "text_mlp", (13, 5, 0, 7)),        # image_len ignored: everything through text MLPs
    (2, 0, "image_mlp", (1, 1, 0, 1)),
    # A 30-token image kept whole + 10 text tokens = 34 slots: past the output bound ccm_plan once used (16).
    (4, 1, "keep", (30, 0, 0, 0)),
    (3, 1, "image_mlp", (13, 2, 5, 7), 8),  # the text's last 8 tokens kept: 27 -> 19 grouped + 8; 21 -> 13 + 8
]


@pytest.mark.parametrize("cf,min_seq_len,image_mode,image_len,keep_last", [(*c, 0)[:5] for c in CASES])
def test_compress_equals_naive_loop(cf, min_seq_len, image_mode, image_len, keep_last):
    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=cf,
                           min_seq_len=min_seq_len, image_mode=image_mode, keep_last=keep_last)
    compressor = build_compressor(cfg, rngs=nnx.Rngs(cf))
    cache, k, v = random_cache(cf)
    kv_len, positions = np.asarray(cache.kv_len), np.asarray(cache.positions)
    want_k, want_v, want_len = naive_compress(k, v, kv_len, np.array(image_len), compressor)

    out = kvjax.compress(cache, compressor, image_len)
    np.testing.assert_array_equal(np.asarray(out.kv_len), want_len)
    np.testing.assert_array_equal(np.asarray(out.positions), positions)  # 'original' convention
    got_k, got_v = np.asarray(out.k), np.asarray(out.v)
    for b, n in enumerate(want_len):
        np.testing.assert_allclose(got_k[:, b, :, :n], want_k[:, b, :, :n], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_v[:, b, :, :n], want_v[:, b, :, :n], atol=1e-5, rtol=1e-5)


def test_kv_len_and_bytes_shrink_positions_unchanged():
    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=5)
    cache, _, _ = random_cache(0, max_len=60, kv_len=(60, 33, 9, 0))
    before = cache.used_bytes()
    out = kvjax.compress(cache, build_compressor(cfg), [20, 3, 0, 0])
    # 60 = image 20 (4 groups) + text 40 (8 groups); 33 = image 3 (kept) + text 30 (6 groups);
    # 9 < 2 groups of 5: unchanged; 0 stays 0.
    np.testing.assert_array_equal(np.asarray(out.kv_len), [12, 9, 9, 0])
    np.testing.assert_array_equal(out.used_bytes(), before * np.array([12, 9, 9, 0]) // np.maximum([60, 33, 9, 1], 1))
    np.testing.assert_array_equal(np.asarray(out.positions), [63, 36, 12, 3])


def test_compressed_positions_convention_restarts_at_kv_len():
    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=2,
                           rope_positions="compressed")
    cache, _, _ = random_cache(1)
    out = kvjax.compress(cache, build_compressor(cfg), None)
    np.testing.assert_array_equal(np.asarray(out.positions), np.asarray(out.kv_len))
    cache, _, _ = random_cache(1)
    out = kvjax.compress(cache, build_compressor(cfg), None, rope_positions="original")
    np.testing.assert_array_equal(np.asarray(out.positions), [43, 26, 3, 10])


def test_one_compile_for_any_lengths():
    from tests.kvjax.test_steps import count_compiles

    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=3)
    compressor = build_compressor(cfg)
    kvjax.compress(random_cache(0)[0], compressor, [5, 0, 0, 1])
    with count_compiles() as compiles:
        for seed, lens in enumerate([(1, 2, 3, 4), (40, 40, 40, 40), (0, 0, 0, 0)]):
            kvjax.compress(random_cache(seed, kv_len=lens)[0], compressor, [seed, 2 * seed, 0, 9])
    assert compiles == []


def test_compress_is_differentiable_and_dropout_only_in_training():
    cfg = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=2, dropout=0.5)
    compressor = build_compressor(cfg)
    cache, _, _ = random_cache(2)
    image_len = jnp.array([4, 4, 0, 2])

    def loss(c):
        return jnp.sum(kvjax.apply_compression(cache, c, image_len).k[:, :, :, :10] ** 2)

    grads = nnx.grad(loss)(compressor)
    assert float(jnp.abs(grads.text_k.w1[...]).sum()) > 0
    assert float(jnp.abs(grads.image_k.w1[...]).sum()) > 0
    first = kvjax.apply_compression(cache, compressor, image_len).k
    np.testing.assert_array_equal(first, kvjax.apply_compression(cache, compressor, image_len).k)
    compressor.train()
    noisy = kvjax.apply_compression(cache, compressor, image_len).k
    assert not np.allclose(noisy, first)
    # compress() is inference: no dropout even when the module is left in training mode.
    cache2, _, _ = random_cache(2)
    np.testing.assert_allclose(kvjax.compress(cache2, compressor, image_len).k, first, atol=1e-6)


def test_mismatched_compressor_is_refused():
    cfg = CompressorConfig(num_layers=3, num_kv_heads=2, head_dim=8)
    with pytest.raises(kvjax.KVJaxError, match=r"\(layers, kv heads, head_dim\) = \(3, 2, 8\).*\(2, 2, 8\)"):
        kvjax.compress(random_cache(0)[0], build_compressor(cfg), None)


@pytest.mark.parametrize("bad", [dict(compression_factor=0), dict(image_mode="both"), dict(dropout=1.0),
                                 dict(rope_positions="shifted"), dict(min_seq_len=-1)])
def test_bad_config_is_refused(bad):
    with pytest.raises(kvjax.KVJaxError):
        CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, **bad)
