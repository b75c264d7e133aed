"""int8 KV quantization: round-trip bound, decode equal to the dequantized reference, bytes saved."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.cache import QuantizedArray, dequantize, is_quantized, quantize
from kvjax.compression.int8 import Int8KV, bytes_report, dequantize_cache


def test_round_trip_error_is_at_most_half_a_step():
    key_x, key_mag = jax.random.split(jax.random.key(0))
    magnitude = 10.0 ** jax.random.uniform(key_mag, (2, 3, 5, 7, 1), minval=-3, maxval=2)  # rows of any size
    x = jax.random.normal(key_x, (2, 3, 5, 7, 16)) * magnitude
    x = x.at[0, 0, 0, 0].set(0.0)  # an all-zero row: scale 0, exact
    q = quantize(x)
    assert q.values.dtype == jnp.int8 and q.scales.shape == x.shape[:-1] + (1,)
    err = np.abs(np.asarray(x) - np.asarray(dequantize(q)))
    bound = np.asarray(q.scales) / 2 * (1 + 1e-5) + 1e-12
    assert (err <= bound).all()
    assert np.abs(np.asarray(q.values)).max() == 127  # the largest element of every row maps to +-127
    np.testing.assert_array_equal(np.asarray(dequantize(q))[0, 0, 0, 0], 0.0)


def test_decode_with_int8_cache_equals_dequantized_reference(tiny_llama):
    model, cfg = tiny_llama
    lens = np.array([11, 6], np.int32)
    tokens = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)).astype(np.int32)
    _, dense = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 24), tokens, lens)
    quant = kvjax.compress(dense, Int8KV())
    assert is_quantized(quant) and isinstance(quant.k, QuantizedArray)
    np.testing.assert_array_equal(np.asarray(quant.kv_len), lens)
    report = bytes_report(dense, quant)
    per_token = cfg.num_layers * cfg.num_kv_heads * 2  # K and V rows per token
    assert report["bytes_before"] == lens.sum() * per_token * cfg.head_dim * 4
    assert report["bytes_after"] == lens.sum() * per_token * (cfg.head_dim + 4)
    assert report["bytes_saved"] > 0 and report["ratio"] < 0.5

    reference = dequantize_cache(quant)  # dense, holding exactly what attention reads
    step_tokens = np.array([5, 9], np.int32)
    for step in range(3):
        logits_q, quant = kvjax.decode_step(model, quant, step_tokens)
        logits_r, reference = kvjax.decode_step(model, reference, step_tokens)
        # Old slots are read identically (exact: see the attention test below); only the token just
        # written differs, int8 in one cache and dense in the other, so logits agree to int8 noise.
        np.testing.assert_allclose(np.asarray(logits_q), np.asarray(logits_r), atol=2e-2)
        slot = lens + step
        for b in range(2):  # layer 0's new K is the same in both (later layers see the int8 noise)
            written = np.asarray(reference.k)[0, b, :, slot[b]]  # [Hkv, D]
            np.testing.assert_allclose(np.asarray(dequantize(quant.k))[0, b, :, slot[b]],
                                       np.asarray(dequantize(quantize(jnp.asarray(written)))), atol=1e-6)
        reference = dequantize_cache(quant)  # re-sync, so every step compares equal inputs
        step_tokens = np.asarray(jnp.argmax(logits_q, -1), np.int32)
    np.testing.assert_array_equal(np.asarray(quant.kv_len), lens + 3)

    # int8 stays close to the unquantized model too (a quality check, not an equality).
    _, dense = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 24), tokens, lens)
    logits_d, _ = kvjax.decode_step(model, dense, np.array([5, 9], np.int32))
    logits_q, _ = kvjax.decode_step(model, kvjax.compress(
        kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 24), tokens, lens)[1], Int8KV()), np.array([5, 9]))
    assert np.abs(np.asarray(logits_d) - np.asarray(logits_q)).max() < 0.05 * np.abs(np.asarray(logits_d)).max()


def test_presses_refuse_a_quantized_cache(tiny_llama):
    model, cfg = tiny_llama
    _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 16), np.arange(3, 11, dtype=np.int32)[None])
    quant = kvjax.compress(cache, Int8KV())
    with pytest.raises(kvjax.KVJaxError, match="press first"):
        kvjax.compress(quant, kvjax.presses.get_press("knorm", compression_ratio=0.5))
    with pytest.raises(kvjax.KVJaxError, match="already quantized"):
        kvjax.compress(quant, Int8KV())


def test_attention_reads_a_quantized_layer_as_its_dequantized_values():
    from kvjax.models.attention import cached_attention

    keys = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(keys[0], (2, 3, 4, 8))  # [B, T, Hq, D]
    k, v = (quantize(jax.random.normal(key, (2, 2, 2, 10, 8))) for key in keys[1:])  # [L, B, Hkv, S, D]
    visible = jnp.array([[4, 5, 6], [8, 9, 10]], jnp.int32)
    out_q = cached_attention(q, k, v, visible, layer=1)
    out_r = cached_attention(q, dequantize(k), dequantize(v), visible, layer=1)
    np.testing.assert_array_equal(np.asarray(out_q), np.asarray(out_r))


def test_decode_on_the_kernel_path_reads_int8_blocks(monkeypatch):
    # With the kernels on (KVJAX_KERNELS=interpret stands in for the GPU), an int8 cache goes to the
    # decode kernel as int8 values + scales and gives what the CPU path gives.
    from kvjax.models.attention import cached_attention
    from pallas_kernels import decode_attention as decode_module

    rng = np.random.default_rng(4)
    k, v = (quantize(jnp.asarray(rng.standard_normal((2, 2, 2, 64, 16)), jnp.float32)) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    visible = jnp.asarray([[9], [64]], jnp.int32)
    seen = []
    kernel = decode_module.decode_attention_pallas
    monkeypatch.setattr(decode_module, "decode_attention_pallas",
                        lambda q, k, *a, **kw: seen.append(k.dtype) or kernel(q, k, *a, **kw))
    expected = cached_attention(q, k, v, visible, 1)
    monkeypatch.setenv("KVJAX_KERNELS", "interpret")
    got = cached_attention(q, k, v, visible, 1)
    assert seen == [jnp.int8]
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-5, rtol=2e-5)
