"""The distillation step: teacher over the full cache, student over the compressed cache, one jit.

For each row the frozen backbone prefills the context (image + first turn) into an empty cache.
The teacher then reads the continuation (the last context token is held back and fed first, as
FastCache does, so the first prediction is the answer's first token) over that full cache; the
student reads the same continuation over the cache compressed by the trainable compressor, with
RoPE positions by the chosen convention. Gradients flow only into the compressor's params.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kvjax.cache import KVCache
from kvjax.compression.ccm import apply_compression
from kvjax.steps import forward_hidden
from training.losses import LossConfig, distillation_loss


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch; rows with context_len == cont_len == 0 are padding and weigh nothing."""

    context: jax.Array  # int32 [B, Tc], right-padded, without its last token
    context_len: jax.Array  # int32 [B]
    image_len: jax.Array  # int32 [B], image prefix of the context (0 = text only)
    cont: jax.Array  # int32 [B, Tn]: last context token, then the answer
    cont_len: jax.Array  # int32 [B]
    context_embeds: jax.Array | None = None  # [B, Tc, H] for VLM contexts (image features merged)


@dataclasses.dataclass(frozen=True, slots=True)
class StepConfig:
    """Static knobs of the step (hashable: a jit static argument)."""

    loss: LossConfig = LossConfig()
    rope_positions: str = "original"


def _teacher_and_prefix(backbone_graphdef, backbone_state, batch: Batch):
    """Prefill the context, continue over the full cache -> (prefix cache, teacher hidden [B, Tn, H])."""
    lm = nnx.merge(backbone_graphdef, backbone_state)
    cache = KVCache.for_model(lm.cfg, batch.context.shape[0], batch.context.shape[1] + batch.cont.shape[1], lm.dtype)
    _, prefix = forward_hidden(backbone_graphdef, backbone_state, cache, batch.context, batch.context_len,
                               batch.context_embeds)
    teacher_hidden, _ = forward_hidden(backbone_graphdef, backbone_state, prefix, batch.cont, batch.cont_len)
    return jax.lax.stop_gradient((prefix, teacher_hidden))


def distill_outputs(backbone_graphdef, backbone_state, compressor, batch: Batch, rope_positions: str):
    """-> teacher_logits, student_logits [B, Tn, V] float32, teacher/student hidden [B, Tn, H], mask [B, Tn]."""
    prefix, teacher_hidden = _teacher_and_prefix(backbone_graphdef, backbone_state, batch)
    compressed = apply_compression(prefix, compressor, batch.image_len, rope_positions=rope_positions)
    student_hidden, _ = forward_hidden(backbone_graphdef, backbone_state, compressed, batch.cont, batch.cont_len)
    lm = nnx.merge(backbone_graphdef, backbone_state)
    mask = jnp.arange(batch.cont.shape[1])[None, :] < batch.cont_len[:, None]
    return lm.logits(teacher_hidden), lm.logits(student_hidden), teacher_hidden, student_hidden, mask


def _loss(params, compressor_graphdef, rest, backbone_graphdef, backbone_state, batch, dropout_key, cfg: StepConfig):
    compressor = nnx.merge(compressor_graphdef, params, rest, copy=True)  # fresh Variables at this trace level
    compressor.train() if dropout_key is not None else compressor.eval()
    outputs = distill_outputs(backbone_graphdef, backbone_state, compressor, batch, cfg.rope_positions)
    return distillation_loss(cfg.loss, *outputs)


def loss_and_grads(params, compressor_graphdef, rest, backbone_graphdef, backbone_state, batch, dropout_key,
                   cfg: StepConfig):
    """-> ((loss, metrics), grads wrt the compressor params only); the backbone is an argument, not a variable."""
    return jax.value_and_grad(_loss, has_aux=True)(params, compressor_graphdef, rest, backbone_graphdef,
                                                   backbone_state, batch, dropout_key, cfg)


def reseeded(compressor_graphdef, params, rest, key):
    """`rest` with every dropout stream set to `key`: a step's masks depend on (seed, step) only,
    which is what makes a resumed run bitwise equal to an uninterrupted one."""
    compressor = nnx.merge(compressor_graphdef, params, rest)
    nnx.reseed(compressor, default=key)
    return nnx.split(compressor, nnx.Param, ...)[2]


@functools.partial(jax.jit, static_argnames=("optimizer", "compressor_graphdef", "backbone_graphdef", "cfg"),
                   donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, lr_scale, step, seed_key, rest, backbone_state, batch, *, optimizer,
               compressor_graphdef, backbone_graphdef, cfg: StepConfig):
    """One optimizer (micro-)step -> (params, opt_state, metrics). lr_scale: lr x the plateau factor
    (the optimizer's Adam has unit lr; see training.trainer._optimizer)."""
    dropout_key = jax.random.fold_in(seed_key, step)
    rest = reseeded(compressor_graphdef, params, rest, dropout_key)
    (_, metrics), grads = loss_and_grads(params, compressor_graphdef, rest, backbone_graphdef, backbone_state,
                                         batch, dropout_key, cfg)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: u * lr_scale.astype(u.dtype), updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return optax.apply_updates(params, updates), opt_state, metrics


@functools.partial(jax.jit, static_argnames=("compressor_graphdef", "backbone_graphdef", "cfg"))
def eval_step(params, rest, backbone_state, batch, *, compressor_graphdef, backbone_graphdef, cfg: StepConfig):
    """Loss and metrics without dropout, plus the number of valid positions (for weighted means)."""
    _, metrics = _loss(params, compressor_graphdef, rest, backbone_graphdef, backbone_state, batch, None, cfg)
    metrics["num_positions"] = jnp.sum(batch.cont_len).astype(jnp.float32)
    return metrics
