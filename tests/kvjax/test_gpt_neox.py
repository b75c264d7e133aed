"""GPT-NeoX (Pythia) equals transformers' GPTNeoXForCausalLM on tiny random configs, and the
compression methods (presses, CCM) run on its cache (partial rotary: keys rotated in part)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import kvjax
from kvjax.compression.presses import compute_n_kept
from kvjax.compression.presses.queries import project
from kvjax.config import ModelConfig, RopeConfig
from kvjax.models.gpt_neox import GPTNeoXForCausalLM, gpt_neox_rename
from kvjax.models.llama import CausalLM
from tests.kvjax.compression.presses import reference as ref

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=256, initializer_range=0.2, bos_token_id=1, eos_token_id=2)
# name -> what sets it apart: partial rotary + parallel residual (Pythia), or the whole head rotated,
# sequential residual, tied head, tanh gelu and another RoPE base.
CONFIGS = {
    "pythia": dict(rotary_pct=0.25, use_parallel_residual=True),
    "sequential": dict(rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=True,
                       hidden_act="gelu_new", rotary_emb_base=1000.0),
}
LENS = (7, 13, 3)


def write_neox(path, seed=0, **overrides):
    config = transformers.GPTNeoXConfig(**{**TINY, **overrides})
    config.architectures = ["GPTNeoXForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def load_neox(path):
    """Through kvjax.load once the loading table has a gpt_neox row; until then the same steps by hand."""
    if "gpt_neox" in kvjax.loading.LOADERS:
        model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
        return model, cfg
    cfg = ModelConfig.from_hf_config(transformers.AutoConfig.from_pretrained(path))
    abstract = nnx.eval_shape(lambda: GPTNeoXForCausalLM(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    tensors = kvjax.loading.iter_tensors(kvjax.loading.safetensors_files(path))
    return kvjax.loading.fill_module(abstract, tensors, dtype=jnp.float32, rename=gpt_neox_rename(cfg)), cfg


def build(tmp_path_factory, name, seed=0):
    path = tmp_path_factory.mktemp(f"neox_{name}")
    torch_model = write_neox(path, seed, **CONFIGS[name])
    model, cfg = load_neox(path)
    return model, cfg, torch_model


@pytest.fixture(scope="module", params=list(CONFIGS))
def neox(request, tmp_path_factory):
    return build(tmp_path_factory, request.param)


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
    """The partial-rotary config (keys rotated in their first quarter): compression runs on it."""
    return build(tmp_path_factory, "pythia", seed=1)


def ragged_batch(seed=0, lens=LENS):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 128, n).astype(np.int32) for n in lens]
    tokens = np.zeros((len(lens), max(lens)), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    return prompts, tokens, np.array(lens, np.int32)


def torch_logits(torch_model, prompt):
    with torch.no_grad():
        return torch_model(torch.tensor(prompt[None], dtype=torch.long)).logits[0].numpy()


def test_config_reads_gpt_neox_fields(neox):
    _, cfg, torch_model = neox
    hf = torch_model.config
    assert cfg.family == "gpt_neox" and cfg.norm == "layer" and cfg.num_kv_heads == cfg.num_heads == 4
    assert cfg.rope_dim == int(16 * hf.rope_parameters["partial_rotary_factor"])
    assert cfg.use_parallel_residual == hf.use_parallel_residual
    assert cfg.rope.theta == hf.rope_parameters["rope_theta"] and cfg.hidden_act == hf.hidden_act
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings and cfg.qkv_bias and cfg.mlp_bias


def test_ragged_prefill_logits_match_transformers(neox):
    model, cfg, torch_model = neox
    prompts, tokens, lens = ragged_batch()
    logits, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, batch=3, max_len=64), tokens, lens,
                                  all_logits=True)
    logits = np.asarray(logits)
    for row, prompt in enumerate(prompts):
        np.testing.assert_allclose(logits[row, :len(prompt)], torch_logits(torch_model, prompt), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens)


def test_greedy_generation_matches_transformers(neox):
    model, cfg, torch_model = neox
    prompts, tokens, lens = ragged_batch(seed=1)
    out = kvjax.generate(model, kvjax.KVCache.for_model(cfg, batch=3, max_len=64), tokens, lens,
                         max_new_tokens=8, eos_ids=())
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            expected = torch_model.generate(torch.tensor(prompt[None], dtype=torch.long), max_new_tokens=8,
                                            do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(prompt):]
        assert out.num_generated[row] == 8
        np.testing.assert_array_equal(out.tokens[row], expected.numpy())


def test_incremental_decode_equals_full_forward(neox):
    model, cfg, _ = neox
    lens, num_new = np.array([5, 9], np.int32), 4
    _, tokens, _ = ragged_batch(seed=2, lens=tuple(lens + num_new))
    full, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 32), tokens, lens + num_new, all_logits=True)
    logits, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 2, 32), tokens, lens)
    rows = np.arange(2)
    for step in range(num_new):
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[rows, lens + step - 1], atol=1e-4, rtol=0)
        logits, cache = kvjax.decode_step(model, cache, tokens[rows, lens + step])
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens + num_new)


def prefilled(model, cfg, tokens, lens):
    logits, cache = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, len(lens), 64), tokens, lens)
    return logits, cache, np.asarray(cache.k), np.asarray(cache.v)


def decode_twice(model, cache, tokens):
    for _ in range(2):
        logits, cache = kvjax.decode_step(model, cache, tokens)
        assert np.isfinite(np.asarray(logits)).all()
    return cache


def assert_kept(cache, keys, lens, kept_of):
    """cache holds, for each row b, layer l and head h, keys[l, b, h, kept_of(l, b, h)] in order."""
    got = np.asarray(cache.k)
    for b, n in enumerate(lens):
        for layer in range(keys.shape[0]):
            for head in range(keys.shape[2]):
                idx = kept_of(layer, b, head, n)
                np.testing.assert_allclose(got[layer, b, head, :len(idx)], keys[layer, b, head, idx], atol=1e-5,
                                           rtol=0, err_msg=f"row {b} layer {layer} head {head}")


def test_knorm_l2_and_streaming_presses_on_neox_cache(pythia):
    model, cfg, _ = pythia
    _, tokens, lens = ragged_batch(seed=3, lens=(20, 12))
    next_tokens = np.array([5, 6], np.int32)

    def lowest_norms(num_kept):
        return lambda l, b, h, n: np.sort(np.argsort(np.linalg.norm(keys[l, b, h, :n], axis=-1),
                                                     kind="stable")[:num_kept(l, n)])

    _, cache, keys, _ = prefilled(model, cfg, tokens, lens)
    cache = kvjax.compress(cache, kvjax.presses.get_press("knorm", compression_ratio=0.5))
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens // 2)
    assert_kept(cache, keys, lens, lowest_norms(lambda l, n: compute_n_kept(n, 0.5)))
    np.testing.assert_array_equal(np.asarray(decode_twice(model, cache, next_tokens).kv_len), lens // 2 + 2)

    # seed 004's l2_compress with a skipped layer: per-layer lengths ([L, B, T] write slots).
    _, cache, keys, _ = prefilled(model, cfg, tokens, lens)
    press = kvjax.presses.get_press("l2_compress", keep_ratio=0.3, prune_after=4, skip_layers=(0,))
    cache = kvjax.compress(cache, press)
    kept = np.stack([lens, np.ceil(0.3 * lens).astype(np.int32)])
    np.testing.assert_array_equal(np.asarray(cache.layer_kv_len), kept)
    assert_kept(cache, keys, lens, lowest_norms(lambda l, n: n if l == 0 else math.ceil(0.3 * n)))
    np.testing.assert_array_equal(np.asarray(decode_twice(model, cache, next_tokens).layer_kv_len), kept + 2)

    _, cache, keys, _ = prefilled(model, cfg, tokens, lens)
    cache = kvjax.compress(cache, kvjax.presses.get_press("streaming_llm", start_size=2, recent_size=6))
    np.testing.assert_array_equal(np.asarray(cache.kv_len), [8, 8])
    np.testing.assert_array_equal(np.asarray(cache.positions), lens)  # RoPE keeps counting real tokens
    assert_kept(cache, keys, lens, lambda l, b, h, n: np.r_[0:2, n - 6:n])
    decode_twice(model, cache, next_tokens)


def torch_layer_tensors(torch_model, prompt):
    """Per layer, from transformers' own code: q [n, H, D] (partial RoPE applied), k [H, n, D] cached."""
    from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

    neox, n = torch_model.gpt_neox, len(prompt)
    with torch.no_grad():
        out = torch_model(torch.tensor(prompt[None], dtype=torch.long), output_hidden_states=True, use_cache=True)
        cos, sin = neox.rotary_emb(out.hidden_states[0], torch.arange(n)[None])
        layers = []
        for index, layer in enumerate(neox.layers):
            qkv = layer.attention.query_key_value(layer.input_layernorm(out.hidden_states[index]))
            q = qkv.view(1, n, -1, 3 * layer.attention.head_size).transpose(1, 2)[..., :layer.attention.head_size]
            q = apply_rotary_pos_emb(q, q, cos, sin)[0]
            layers.append(dict(q=q[0].transpose(0, 1).double().numpy(),
                               k=out.past_key_values.layers[index].keys[0].double().numpy()))
    return layers


