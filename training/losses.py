"""Distillation losses between the teacher (full cache) and the student (compressed cache).

Every term is a per-position value [B, T] reduced by `masked_mean` over the valid continuation
positions, so right padding never counts. The default objective is KL(teacher || student)
(DESIGN.md "Training objective"); FastCache's composite (reference notes section 4.1) is
available through the weights: total = 0.5*(0.5*CE + 0.3*JS + 0.2*L1) + 0.5*hidden, where
`hidden` = (MSE + cosine term) / 2 on the final hidden state (FastCache sums that over every
layer's output; kvjax's models return only the last one, so the per-layer sum is not reproduced).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kvjax.errors import KVJaxError

EPS = 1e-8  # FastCache's epsilon inside its logs and normalisations


@dataclasses.dataclass(frozen=True, slots=True)
class LossConfig:
    """Weights of the loss terms; frozen, so it is a static jit argument."""

    kl_weight: float = 1.0
    temperature: float = 1.0
    ce_weight: float = 0.0  # CE against the top-p-truncated teacher
    js_weight: float = 0.0
    l1_weight: float = 0.0
    hidden_weight: float = 0.0  # (MSE + cosine) / 2 on the final hidden state
    top_p: float = 0.9

    def __post_init__(self):
        for name in ("kl_weight", "ce_weight", "js_weight", "l1_weight", "hidden_weight"):
            if not getattr(self, name) >= 0:
                raise KVJaxError(f"loss {name} must be >= 0, got {getattr(self, name)!r}")
        if not self.temperature > 0:
            raise KVJaxError(f"loss temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise KVJaxError(f"loss top_p must be in (0, 1], got {self.top_p!r}")
        if not any(getattr(self, n) > 0 for n in ("kl_weight", "ce_weight", "js_weight", "l1_weight", "hidden_weight")):
            raise KVJaxError("every loss weight is 0; set --kl-weight (or another weight) above 0")

    @classmethod
    def preset(cls, name: str, **overrides) -> LossConfig:
        """'kl' (the default) or 'fastcache' (FastCache's training composite, no KL term)."""
        presets = {"kl": {}, "fastcache": dict(kl_weight=0.0, ce_weight=0.25, js_weight=0.15, l1_weight=0.1,
                                               hidden_weight=0.5)}
        if name not in presets:
            raise KVJaxError(f"unknown loss {name!r}; choose one of: {', '.join(presets)}")
        return cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})


def masked_mean(values, mask):
    """values [B, T], mask bool [B, T] -> mean over the True positions (0 when there are none)."""
    weights = mask.astype(jnp.float32)
    return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0):
    """[B, T, V] logits -> [B, T] KL(p || q) at `temperature`, times temperature**2 (Hinton's
    scaling, so gradients keep their size as the temperature changes)."""
    log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1) * temperature**2


def top_p_target(p, top_p: float = 0.9):
    """p [..., V] probabilities -> the smallest top prefix holding more than top_p mass, renormalised."""
    order = jnp.argsort(-p, axis=-1)
    sorted_p = jnp.take_along_axis(p, order, axis=-1)
    cumulative = jnp.cumsum(sorted_p, axis=-1)
    # keep every token with cumulative <= top_p plus the next one (FastCache's rule)
    num_keep = jnp.minimum(jnp.sum(cumulative <= top_p, axis=-1, keepdims=True) + 1, p.shape[-1])
    keep_sorted = jnp.arange(p.shape[-1]) < num_keep
    keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1, inplace=False)
    kept = p * keep
    return kept / (jnp.sum(kept, axis=-1, keepdims=True) + EPS)


def top_p_cross_entropy(p, q, top_p: float = 0.9):
    """[B, T, V] probabilities -> [B, T] CE of q against the top-p-truncated p."""
    return -jnp.sum(top_p_target(p, top_p) * jnp.log(q + EPS), axis=-1)


def js_divergence(p, q):
    """[B, T, V] probabilities -> [B, T] Jensen-Shannon divergence (FastCache's eps placement)."""
    m = (p + q) / 2
    return 0.5 * (jnp.sum(p * jnp.log(p / (m + EPS) + EPS), axis=-1) + jnp.sum(q * jnp.log(q / (m + EPS) + EPS), axis=-1))


def l1_distance(p, q):
    """[B, T, V] probabilities -> [B, T] sum of |p - q|."""
    return jnp.sum(jnp.abs(p - q), axis=-1)


def hidden_mse(teacher_hidden, student_hidden):
    """[B, T, H] -> [B, T] mean squared difference over the hidden dimension."""
    return jnp.mean(jnp.square(student_hidden - teacher_hidden), axis=-1)


def hidden_cosine(teacher_hidden, student_hidden):
    """[B, T, H] -> [B, T] 1 - cos(softmax(h_s), softmax(h_t)) over the hidden dimension."""
    a, b = jax.nn.softmax(student_hidden, axis=-1), jax.nn.softmax(teacher_hidden, axis=-1)
    cos = jnp.sum(a * b, axis=-1) / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), EPS)
    return 1.0 - cos


def agreement(teacher_logits, student_logits):
    """[B, T, V] -> float [B, T]: 1 where the top-1 tokens agree."""
    return (jnp.argmax(teacher_logits, -1) == jnp.argmax(student_logits, -1)).astype(jnp.float32)


def distillation_loss(cfg: LossConfig, teacher_logits, student_logits, teacher_hidden, student_hidden, mask):
    """-> (total loss, metrics dict of scalars). Logits [B, T, V] float32, hidden [B, T, H], mask bool [B, T].
    The teacher's outputs are constants here: gradients reach only the student's."""
    teacher_logits, teacher_hidden = jax.lax.stop_gradient((teacher_logits, teacher_hidden))
    teacher_hidden, student_hidden = teacher_hidden.astype(jnp.float32), student_hidden.astype(jnp.float32)
    metrics = {"kl": masked_mean(kl_divergence(teacher_logits, student_logits), mask),
               "agreement": masked_mean(agreement(teacher_logits, student_logits), mask)}
    total = cfg.kl_weight * (metrics["kl"] if cfg.temperature == 1.0 else
                             masked_mean(kl_divergence(teacher_logits, student_logits, cfg.temperature), mask))
    if cfg.ce_weight or cfg.js_weight or cfg.l1_weight:
        p, q = jax.nn.softmax(teacher_logits, -1), jax.nn.softmax(student_logits, -1)
        for name, weight, fn in (("ce", cfg.ce_weight, lambda: top_p_cross_entropy(p, q, cfg.top_p)),
                                 ("js", cfg.js_weight, lambda: js_divergence(p, q)),
                                 ("l1", cfg.l1_weight, lambda: l1_distance(p, q))):
            if weight:
                metrics[name] = masked_mean(fn(), mask)
                total = total + weight * metrics[name]
    if cfg.hidden_weight:
        metrics["hidden"] = (masked_mean(hidden_mse(teacher_hidden, student_hidden), mask)
                             + masked_mean(hidden_cosine(teacher_hidden, student_hidden), mask)) / 2
        total = total + cfg.hidden_weight * metrics["hidden"]
    metrics["loss"] = total
    return total, metrics
