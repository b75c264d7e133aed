"""The quality metrics against independent references: numpy loops on constructed logits, and
perplexity / agreement on a real model against one full forward (no decode loop, no shared code)."""

import math

import numpy as np
import pytest

import kvjax
from kvjax import evaluation


def softmax_row(row):
    e = [math.exp(x - max(row)) for x in row]
    return [x / sum(e) for x in e]


def test_token_scores_equal_a_python_loop():
    rng = np.random.default_rng(0)
    logits, targets = rng.standard_normal((6, 9)) * 3, rng.integers(0, 9, 6)
    nll, correct = evaluation.token_scores(logits, targets)
    for i, (row, t) in enumerate(zip(logits, targets)):
        assert nll[i] == pytest.approx(-math.log(softmax_row(list(row))[t]), rel=1e-9)
        assert correct[i] == (int(np.argmax(row)) == t)


def test_kl_is_full_given_compressed_and_a_worse_model_scores_worse():
    full = np.array([[4.0, 0.0, -2.0], [0.0, 3.0, 0.0]])
    worse = np.array([[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])  # row 0 changes its top token
    agree, kl = evaluation.compare(full, worse)
    for i in range(2):
        p, q = softmax_row(list(full[i])), softmax_row(list(worse[i]))
        assert kl[i] == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)), rel=1e-9)
        assert kl[i] != pytest.approx(sum(b * math.log(b / a) for a, b in zip(p, q)), rel=1e-3)  # direction matters
    assert agree.tolist() == [False, True]
    same_agree, same_kl = evaluation.compare(full, full)
    assert same_agree.all() and np.abs(same_kl).max() < 1e-12


@pytest.fixture(scope="module")
def demo():
    from kvjax.testing import ensure_demo_checkpoint

    model, tokenizer, cfg = kvjax.load(ensure_demo_checkpoint(), dtype="float32")
    ids = tokenizer.encode(kvjax.testing.DEMO_TEXT, add_special_tokens=False)[:40]
    return model, cfg, ids


def test_perplexity_equals_one_full_forward(demo):
    """Scored tokens are ids[context:], each predicted by the logits one position before it."""
    model, cfg, ids = demo
    context, cont = 24, 8
    none = evaluation.parse_methods([])[0]
    got = evaluation.perplexity(model, ids, none, context_len=context, continuation_len=cont)
    window = np.asarray(ids[:context + cont], np.int32)[None]
    logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 64), window, all_logits=True)
    logp = np.asarray(logits[0], np.float64)
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(-1, keepdims=True)
    nll = [-logp[t - 1, ids[t]] for t in range(context, context + cont)]
    assert got["ppl"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-4) and got["num_scored"] == cont


def test_agreement_kl_equals_an_independent_computation(demo):
    model, cfg, ids = demo
    prompt, gen_len = ids[:24], 6
    method = evaluation.parse_methods(["knorm:0.75"])[1]
    got, reference = evaluation.agreement(model, [prompt], method, gen_len=gen_len)
    tokens = np.asarray(prompt, np.int32)[None]
    greedy = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 1, 64), tokens, max_new_tokens=gen_len, eos_ids=())
    generated = greedy.tokens[0, :gen_len]
    assert reference[0][0] == generated.tolist()
    full, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 64),
                            np.concatenate([tokens, generated[None, :-1]], 1), all_logits=True)
    first, cache = kvjax.prefill_and_compress(model, kvjax.KVCache.for_model(cfg, 1, 64), tokens, method=method.method)
    rest, _ = kvjax.prefill(model, cache, generated[None, :-1], all_logits=True)
    ours = np.concatenate([np.asarray(first), np.asarray(rest[0])])
    agree, kl = evaluation.compare(np.asarray(full[0, len(prompt) - 1:]), ours)
    assert got["kl"] == pytest.approx(float(np.mean(kl)), rel=1e-3, abs=1e-6) and got["kl"] > 1e-4
    assert got["top1_agreement"] == pytest.approx(float(np.mean(agree)))
