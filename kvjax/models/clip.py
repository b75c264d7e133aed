"""CLIP ViT vision tower (transformers' CLIPVisionModel), as LLaVA-1.5 uses it.

tokens = [CLS, patches row-major] + position embedding -> pre_layrnorm -> pre-LN encoder.
`post_layernorm` only touches the pooled CLS output, which LLaVA never reads, so it is not built.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.errors import KVJaxError
from kvjax.models.vit import Encoder, LayerNorm, PatchEmbedding, VisionConfig


class CLIPEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.hidden_size,), dtype))
        self.patch_embedding = PatchEmbedding(cfg, bias=False, dtype=dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.grid_size ** 2 + 1, cfg.hidden_size, dtype=dtype,
                                            param_dtype=dtype, rngs=rngs)

    def __call__(self, pixels):
        """pixels [N, C, S, S] at the native image size S -> [N, 1 + P, D]."""
        size = self.cfg.image_size
        if pixels.shape[-2:] != (size, size):
            # transformers interpolates positions only on request; LLaVA never asks.
            raise KVJaxError(f"CLIP expects {size}x{size} pixels, got {pixels.shape[-2]}x{pixels.shape[-1]}; "
                             "preprocess with the model's CLIPImageProcessor")
        patches = self.patch_embedding(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...], (patches.shape[0], 1, patches.shape[-1]))
        return jnp.concatenate([cls.astype(patches.dtype), patches], axis=1) + self.position_embedding.embedding[...]


class CLIPVisionTower(nnx.Module):
    """HF's CLIPVisionModel minus post_layernorm; builds only the first `num_layers` layers."""

    def __init__(self, cfg: VisionConfig, *, num_layers: int | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        num_layers = cfg.num_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= cfg.num_layers:
            raise KVJaxError(f"CLIP tower: num_layers must be in [0, {cfg.num_layers}], got {num_layers}")
        self.cfg = cfg
        self.embeddings = CLIPEmbeddings(cfg, dtype=dtype, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.encoder = Encoder(cfg, num_layers, dtype=dtype, rngs=rngs)

    def __call__(self, pixels) -> list[jax.Array]:
        """pixels [N, C, S, S] -> hidden states, each [N, 1 + P, D]: index 0 = pre_layrnorm(embeddings),
        index i = output of encoder layer i - 1 (transformers' `hidden_states` indexing)."""
        return self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