def test_snapkv_keeps_the_numpy_reference_set(pythia):
    model, cfg, torch_model = pythia
    prompts, tokens, lens = ragged_batch(seed=4, lens=(24, 17))
    press = kvjax.presses.get_press("snapkv", compression_ratio=0.5, window_size=4, kernel_size=3)
    _, _, keys, _ = prefilled(model, cfg, tokens, lens)
    _, cache = kvjax.prefill_and_compress(model, kvjax.KVCache.for_model(cfg, 2, 64), tokens, lens, method=press)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), [compute_n_kept(n, 0.5) for n in lens])
    # sets[b][l][h]: the reference's kept indices from transformers' queries and keys, in float64.
    sets = [[ref.top_sets(ref.snapkv(t, 4, 3), compute_n_kept(len(p), 0.5))
             for t in torch_layer_tensors(torch_model, p)] for p in prompts]
    assert_kept(cache, keys, lens, lambda l, b, h, n: sets[b][l][h])
    knorm = [np.sort(np.argsort(np.linalg.norm(keys[l, b, h, :n], axis=-1))[:len(sets[b][l][h])])
             for b, n in enumerate(lens) for l in range(cfg.num_layers) for h in range(cfg.num_kv_heads)]
    snap = [sets[b][l][h] for b in range(2) for l in range(cfg.num_layers) for h in range(cfg.num_kv_heads)]
    assert not all(np.array_equal(a, b) for a, b in zip(knorm, snap))  # the queries mattered
    decode_twice(model, cache, np.array([5, 6], np.int32))


