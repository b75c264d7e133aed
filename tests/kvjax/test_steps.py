"""prefill / decode_step / generate / stream over the dense cache."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
from tests.kvjax.test_parity import ragged_batch

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def count_compiles():
    """Counts XLA backend compilations inside the block."""
    events = []

    def listener(name, _duration, **_kwargs):
        if name == BACKEND_COMPILE_EVENT:
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _torch_decode_reference(torch_model, k_cache, v_cache, kv_len, positions, tokens):
    """One decode token per row computed by hand with the torch model's weights and HF's RoPE:
    attention over cache slots [0, kv_len) plus the new token, RoPE at `positions`."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    lm = torch_model.model
    cfg = torch_model.config
    num_heads, num_kv, head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out_logits, new_keys = [], []
    for b in range(len(tokens)):
        x = lm.embed_tokens(torch.tensor([[tokens[b]]]))
        pos = torch.tensor([[positions[b]]])
        cos, sin = lm.rotary_emb(x, pos)
        row_keys = []
        for layer_idx, layer in enumerate(lm.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, 1, num_heads, head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, 1, num_kv, head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, 1, num_kv, head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            row_keys.append(k[0, :, 0].numpy())
            keys = torch.cat([torch.tensor(k_cache[layer_idx, b, :, :kv_len[b]]), k[0]], dim=1)
            values = torch.cat([torch.tensor(v_cache[layer_idx, b, :, :kv_len[b]]), v[0]], dim=1)
            group = num_heads // num_kv
            keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
            probs = torch.softmax(q[0] @ keys.transpose(1, 2) / head_dim ** 0.5, dim=-1)
            o = (probs @ values).transpose(0, 1).reshape(1, 1, -1)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        out_logits.append(torch_model.lm_head(lm.norm(x))[0, 0].numpy())
        new_keys.append(np.stack(row_keys))
    return np.stack(out_logits), np.stack(new_keys, axis=1)  # [B, V], [L, B, Hkv, D]


def test_decode_with_positions_ahead_of_kv_len_matches_hand_reference(hf_models):
    path, torch_model = hf_models["llama"]
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    rng = np.random.default_rng(0)
    shape = (cfg.num_layers, 2, cfg.num_kv_heads, 16, cfg.head_dim)
    kv_len, positions = np.array([5, 9], np.int32), np.array([12, 40], np.int32)
    k_cache = rng.normal(size=shape).astype(np.float32)
    v_cache = rng.normal(size=shape).astype(np.float32)
    for b in range(2):  # finite poison past kv_len: any stray read changes the result
        k_cache[:, b, :, kv_len[b]:] = 1e4
        v_cache[:, b, :, kv_len[b]:] = 1e4
    cache = kvjax.KVCache(k=jnp.asarray(k_cache), v=jnp.asarray(v_cache), kv_len=jnp.asarray(kv_len),
                          positions=jnp.asarray(positions))
    tokens = np.array([17, 99], np.int32)
    logits, cache = kvjax.decode_step(model, cache, tokens)
    with torch.no_grad():
        expected_logits, expected_keys = _torch_decode_reference(
            torch_model, k_cache, v_cache, kv_len, positions, tokens)
    np.testing.assert_allclose(np.asarray(logits), expected_logits, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), kv_len + 1)
    np.testing.assert_array_equal(np.asarray(cache.positions), positions + 1)
    new_k = np.asarray(cache.k)
    for b in range(2):
        np.testing.assert_allclose(new_k[:, b, :, kv_len[b]], expected_keys[:, b], atol=1e-5)
        np.testing.assert_array_equal(new_k[:, b, :, :kv_len[b]], k_cache[:, b, :, :kv_len[b]])


def test_incremental_decode_equals_full_forward(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=2, lens=(9, 12, 10))
    full, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 32), tokens, lens, all_logits=True)
    cache = kvjax.KVCache.for_model(cfg, 3, 32)
    logits, cache = kvjax.prefill(model, cache, tokens[:, :6], np.full(3, 6))
    np.testing.assert_allclose(logits, np.asarray(full)[:, 5], atol=1e-5)
    for t in range(6, 9):
        logits, cache = kvjax.decode_step(model, cache, tokens[:, t])
        np.testing.assert_allclose(logits, np.asarray(full)[:, t], atol=1e-5)


def test_chunked_prefill_equals_one_shot(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=3, lens=(11, 5, 8))
    one_shot, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 32), tokens, lens)
    first = np.minimum(lens, 4)
    cache = kvjax.KVCache.for_model(cfg, 3, 32)
    _, cache = kvjax.prefill(model, cache, tokens[:, :4], first)
    rest = np.zeros_like(tokens)
    for row in range(3):
        rest[row, :lens[row] - first[row]] = tokens[row, first[row]:lens[row]]
    logits, cache = kvjax.prefill(model, cache, rest, lens - first)
    np.testing.assert_allclose(logits, one_shot, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens)


