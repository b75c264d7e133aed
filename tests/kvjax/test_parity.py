"""kvjax models equal transformers' PyTorch models on tiny random configs."""

import numpy as np
import pytest
import torch

import kvjax
from tests.conftest import FAMILIES, write_hf_model

PROMPT_LENS = (7, 13, 3)


def ragged_batch(seed=0, lens=PROMPT_LENS, vocab=128):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, vocab, n) for n in lens]
    tokens = np.zeros((len(lens), max(lens)), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return prompts, tokens, np.array(lens, np.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(hf_models, family):
    path, torch_model = hf_models[family]
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    prompts, tokens, lens = ragged_batch()
    cache = kvjax.KVCache.for_model(cfg, batch=3, max_len=64)
    logits, cache = kvjax.prefill(model, cache, tokens, lens, all_logits=True)
    logits = np.asarray(logits)
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = torch_model(torch.tensor(prompt[None])).logits[0].numpy()
        np.testing.assert_allclose(logits[row, :len(prompt)], expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens)
    np.testing.assert_array_equal(np.asarray(cache.positions), lens)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(hf_models, family):
    path, torch_model = hf_models[family]
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    prompts, tokens, lens = ragged_batch(seed=1)
    cache = kvjax.KVCache.for_model(cfg, batch=3, max_len=64)
    out = kvjax.generate(model, cache, tokens, lens, max_new_tokens=32, eos_ids=())
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor(prompt[None]), max_new_tokens=32, do_sample=False,
                                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].numpy()
        assert out.num_generated[row] == 32
        np.testing.assert_array_equal(out.tokens[row], expected)


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
])
def test_scaled_rope_matches_transformers(tmp_path, rope_scaling):
    torch_model = write_hf_model(tmp_path, "llama", rope_scaling=rope_scaling)
    model, _, cfg = kvjax.load(tmp_path, dtype="float32", tokenizer=False)
    prompt = np.arange(3, 40, dtype=np.int32)
    logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 64), prompt[None], all_logits=True)
    with torch.no_grad():
        expected = torch_model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(logits)[0], expected, atol=1e-4, rtol=0)


def test_bfloat16_load_runs_close_to_float32(hf_models):
    path, _ = hf_models["qwen2"]
    m32, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    m16, _, _ = kvjax.load(path, dtype="bfloat16", tokenizer=False)
    assert m16.dtype == np.dtype("bfloat16")
    prompts, tokens, lens = ragged_batch()
    l32, _ = kvjax.prefill(m32, kvjax.KVCache.for_model(cfg, 3, 32), tokens, lens)
    l16, _ = kvjax.prefill(m16, kvjax.KVCache.for_model(cfg, 3, 32, dtype="bfloat16"), tokens, lens)
    assert l16.dtype == np.float32  # logits always float32
    assert np.abs(np.asarray(l16) - np.asarray(l32)).max() < 0.15
