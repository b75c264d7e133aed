"""The engine on int8 pages (`kv_cache_dtype="int8"`) equals the dense int8 cache doing the same
operations (prefill into int8, dequantize -> compress -> quantize, generate_from); int8 pages
round-trip within half a scale step and buy more pages per byte."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from inference.engine import Engine
from inference.paged_cache import PagedKVCache
from inference.scheduler import Request
from kvjax.models.attention import store_kv
from kvjax.compression.presses import get_press
from kvjax.cache import QuantizedArray, as_dense
from pallas_kernels.paged_attention import PagedKV
from tests.inference.test_engine import MAX_LEN, expected, run_staggered

PAGE_SIZE = 8


def fp32_page_bytes(cfg) -> int:
    return 2 * cfg.num_layers * cfg.num_kv_heads * PAGE_SIZE * cfg.head_dim * 4


def test_int8_pages_equal_the_dense_int8_cache(tiny_llama):
    model, cfg = tiny_llama
    # The bytes of 8 float32 pages: the int8 pool holds D * 4 / (D + 4) times as many.
    engine = Engine(model, page_size=PAGE_SIZE, kv_cache_bytes=8 * fp32_page_bytes(cfg), kv_cache_dtype="int8",
                    max_num_seqs=4, max_model_len=MAX_LEN, prefill_batch_size=2,
                    decoding_batch_size=4, eos_ids=(), check_invariants=True)
    assert engine.allocator.num_pages == 8 * cfg.head_dim * 4 // (cfg.head_dim + 4)
    assert isinstance(engine.runner.cache.k_pages, QuantizedArray)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 128, n).tolist() for n in (20, 31, 18, 26)]  # one prompt bucket
    press = get_press("knorm", compression_ratio=0.5)
    methods = [None, press, None, press]
    seqs = run_staggered(engine, [Request(prompt=p, max_new_tokens=5, compression=m)
                                  for p, m in zip(prompts, methods)])
    for method in (None, press):
        rows = [i for i, m in enumerate(methods) if m is method]
        want = expected(model, cfg, [prompts[i] for i in rows], 5, method, int8=True)
        assert [seqs[i].output for i in rows] == want
    assert engine.stats["pages_freed_by_compression"] > 0 and engine.allocator.num_used == 0


def test_int8_page_write_read_round_trip_and_page_bytes(tiny_llama):
    cfg = types.SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=16)
    cache = PagedKVCache.for_model(cfg, 6, 4, 1, kv_cache_dtype="int8")
    assert cache.page_bytes() == 2 * 2 * 2 * 4 * (16 + 4)  # K and V, layers, heads, slots: values + scale
    table = jnp.asarray([[5, 1, 3]], jnp.int32)
    view = PagedKV(cache.k_pages, table)
    new = jax.random.normal(jax.random.key(0), (1, 3, 2, 16)) * 3.0  # [B, T, Hkv, D]
    slots = jnp.asarray([[3, 4, view.max_len]], jnp.int32)  # the last one is padding: dropped
    rows = jnp.zeros((1, 1), jnp.int32)
    out = jax.jit(lambda view, slots, new: store_kv(view, 1, rows, slots, new))(view, slots, new)
    assert jax.tree.structure(out) == jax.tree.structure(view)
    dense = np.asarray(as_dense(out.read_layer(1)))  # [1, Hkv, 12, D]
    scales = np.asarray(out.read_layer(1).scales)
    for t in range(2):
        err = np.abs(dense[0, :, slots[0, t]] - np.asarray(new[0, t]))
        assert (err <= scales[0, :, slots[0, t]] / 2 * (1 + 1e-5)).all()
    assert not np.asarray(out.pages.values[0]).any()  # layer 0 untouched, nothing else written
    assert int((np.asarray(out.pages.scales[1]) > 0).sum()) == 2 * 2
    with pytest.raises(kvjax.KVJaxError, match="kv_cache_dtype"):
        PagedKVCache.for_model(cfg, 6, 4, 1, kv_cache_dtype="fp8")
    with pytest.raises(kvjax.KVJaxError, match="not both"):
        Engine(tiny_llama[0], num_pages=4, kv_cache_bytes=1 << 20)
    with pytest.raises(kvjax.KVJaxError, match="holds no page"):
        Engine(tiny_llama[0], kv_cache_bytes=10, kv_cache_dtype="int8")
