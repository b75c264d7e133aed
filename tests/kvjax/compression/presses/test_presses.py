"""Each press keeps the same token set per layer and KV head as an independent numpy version."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kvjax
from kvjax.compression import prefill_observing as prefill
from kvjax.compression.presses import get_press, kept_tokens
from tests.conftest import write_hf_model
from tests.kvjax.compression.presses import reference as ref

N = 48  # prompt length


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    path = tmp_path_factory.mktemp("press_llama")
    # std 0.2 gives clear top-k margins (kvpress-presses.md §6.2); distinct tokens avoid Knorm ties.
    torch_model = write_hf_model(path, "llama", seed=5, initializer_range=0.2)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    prompt = np.random.default_rng(0).permutation(np.arange(3, 128))[:N].astype(np.int32)
    return model, cfg, torch_model, prompt, ref.layer_tensors(torch_model, prompt)


def future_cos_sin(torch_model, n, num_future):
    with torch.no_grad():
        positions = torch.arange(n, n + num_future)[None]
        x = torch.zeros(1, num_future, torch_model.config.hidden_size)
        return [t[0].double().numpy() for t in torch_model.model.rotary_emb(x, positions)]


def kvjax_sets(model, cfg, prompt, press):
    _, cache, observations = prefill(model, kvjax.KVCache.for_model(cfg, 1, 64), prompt[None], press=press)
    kept = kept_tokens(cache, press, observations)  # [L, 1, Hkv, S]
    return [[np.flatnonzero(head) for head in layer[0]] for layer in kept]


CASES = {  # name -> (kwargs, numpy scores per layer tensors)
    "knorm": ({}, lambda t, r, tm: ref.knorm(t)),
    "streaming_llm_press": ({"n_sink": 4}, lambda t, r, tm: ref.streaming(t, r, 4)),
    "snapkv": ({"window_size": 8, "kernel_size": 5}, lambda t, r, tm: ref.snapkv(t, 8, 5)),
    "tova": ({}, lambda t, r, tm: ref.tova(t)),
    "expected_attention": ({"n_future_positions": 32}, lambda t, r, tm: ref.expected(
        t, future_cos_sin(tm, N, 32), 32, 4)),
    "observed_attention": ({}, lambda t, r, tm: ref.observed(t)),
}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", list(CASES))
def test_kept_sets_equal_numpy_reference(setup, name, ratio):
    model, cfg, torch_model, prompt, tensors = setup
    kwargs, scores = CASES[name]
    got = kvjax_sets(model, cfg, prompt, get_press(name, compression_ratio=ratio, **kwargs))
    n_kept = max(1, int(N * (1 - ratio)))
    for layer, t in enumerate(tensors):
        want = ref.top_sets(scores(t, ratio, torch_model), n_kept)
        for head in range(cfg.num_kv_heads):
            np.testing.assert_array_equal(got[layer][head], want[head], err_msg=f"{name} layer {layer} head {head}")


def test_pyramidkv_budgets_and_sets(setup):
    model, cfg, torch_model, prompt, tensors = setup
    press = get_press("pyramidkv", compression_ratio=0.5, window_size=4, beta=2)
    budgets = [press.num_kept(N, layer, 2) for layer in range(2)]
    assert budgets == [36, 12]  # C - w = 24, min 24 / 2 = 12, max 2 * 24 - 12 = 36
    got = kvjax_sets(model, cfg, prompt, press)
    for layer, t in enumerate(tensors):
        want = ref.top_sets(ref.snapkv(t, 4, 5), budgets[layer])
        for head in range(cfg.num_kv_heads):
            np.testing.assert_array_equal(got[layer][head], want[head])


def torch_decode_over_layer_sets(torch_model, prompt, kept, num_new):
    """Greedy logits of torch decoding over a cache that holds, per layer and KV head, only the
    kept prompt tokens (layers of different lengths: sdpa needs no mask for one query)."""
    from transformers import DynamicCache

    with torch.no_grad():
        out = torch_model(torch.tensor(prompt[None]), use_cache=True)
        past = DynamicCache()
        for layer, full in enumerate(out.past_key_values.layers):
            index = torch.tensor(np.stack(kept[layer]))[None, :, :, None].expand(-1, -1, -1, full.keys.shape[-1])
            past.update(full.keys.gather(2, index), full.values.gather(2, index), layer)
        token, logits = int(out.logits[0, -1].argmax()), []
        for step in range(num_new):
            out = torch_model(torch.tensor([[token]]), position_ids=torch.tensor([[len(prompt) + step]]),
                              past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0, -1].numpy())
            token = int(logits[-1].argmax())
    return np.stack(logits)


@pytest.mark.parametrize("name,kwargs", [
    ("pyramidkv", dict(compression_ratio=0.5, window_size=4, beta=2)),
    ("l2_compress", dict(keep_ratio=0.5, prune_after=0, skip_layers=(1,))),
])
def test_per_layer_budgets_compress_and_decode_like_torch(setup, name, kwargs):
    model, cfg, torch_model, prompt, _ = setup
    press = get_press(name, **kwargs)
    budgets = [press.num_kept(N, layer, cfg.num_layers) for layer in range(cfg.num_layers)]
    assert len(set(budgets)) > 1
    logits, cache, obs = prefill(model, kvjax.KVCache.for_model(cfg, 1, 64), prompt[None], press=press)
    kept = [[np.flatnonzero(head) for head in layer[0]] for layer in kept_tokens(cache, press, obs)]
    full_k = np.asarray(cache.k)
    cache = kvjax.compress(cache, press, observations=obs)
    np.testing.assert_array_equal(np.asarray(cache.layer_kv_len)[:, 0], budgets)
    assert int(cache.kv_len[0]) == max(budgets) and int(cache.positions[0]) == N
    for layer, budget in enumerate(budgets):  # kept tokens first, in positional order
        for head in range(cfg.num_kv_heads):
            np.testing.assert_array_equal(np.asarray(cache.k)[layer, 0, head, :budget],
                                          full_k[layer, 0, head, kept[layer][head]])
    assert int(cache.used_bytes()[0]) == sum(budgets) * 2 * cfg.num_kv_heads * cfg.head_dim * 4

    want = torch_decode_over_layer_sets(torch_model, prompt, kept, num_new=4)
    token, got = jnp.argmax(logits, axis=-1).astype(jnp.int32), []
    for _ in range(4):
        step_logits, cache = kvjax.decode_step(model, cache, token)
        got.append(np.asarray(step_logits[0]))
        token = jnp.argmax(step_logits, axis=-1).astype(jnp.int32)
    np.testing.assert_allclose(np.stack(got), want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(cache.layer_kv_len)[:, 0], np.array(budgets) + 4)
    with pytest.raises(kvjax.KVJaxError, match="per-layer budgets"):
        kvjax.compress(cache, get_press("knorm", compression_ratio=0.5))


SEED_CASES = [
    ("l2_compress", dict(keep_ratio=0.3, prune_after=10), lambda n, layer: math.ceil(0.3 * n), "low"),
    ("l2_compress", dict(keep_ratio=0.3, prune_after=100), lambda n, layer: n, "low"),
    ("l2_compress", dict(keep_ratio=0.5, prune_after=0, skip_layers=(1,)), lambda n, layer: n if layer else 24, "low"),
    ("fix_size_l2", dict(cache_size=20, protected_ratio=0.25, strategy="keep_low"), 20, "low"),
    ("fix_size_l2", dict(cache_size=20, protected_ratio=0.25, strategy="keep_high"), 20, "high"),
    ("fix_size_l2", dict(cache_size=20, protected_ratio=0.5, strategy="random"), 20, "random"),
    ("streaming_llm", dict(start_size=3, recent_size=10), 13, "start_recent"),
]


@pytest.mark.parametrize("name,kwargs,budget,rule", SEED_CASES)
def test_seed_methods_equal_straightforward_versions(setup, name, kwargs, budget, rule):
    model, cfg, _, prompt, tensors = setup
    got = kvjax_sets(model, cfg, prompt, get_press(name, **kwargs))
    for layer, t in enumerate(tensors):
        n_kept = budget(N, layer) if callable(budget) else budget
        norms = np.linalg.norm(t["k"], axis=-1)  # [Hkv, N]
        for head in range(cfg.num_kv_heads):
            if rule == "start_recent":
                want = np.r_[0:kwargs["start_size"], N - kwargs["recent_size"]:N]
            elif name == "fix_size_l2":
                num_protected = int(kwargs["protected_ratio"] * kwargs["cache_size"])
                old = np.arange(N - num_protected)
                if rule == "random":  # only the protected part and the count are fixed
                    assert len(got[layer][head]) == n_kept
                    assert set(range(N - num_protected, N)) <= set(got[layer][head])
                    continue
                order = np.argsort(norms[head][old] * (1 if rule == "low" else -1), kind="stable")
                want = np.sort(np.r_[old[order[:n_kept - num_protected]], N - num_protected:N])
            else:
                want = np.sort(np.argsort(norms[head], kind="stable")[:n_kept])
            np.testing.assert_array_equal(got[layer][head], want, err_msg=f"{name} {kwargs} layer {layer}")
