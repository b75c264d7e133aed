"""The press mechanism: n_kept arithmetic, order, kv_len/positions, ragged rows, decode afterwards."""

import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.compression import prefill_observing as prefill
from kvjax.compression.presses import apply, compute_n_kept, get_press, kept_tokens, list_presses
from tests.conftest import write_hf_model
from tests.kvjax.compression.test_compressed_decode import torch_decode_over_kept


@pytest.mark.parametrize("n,ratio,want", [(64, 0.5, 32), (23, 0.4, 13), (100, 0.9, 9), (50, 0.8, 9),
                                          (1000, 0.9, 99), (256, 0.2, 204), (10, 0.9, 1), (0, 0.5, 0)])
def test_n_kept_is_kvpress_float64_rule(n, ratio, want):
    assert compute_n_kept(n, ratio) == want


def test_pyramid_budgets_match_kvpress_examples():
    from kvjax.compression.presses.window import pyramid_budgets

    assert pyramid_budgets(64, 0.5, 8, 20, 2) == [56, 8]
    assert pyramid_budgets(4096, 0.75, 64, 20, 32) == [1024] * 32  # fallback
    budgets = pyramid_budgets(1024, 0.5, 64, 20, 32)
    assert budgets[:4] == [960, 931, 902, 873] and budgets[-1] == 64


def test_top_rows_equal_a_stable_argsort_with_ties_and_extremes():
    rng = np.random.default_rng(0)
    special = np.array([-np.inf, -3.0, -0.0, 0.0, 1e-30, 2.5, np.finfo(np.float32).max, np.inf,
                        np.finfo(np.float32).min], np.float32)
    scores = np.stack([rng.choice(special, 40) if row % 2 else rng.normal(size=40) for row in range(64)])
    n_kept = rng.integers(0, 41, (64, 1))
    got = np.asarray(apply._top_rows(jnp.asarray(scores, jnp.float32), jnp.asarray(n_kept, jnp.int32)))
    for row, (x, n) in enumerate(zip(scores.astype(np.float64), n_kept[:, 0])):
        want = np.zeros(40, bool)
        want[np.argsort(-x, kind="stable")[:n]] = True
        np.testing.assert_array_equal(got[row], want, err_msg=f"row {row}, n_kept {n}")


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    path = tmp_path_factory.mktemp("press_one_layer")
    torch_model = write_hf_model(path, "llama", seed=3, num_hidden_layers=1, num_key_value_heads=1,
                                 initializer_range=0.2)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    return model, cfg, torch_model


def ragged_batch(lens, width, seed=0):
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lens), width), np.int32)
    for row, n in enumerate(lens):
        tokens[row, :n] = rng.permutation(np.arange(3, 128))[:n]
    return tokens


def test_compaction_keeps_order_lengths_and_positions(one_layer):
    model, cfg, _ = one_layer
    lens = np.array([30, 17, 0], np.int32)
    tokens = ragged_batch(lens, 32)
    _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 40), tokens, lens)
    full_k, full_v = np.asarray(cache.k), np.asarray(cache.v)
    press = get_press("knorm", compression_ratio=0.5)
    kept = kept_tokens(cache, press)
    out = kvjax.compress(cache, press)
    np.testing.assert_array_equal(np.asarray(out.kv_len), [15, 8, 0])
    np.testing.assert_array_equal(np.asarray(out.positions), lens)  # RoPE positions keep counting
    for b, n_kept in enumerate([15, 8, 0]):
        for h in range(cfg.num_kv_heads):
            idx = np.flatnonzero(kept[0, b, h])  # ascending: order preserved
            assert len(idx) == n_kept and (idx < lens[b]).all()
            np.testing.assert_array_equal(np.asarray(out.k)[0, b, h, :n_kept], full_k[0, b, h, idx])
            np.testing.assert_array_equal(np.asarray(out.v)[0, b, h, :n_kept], full_v[0, b, h, idx])


