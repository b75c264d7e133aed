"""Each loss term against a straightforward numpy computation on small random distributions."""

import numpy as np
import pytest

from training import losses


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


@pytest.fixture
def case():
    rng = np.random.default_rng(0)
    t, s = rng.normal(size=(2, 3, 11)) * 2, rng.normal(size=(2, 3, 11)) * 2
    ht, hs = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    mask = np.array([[True, True, False], [True, False, False]])
    return t.astype(np.float32), s.astype(np.float32), ht.astype(np.float32), hs.astype(np.float32), mask


def np_top_p_target(p, top_p):
    out = np.zeros_like(p)
    for idx in np.ndindex(p.shape[:-1]):
        row = p[idx]
        order = np.argsort(-row)
        keep = min(int((np.cumsum(row[order]) <= top_p).sum()) + 1, len(row))
        out[idx][order[:keep]] = row[order[:keep]]
        out[idx] /= out[idx].sum() + losses.EPS
    return out


def test_kl_with_temperature(case):
    t, s, _, _, _ = case
    for temp in (1.0, 2.0):
        p, q = softmax(t / temp), softmax(s / temp)
        want = (p * (np.log(p) - np.log(q))).sum(-1) * temp**2
        np.testing.assert_allclose(losses.kl_divergence(t, s, temp), want, rtol=1e-5, atol=1e-6)


def test_probability_terms(case):
    t, s, _, _, _ = case
    p, q = softmax(t), softmax(s)
    eps = losses.EPS
    target = np_top_p_target(p, 0.9)
    assert ((target > 0).sum(-1) < p.shape[-1]).any()  # the truncation does something here
    np.testing.assert_allclose(losses.top_p_target(p, 0.9), target, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses.top_p_cross_entropy(p, q, 0.9), -(target * np.log(q + eps)).sum(-1), rtol=1e-5)
    m = (p + q) / 2
    js = 0.5 * ((p * np.log(p / (m + eps) + eps)).sum(-1) + (q * np.log(q / (m + eps) + eps)).sum(-1))
    np.testing.assert_allclose(losses.js_divergence(p, q), js, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(losses.l1_distance(p, q), np.abs(p - q).sum(-1), rtol=1e-5)
    np.testing.assert_array_equal(losses.agreement(t, s), (t.argmax(-1) == s.argmax(-1)).astype(np.float32))


def test_hidden_terms(case):
    _, _, ht, hs, _ = case
    np.testing.assert_allclose(losses.hidden_mse(ht, hs), ((hs - ht) ** 2).mean(-1), rtol=1e-5)
    a, b = softmax(hs), softmax(ht)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(losses.hidden_cosine(ht, hs), 1 - cos, rtol=1e-5, atol=1e-6)


def test_fastcache_composite_and_mask(case):
    t, s, ht, hs, mask = case
    cfg = losses.LossConfig.preset("fastcache")
    total, metrics = losses.distillation_loss(cfg, t, s, ht, hs, mask)
    p, q = softmax(t), softmax(s)

    def mean(values):
        return values[mask].mean()

    ce = mean(-(np_top_p_target(p, 0.9) * np.log(q + losses.EPS)).sum(-1))
    js, l1 = float(metrics["js"]), mean(np.abs(p - q).sum(-1))
    a, b = softmax(hs), softmax(ht)
    cos = 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    hidden = (mean(((hs - ht) ** 2).mean(-1)) + mean(cos)) / 2
    want = 0.5 * (0.5 * ce + 0.3 * js + 0.2 * l1) + 0.5 * hidden
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    kl_total, kl_metrics = losses.distillation_loss(losses.LossConfig(), t, s, ht, hs, mask)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    np.testing.assert_allclose(float(kl_total), mean(kl), rtol=1e-5)
    np.testing.assert_allclose(float(kl_metrics["agreement"]), mean(t.argmax(-1) == s.argmax(-1)))
