"""Gradients reach every compressor layer (image and text MLPs), through the jitted loss."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tests.training.conftest import tiny_config


def test_gradients_reach_every_layer(tiny_train_setup, tmp_path):
    from training import data
    from training.objective import loss_and_grads
    from training.trainer import Trainer

    model_dir, data_path, _ = tiny_train_setup
    trainer = Trainer(tiny_config(model_dir, data_path, tmp_path / "run", compressor="decouple"))
    batch = data.collate(trainer.train_set[:4], 4, trainer.pad_id, min_bucket=128)
    batch = dataclasses.replace(batch, image_len=np.full(4, 40, np.int32))  # exercise the image MLPs too
    params = trainer.state["params"]
    (_, metrics), grads = jax.jit(loss_and_grads, static_argnums=(1, 3, 7))(
        params, trainer.compressor_graphdef, trainer.rest, trainer.backbone_graphdef, trainer.backbone_state, batch,
        jax.random.PRNGKey(0), trainer.step_cfg)
    flat = nnx.to_flat_state(grads)
    names = {path[0] for path, _ in flat}
    assert names == {"text_k", "text_v", "image_k", "image_v"}
    for path, grad in flat:  # [layers, ...]: every layer of every weight gets a gradient
        per_layer = jnp.abs(grad[...]).reshape(grad[...].shape[0], -1).sum(axis=1)
        assert (per_layer > 0).all(), (path, per_layer)