@pytest.mark.parametrize("name,kwargs", [("snapkv", {"window_size": 4}), ("expected_attention", {}),
                                         ("observed_attention", {}), ("tova", {})])
def test_ragged_rows_equal_rows_alone(one_layer, name, kwargs):
    model, cfg, _ = one_layer
    lens = np.array([30, 17], np.int32)
    tokens = ragged_batch(lens, 32)
    press = get_press(name, compression_ratio=0.5, **kwargs)
    _, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 2, 40), tokens, lens, press=press)
    both = kept_tokens(cache, press, obs)
    for row, n in enumerate(lens):
        _, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 1, 40), tokens[row:row + 1, :n], press=press)
        np.testing.assert_array_equal(both[:, row], kept_tokens(cache, press, obs)[:, 0])


def test_protect_last_keeps_the_question_outside_the_budget(one_layer):
    model, cfg, _ = one_layer
    lens = np.array([30, 12], np.int32)
    tokens = ragged_batch(lens, 32, seed=2)
    _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 40), tokens, lens)
    press = get_press("knorm", compression_ratio=0.75)
    question = np.array([5, 3])
    kept = kept_tokens(cache, press, protect_last=question)
    norms = np.linalg.norm(np.asarray(cache.k), axis=-1)  # [L, B, Hkv, S]
    for b, (n, q) in enumerate(zip(lens, question)):
        context = n - q
        want_context = np.sort(np.argsort(norms[0, b, 0, :context], kind="stable")[:compute_n_kept(context, 0.75)])
        np.testing.assert_array_equal(np.flatnonzero(kept[0, b, 0]), np.r_[want_context, context:n])
    both = kept_tokens(cache, press, image_len=[20, 8], protect_last=question)  # images beyond the budget
    for b, (n, q) in enumerate(zip(lens, question)):
        assert both[0, b, 0, n - q:n].all() and both[0, b, 0].sum() == compute_n_kept(n - q, 0.75) + q
    out = kvjax.compress(cache, press, protect_last=question)
    np.testing.assert_array_equal(np.asarray(out.kv_len), [compute_n_kept(25, 0.75) + 5, compute_n_kept(9, 0.75) + 3])
    with pytest.raises(kvjax.KVJaxError, match="protect_last"):
        kept_tokens(out, press, protect_last=[50, 0])


@pytest.mark.parametrize("name,kwargs", [("snapkv", {"window_size": 4}), ("knorm", {})])
def test_decode_after_press_equals_torch_over_kept_tokens(one_layer, name, kwargs):
    model, cfg, torch_model = one_layer  # one KV head: torch can drop the same tokens
    prompt = ragged_batch([20], 20, seed=4)[0]
    press = get_press(name, compression_ratio=0.5, **kwargs)
    logits, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 1, 40), prompt[None], press=press)
    kept = np.flatnonzero(kept_tokens(cache, press, obs)[0, 0, 0])
    cache = kvjax.compress(cache, press, observations=obs)
    assert int(cache.kv_len[0]) == 10 and int(cache.positions[0]) == 20
    out = kvjax.generate_from(model, cache, logits, max_new_tokens=6, eos_ids=())
    want_tokens, _ = torch_decode_over_kept(torch_model, prompt, kept, 20, num_new=6)
    np.testing.assert_array_equal(out.tokens[0], want_tokens)


def test_one_compile_for_all_ratios(one_layer):
    model, cfg, _ = one_layer
    tokens = ragged_batch([20], 20)
    before = None
    for ratio in (0.25, 0.5, 0.75):
        _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 40), tokens)
        kvjax.compress(cache, get_press("knorm", compression_ratio=ratio))
        before = apply._compress._cache_size() if before is None else before
    assert apply._compress._cache_size() == before