def test_generate_and_decode_compile_once(tiny_llama):
    model, cfg = tiny_llama
    parts = kvjax.split(model)
    _, tokens, lens = ragged_batch(seed=4)
    kvjax.generate(parts, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens, max_new_tokens=20, eos_ids=())
    with count_compiles() as compiles:  # new prompt values, same shapes: nothing recompiles
        _, tokens2, _ = ragged_batch(seed=5)
        out = kvjax.generate(parts, kvjax.KVCache.for_model(cfg, 3, 64), tokens2, np.array([4, 13, 9]),
                             max_new_tokens=20, eos_ids=())
        assert (out.num_generated == 20).all()
    assert compiles == []
    cache = kvjax.KVCache.for_model(cfg, 3, 64)
    logits, cache = kvjax.prefill(parts, cache, tokens, lens)
    argmax = jax.jit(lambda x: jnp.argmax(x, axis=-1))
    with count_compiles() as first:
        logits, cache = kvjax.decode_step(parts, cache, argmax(logits))
    with count_compiles() as later:
        for _ in range(20):
            logits, cache = kvjax.decode_step(parts, cache, argmax(logits))
        jax.block_until_ready(logits)
    assert len(first) <= 2  # at most the decode step and the argmax (another test may have compiled them)
    assert later == []


def test_generate_stops_per_sequence_on_eos_and_budget(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=6)
    free = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens, max_new_tokens=12,
                          eos_ids=())
    eos = int(free.tokens[0, 3])  # make row 0's fourth token the EOS
    out = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens, max_new_tokens=12,
                         eos_ids=(eos,))
    first_eos = [int(np.argmax(row == eos)) if (row == eos).any() else None for row in free.tokens]
    for row in range(3):
        expected = 12 if first_eos[row] is None else first_eos[row] + 1
        assert out.num_generated[row] == expected
        np.testing.assert_array_equal(out.tokens[row, :expected], free.tokens[row, :expected])
    assert out.num_generated[0] <= 4 and out.num_generated.max() == 12  # one row stopped early, one did not
    # the finished row stopped advancing its cache; the others kept going
    np.testing.assert_array_equal(np.asarray(out.cache.kv_len), lens + out.num_generated - 1)


def test_generate_stops_when_the_cache_is_full(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=7, lens=(10, 4, 7))
    out = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 3, 12), tokens, lens, max_new_tokens=8,
                         eos_ids=())
    # a row can sample until its cache holds max_len tokens, plus the token it samples from the full cache
    np.testing.assert_array_equal(out.num_generated, np.minimum(12 - lens + 1, 8))
    assert int(np.asarray(out.cache.kv_len).max()) <= 12


def test_stream_yields_what_generate_returns(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=8)
    sampling = kvjax.Sampling(temperature=0.8, top_k=20, top_p=0.9)
    out = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens, max_new_tokens=10,
                         sampling=sampling, eos_ids=(5,), seed=3)
    streamed = list(kvjax.stream(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens,
                                 max_new_tokens=10, sampling=sampling, eos_ids=(5,), seed=3))
    got = np.stack([tok for tok, _ in streamed], axis=1)
    counts = np.sum([is_new for _, is_new in streamed], axis=0)
    np.testing.assert_array_equal(counts, out.num_generated)
    for row in range(3):
        n = out.num_generated[row]
        np.testing.assert_array_equal(got[row, :n], out.tokens[row, :n])


def test_inactive_rows_do_not_advance(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=9)
    cache = kvjax.KVCache.for_model(cfg, 3, 32)
    _, cache = kvjax.prefill(model, cache, tokens, lens)
    before = np.asarray(cache.k).copy()
    _, cache = kvjax.decode_step(model, cache, np.array([1, 2, 3]), active=np.array([True, False, True]))
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens + [1, 0, 1])
    np.testing.assert_array_equal(np.asarray(cache.k)[:, 1], before[:, 1])


def test_prompt_longer_than_cache_is_a_clear_error(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch()
    with pytest.raises(kvjax.KVJaxError, match="does not fit the KV cache.*--max-tokens"):
        kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 8), tokens, lens)


def test_prefill_from_embeddings_equals_prefill_from_tokens(tiny_llama):
    model, cfg = tiny_llama
    _, tokens, lens = ragged_batch(seed=10)
    from_tokens, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 32), tokens, lens)
    embeds = model.embed(jnp.asarray(tokens))  # what a VLM edits before prefill
    from_embeds, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 32), tokens, lens, embeds)
    np.testing.assert_allclose(from_embeds, from_tokens, atol=1e-6)