def test_ccm_compression_and_decode(pythia):
    model, cfg, _ = pythia
    _, tokens, lens = ragged_batch(seed=5, lens=(23, 11))
    compressor = kvjax.build_compressor(kvjax.CompressorConfig(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                                               head_dim=cfg.head_dim), rngs=nnx.Rngs(0))
    _, cache, _, _ = prefilled(model, cfg, tokens, lens)
    cache = kvjax.compress(cache, compressor)
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens // 5 + lens % 5)  # cf 5, text only
    cache = decode_twice(model, cache, np.array([5, 6], np.int32))
    np.testing.assert_array_equal(np.asarray(cache.kv_len), lens // 5 + lens % 5 + 2)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_attention_project_reproduces_the_cached_keys(family):
    """Attention.project (what query presses call through presses.queries.project) equals the
    forward's own keys after RoPE; pre-RoPE, only the rotary dims differ (NeoX: the first 4 of 16)."""
    cfg = ModelConfig.tiny(family)
    graphdef, state = nnx.split((GPTNeoXForCausalLM if family == "gpt_neox" else CausalLM)(cfg, rngs=nnx.Rngs(0)))
    n = 6
    positions = jnp.arange(n, dtype=jnp.int32)[None]

    @jax.jit
    def run(state, cache):
        model, taps = nnx.merge(graphdef, state), {}
        tap = lambda layer, attn, h: taps.setdefault(layer, (  # noqa: E731
            project(attn, h, "k", positions), project(attn, h, "q"), project(attn, h, "q", positions)))
        _, cache_k, _ = model(model.embed(positions + 3), positions, cache.k, cache.v, positions, positions + 1, tap)
        return cache_k, taps

    cache_k, taps = run(state, kvjax.KVCache.for_model(cfg, 1, 8))
    for layer, (keys, pre, rotated) in taps.items():
        np.testing.assert_allclose(keys[0].transpose(1, 0, 2), cache_k[layer, 0, :, :n], atol=1e-6, rtol=0)
        assert pre.shape == (1, n, cfg.num_heads, cfg.head_dim)
        np.testing.assert_allclose(pre[:, 0], rotated[:, 0], atol=1e-6)  # position 0: RoPE is the identity
        np.testing.assert_array_equal(pre[..., cfg.rope_dim:], rotated[..., cfg.rope_dim:])
        assert not np.allclose(pre[:, 1:, :, :cfg.rope_dim], rotated[:, 1:, :, :cfg.rope_dim])


def test_bad_configs_raise_kvjax_errors():
    with pytest.raises(kvjax.KVJaxError, match="hidden_act"):
        ModelConfig.from_hf_config(transformers.GPTNeoXConfig(**TINY, hidden_act="relu"))
    with pytest.raises(kvjax.KVJaxError, match="partial_rotary_factor"):
        RopeConfig.from_hf({"partial_rotary_factor": 0.5}, 64)  # Llama families rotate the whole head
    with pytest.raises(kvjax.KVJaxError, match="rotary_dim"):
        ModelConfig.tiny("llama", rotary_dim=8)
    with pytest.raises(kvjax.KVJaxError, match="rotary_dim"):
        ModelConfig.tiny("gpt_neox", rotary_dim=3)
    with pytest.raises(kvjax.KVJaxError, match="use_parallel_residual"):
        ModelConfig.tiny("qwen2", use_parallel_residual=True)
    with pytest.raises(kvjax.KVJaxError, match="num_kv_heads"):
        ModelConfig.tiny("gpt_neox", num_kv_heads=2)