def test_user_errors_name_the_fix(one_layer):
    model, cfg, _ = one_layer
    assert "snapkv" in list_presses() and "l2_compress" in list_presses()
    with pytest.raises(kvjax.KVJaxError, match="unknown press"):
        get_press("nope")
    with pytest.raises(kvjax.KVJaxError, match="compression_ratio"):
        get_press("knorm", compression_ratio=1.0)
    with pytest.raises(kvjax.KVJaxError, match="unexpected keyword"):
        get_press("knorm", window_size=3)
    _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 40), ragged_batch([20], 20))
    with pytest.raises(kvjax.KVJaxError, match="observations"):
        kvjax.compress(cache, get_press("snapkv", compression_ratio=0.5))
    with pytest.raises(kvjax.KVJaxError, match="window_size"):
        kvjax.compress(cache, get_press("snapkv", compression_ratio=0.5, window_size=30), observations={})


def loud_prefix_cache(image_len, kv_len=(32, 20), positions=(40, 27), seed=5):
    """A random cache [L=2, B=2, Hkv=2, S=32, D=8] whose first image_len[b] keys of every row have
    100x the norm of the rest: knorm (score -||k||) ranks them lowest, so only protection keeps them."""
    rng = np.random.default_rng(seed)
    k, v = rng.standard_normal((2, 2, 2, 32, 8), np.float32), rng.standard_normal((2, 2, 2, 32, 8), np.float32)
    for b, n in enumerate(image_len):
        k[:, b, :, :n] *= 100
    cache = kvjax.KVCache(jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_len, jnp.int32),
                          jnp.asarray(positions, jnp.int32))
    return cache, k, v


def test_protect_image_keeps_the_image_even_when_it_scores_lowest():
    image_len, kv_len, ratio = [6, 4], [32, 20], 0.6
    press = get_press("knorm", compression_ratio=ratio)
    cache, k, v = loud_prefix_cache(image_len)
    norms = np.linalg.norm(k, axis=-1)  # [L, B, Hkv, S]
    kept = kept_tokens(cache, press, image_len=image_len)  # image_len protects the prefix
    unprotected = kept_tokens(cache, press)
    protected = kvjax.compress(cache, press, image_len, protect_image=True)
    plain = kvjax.compress(loud_prefix_cache(image_len)[0], press, image_len)  # protect_image=False
    for b, (img, n) in enumerate(zip(image_len, kv_len)):
        n_kept = compute_n_kept(n, ratio)
        assert img < n_kept and int(protected.kv_len[b]) == int(plain.kv_len[b]) == n_kept
        for layer in range(2):
            for h in range(2):
                rest = img + np.argsort(norms[layer, b, h, img:n], kind="stable")[:n_kept - img]
                np.testing.assert_array_equal(np.flatnonzero(kept[layer, b, h]), np.r_[:img, np.sort(rest)])
                lowest = np.sort(np.argsort(norms[layer, b, h, :n], kind="stable")[:n_kept])
                assert lowest.min() >= img  # unprotected, the image is the first thing dropped
                np.testing.assert_array_equal(np.flatnonzero(unprotected[layer, b, h]), lowest)
                np.testing.assert_array_equal(np.asarray(protected.k)[layer, b, h, :n_kept],
                                              k[layer, b, h, np.r_[:img, np.sort(rest)]])
                np.testing.assert_array_equal(np.asarray(plain.k)[layer, b, h, :n_kept], k[layer, b, h, lowest])
                np.testing.assert_array_equal(np.asarray(plain.v)[layer, b, h, :n_kept], v[layer, b, h, lowest])


@pytest.mark.parametrize("rope_positions,want", [(None, [40, 27]), ("original", [40, 27]), ("compressed", [16, 10])])
def test_press_rope_positions(rope_positions, want):
    """'original' (the press default) keeps counting real tokens; 'compressed' restarts at the new kv_len."""
    cache, _, _ = loud_prefix_cache([0, 0])
    out = kvjax.compress(cache, get_press("knorm", compression_ratio=0.5), rope_positions=rope_positions)
    np.testing.assert_array_equal(np.asarray(out.kv_len), [16, 10])
    np.testing.assert_array_equal(np.asarray(out.positions), want)
