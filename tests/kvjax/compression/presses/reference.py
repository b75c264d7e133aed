"""Independent numpy (float64) implementations of the press formulas in
shared/reference/kvpress-presses.md, fed with the transformers model's own tensors."""

from __future__ import annotations

import math

import numpy as np
import torch


def layer_tensors(torch_model, prompt: np.ndarray) -> list[dict]:
    """Per layer: h [n, H] (attention input), q_pre [n, Hq, D], q [n, Hq, D] (RoPE), k, v [Hkv, n, D]."""
    cfg = torch_model.config
    with torch.no_grad():
        ids = torch.tensor(prompt[None])
        out = torch_model(ids, output_hidden_states=True, use_cache=True)
        positions = torch.arange(len(prompt))[None]
        cos, sin = (x[0].double().numpy() for x in torch_model.model.rotary_emb(out.hidden_states[0], positions))
    layers = []
    for index, layer in enumerate(torch_model.model.layers):
        with torch.no_grad():
            h = layer.input_layernorm(out.hidden_states[index])[0].double().numpy()
        attn = layer.self_attn
        q_pre = (h @ attn.q_proj.weight.detach().double().numpy().T).reshape(len(prompt), cfg.num_attention_heads, -1)
        cached = out.past_key_values.layers[index]
        layers.append(dict(h=h, q_pre=q_pre, q=rope(q_pre, cos[:, None], sin[:, None]),
                           k=cached.keys[0].double().numpy(), v=cached.values[0].double().numpy()))
    return layers


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def group_mean(x, num_kv_heads):  # [Hq, n] -> [Hkv, n]
    return x.reshape(num_kv_heads, -1, x.shape[-1]).mean(axis=1)


def attention(q, k, num_rows):
    """Softmax of the last num_rows queries q [n, Hq, D] over keys k [Hkv, n, D], causal -> [Hq, w, n]."""
    n, num_heads, dim = q.shape
    group = num_heads // k.shape[0]
    rows = np.arange(n - num_rows, n)
    out = np.zeros((num_heads, num_rows, n))
    for j in range(num_heads):
        logits = q[rows, j] @ k[j // group].T / math.sqrt(dim)
        logits[np.arange(n)[None, :] > rows[:, None]] = -np.inf
        out[j] = softmax(logits)
    return out


def with_protected(scores, num, where):  # append/prepend `num` columns of max + 1
    pad = np.full((scores.shape[0], num), scores.max() + 1)
    return np.concatenate([scores, pad] if where == "end" else [pad, scores], axis=1)


def snapkv(t, window, kernel):
    n, hkv = t["k"].shape[1], t["k"].shape[0]
    a = attention(t["q"], t["k"], window)[:, :, : n - window].mean(axis=1)  # [Hq, n - w]
    padded = np.pad(a, [(0, 0), (kernel // 2, kernel // 2)])
    pooled = np.stack([padded[:, i:i + kernel].sum(axis=1) / kernel for i in range(n - window)], axis=1)
    return with_protected(group_mean(pooled, hkv), window, "end")


def tova(t):
    n, hkv = t["k"].shape[1], t["k"].shape[0]
    a = attention(t["q"], t["k"], 1)[:, 0, : n - 1].mean(axis=0)
    return with_protected(np.repeat(a[None], hkv, axis=0), 1, "end")


def expected(t, rotary_cos_sin, n_future, n_sink, use_cov=True, use_vnorm=True, eps=0.0):
    k, v, q = t["k"][:, n_sink:], t["v"][:, n_sink:], t["q_pre"][n_sink:]
    hkv, _, dim = k.shape
    mean = q.mean(axis=0)  # [Hq, D]
    centered = q - mean
    cov = np.einsum("thi,thj->hij", centered, centered) / q.shape[0]
    cos, sin = rotary_cos_sin  # [F, D] at positions n .. n + F - 1
    half = dim // 2
    p = np.zeros((dim, dim))
    p[half:, :half], p[:half, half:] = np.eye(half), -np.eye(half)
    r = np.mean([np.diag(c) + np.diag(s) @ p for c, s in zip(cos, sin)], axis=0)
    mean, cov = mean @ r.T, r @ cov @ r.T
    group = q.shape[1] // hkv
    z = np.stack([mean[j] @ k[j // group].T / math.sqrt(dim) for j in range(q.shape[1])])
    if use_cov:
        z += np.stack([np.einsum("ti,ij,tj->t", k[j // group], cov[j], k[j // group]) for j in range(q.shape[1])]) / dim / 2
    s = group_mean(softmax(z), hkv)
    if use_vnorm:
        s = (s + eps) * np.linalg.norm(v, axis=-1)
    return with_protected(s, n_sink, "start")


def observed(t):
    n, hkv = t["k"].shape[1], t["k"].shape[0]
    a = attention(t["q"], t["k"], n).sum(axis=1) / np.arange(n, 0, -1)
    return group_mean(a, hkv)


def knorm(t):
    return -np.linalg.norm(t["k"], axis=-1)


def streaming(t, ratio, n_sink):
    n, hkv = t["k"].shape[1], t["k"].shape[0]
    n_pruned = n - int(n * (1 - ratio))
    s = np.ones((hkv, n))
    s[:, n_sink:n_sink + n_pruned] = 0
    return s


def top_sets(scores, n_kept):
    """[Hkv, n] -> list of sorted kept index arrays (stable: ties to the lower index)."""
    return [np.sort(np.argsort(-row, kind="stable")[:n_kept]) for row in scores]
