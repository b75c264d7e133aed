"""Decoding after compression: RoPE positions vs cache lengths, checked end to end."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
from kvjax.compression.ccm import CompressorConfig, build_compressor
from tests.conftest import write_hf_model

SHIFT = 16.0  # keeps every pre-ReLU value positive, so the ReLUs pass values through unchanged


def pass_through_compressor(cfg, cf: int, pick: int, **overrides):
    """A compressor whose MLPs return token `pick` of each group of cf (up to float rounding)."""
    ccfg = CompressorConfig(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                            compression_factor=cf, min_seq_len=1, image_mode="text_mlp", **overrides)
    compressor = build_compressor(ccfg)
    dim, layers = cfg.head_dim, cfg.num_layers
    select = np.zeros((cf * dim, dim), np.float32)
    select[pick * dim:(pick + 1) * dim] = np.eye(dim)
    eye = np.broadcast_to(np.eye(dim, dtype=np.float32), (layers, dim, dim))
    for mlp in (compressor.text_k, compressor.text_v):
        mlp.w1[...] = jnp.broadcast_to(jnp.asarray(select), (layers, cf * dim, dim))
        mlp.b1[...] = jnp.full((layers, dim), SHIFT)
        mlp.w2[...], mlp.b2[...] = jnp.asarray(eye), jnp.zeros((layers, dim))
        mlp.w3[...], mlp.b3[...] = jnp.asarray(eye), jnp.full((layers, dim), -SHIFT)
    return compressor


def test_identity_compressor_leaves_generation_unchanged(tiny_llama):
    model, cfg = tiny_llama
    rng = np.random.default_rng(0)
    lens = np.array([11, 4, 17], np.int32)
    tokens = np.zeros((3, 17), np.int32)
    for row, n in enumerate(lens):
        tokens[row, :n] = rng.integers(3, 128, n)
    plain = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens, max_new_tokens=12, eos_ids=())

    logits, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 3, 64), tokens, lens)
    cache = kvjax.compress(cache, pass_through_compressor(cfg, cf=1, pick=0), None)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens)
    out = kvjax.generate_from(model, cache, logits, max_new_tokens=12, eos_ids=())
    np.testing.assert_array_equal(out.tokens, plain.tokens)


@pytest.fixture(scope="module")
def one_layer_llama(tmp_path_factory):
    """With one layer a token's K/V depend on that token and its position only, so a cache that
    keeps some tokens equals the cache of those tokens run alone at their original positions."""
    path = tmp_path_factory.mktemp("one_layer")
    torch_model = write_hf_model(path, "llama", seed=3, num_hidden_layers=1)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    return model, cfg, torch_model


def torch_decode_over_kept(torch_model, prompt, kept, first_position, num_new):
    """Greedy tokens and logits of torch decoding over the kept prompt tokens only."""
    with torch.no_grad():
        token = int(torch_model(torch.tensor(prompt[None])).logits[0, -1].argmax())
        out = torch_model(torch.tensor(prompt[kept][None]), position_ids=torch.tensor(kept[None]), use_cache=True)
        past, tokens, logits = out.past_key_values, [token], []
        for step in range(num_new - 1):
            out = torch_model(torch.tensor([[token]]), position_ids=torch.tensor([[first_position + step]]),
                              past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].numpy())
            token = int(out.logits[0, -1].argmax())
            tokens.append(token)
    return np.array(tokens), np.stack(logits)


@pytest.mark.parametrize("rope_positions", ["original", "compressed"])
def test_decode_after_compression_equals_torch_over_kept_tokens(one_layer_llama, rope_positions):
    model, cfg, torch_model = one_layer_llama
    prompt = np.random.default_rng(1).integers(3, 128, 13).astype(np.int32)
    cf, pick = 3, 2  # keep the last token of each group of 3; the 13th token is a leftover
    kept = np.array([2, 5, 8, 11, 12])
    logits, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 32), prompt[None])
    compressor = pass_through_compressor(cfg, cf=cf, pick=pick, rope_positions=rope_positions)
    cache = kvjax.compress(cache, compressor, None)
    assert int(cache.kv_len[0]) == len(kept)
    first_position = 13 if rope_positions == "original" else len(kept)
    assert int(cache.positions[0]) == first_position

    want_tokens, want_logits = torch_decode_over_kept(torch_model, prompt, kept, first_position, num_new=8)
    token = jnp.asarray([int(np.argmax(logits[0]))])
    got_logits = []
    for _ in range(7):
        step_logits, cache = kvjax.decode_step(model, cache, token)
        got_logits.append(np.asarray(step_logits[0]))
        token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    np.testing.assert_allclose(np.stack(got_logits), want_logits, atol=1e-4, rtol=0)
    assert int(cache.kv_len[0]) == len(kept) + 7 and int(cache.positions[0]) == first_position + 7

    _, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 32), prompt[None])
    out = kvjax.generate_from(model, kvjax.compress(cache, compressor, None), logits, max_new_tokens=8, eos_ids=())
    np.testing.assert_array_equal(out.tokens[0], want_tokens)
