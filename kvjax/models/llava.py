"""LLaVA-1.5 (transformers' LlavaForConditionalGeneration): CLIP tower -> projector -> Llama LM.

Features come from the CLIP hidden state(s) named by `vision_feature_layer` (-2 for 1.5), with
CLS dropped under the "default" select strategy; the projector is linear-GELU-linear. The prompt
carries one `<image>` id per image feature (the 5.x expanded form); `embed_multimodal` scatters
the features over those positions in order, as transformers' `masked_scatter` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import KVJaxError
from kvjax.models.clip import CLIPVisionTower
from kvjax.models.llama import CausalLM
from kvjax.models.vit import VisionConfig, activation


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class LlavaConfig:
    text: ModelConfig
    vision: VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)  # indices into the tower's hidden states
    select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.select_strategy not in ("default", "full"):
            raise KVJaxError(f"vision_feature_select_strategy {self.select_strategy!r} is not supported; "
                             "use 'default' or 'full'")
        num_states = self.vision.num_layers + 1
        for layer in self.feature_layers:
            if not -num_states <= layer < num_states:
                raise KVJaxError(f"vision_feature_layer {layer} is out of range for a {self.vision.num_layers}"
                                 f"-layer vision tower")
        activation(self.projector_act, "projector_hidden_act")
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise KVJaxError(f"image_token_index {self.image_token_id} is outside the vocabulary "
                             f"(size {self.text.vocab_size})")

    @property
    def feature_indices(self) -> tuple[int, ...]:
        """feature_layers as non-negative hidden-state indices."""
        return tuple(i % (self.vision.num_layers + 1) for i in self.feature_layers)

    @property
    def num_vision_layers(self) -> int:
        """Encoder layers actually needed (the deepest selected hidden state)."""
        return max(self.feature_indices)

    @property
    def num_image_tokens(self) -> int:
        """LM positions one image fills: patches (+ CLS under "full")."""
        return self.vision.grid_size ** 2 + (self.select_strategy == "full")

    @classmethod
    def from_hf_config(cls, hf: Any, text: ModelConfig) -> LlavaConfig:
        """From a transformers LlavaConfig; `text` is the already-built LM config."""
        layers = hf.vision_feature_layer
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        vision_type = getattr(hf.vision_config, "model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise KVJaxError(f"LLaVA with a {vision_type!r} vision tower is not supported; kvjax's LLaVA "
                             "uses CLIP (clip_vision_model)")
        image_token = getattr(hf, "image_token_id", None)
        image_token = getattr(hf, "image_token_index", None) if image_token is None else image_token
        return cls(text=text, vision=VisionConfig.from_hf_config(hf.vision_config),
                   image_token_id=int(image_token), feature_layers=layers,
                   select_strategy=hf.vision_feature_select_strategy,
                   projector_act=hf.projector_hidden_act,
                   projector_bias=bool(getattr(hf, "multimodal_projector_bias", True)))


class Projector(nnx.Module):
    """HF's `multi_modal_projector`: linear_1 -> act -> linear_2."""

    def __init__(self, cfg: LlavaConfig, *, dtype, rngs: nnx.Rngs):
        n_in = cfg.vision.hidden_size * len(cfg.feature_layers)
        hidden = cfg.text.hidden_size
        self.linear_1 = nnx.Linear(n_in, hidden, use_bias=cfg.projector_bias, dtype=dtype, param_dtype=dtype,
                                   rngs=rngs)
        self.linear_2 = nnx.Linear(hidden, hidden, use_bias=cfg.projector_bias, dtype=dtype,
                                   param_dtype=dtype, rngs=rngs)
        self.act = cfg.projector_act

    def __call__(self, x):
        return self.linear_2(activation(self.act)(self.linear_1(x)))


def scatter_features(text_embeds, features, image_mask):
    """Put features [F, H] (in order) at the True positions of image_mask [B, T], row-major.

    text_embeds [B, T, H]. Callers check that image_mask has exactly F True entries.
    """
    batch, length, hidden = text_embeds.shape
    flat_mask = image_mask.reshape(-1)
    order = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, max(features.shape[0] - 1, 0))
    if features.shape[0] == 0:
        return text_embeds
    gathered = features[order].astype(text_embeds.dtype).reshape(batch, length, hidden)
    return jnp.where(image_mask[..., None], gathered, text_embeds)


class LlavaModel(nnx.Module):
    """Run the LM through `language_model` with the kvjax steps, prompts through `embed_multimodal`."""

    def __init__(self, cfg: LlavaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision_tower = CLIPVisionTower(cfg.vision, num_layers=cfg.num_vision_layers, dtype=dtype, rngs=rngs)
        self.multi_modal_projector = Projector(cfg, dtype=dtype, rngs=rngs)
        self.language_model = CausalLM(cfg.text, dtype=dtype, rngs=rngs)

    @property
    def dtype(self):
        return self.language_model.dtype

    def image_features(self, pixel_values: jax.Array) -> jax.Array:
        """pixel_values [N, 3, S, S] -> LM-space features [N, num_image_tokens, H]."""
        states = self.vision_tower(pixel_values)
        selected = [states[i] for i in self.cfg.feature_indices]
        if self.cfg.select_strategy == "default":
            selected = [s[:, 1:] for s in selected]
        return self.multi_modal_projector(jnp.concatenate(selected, axis=-1))

    def embed_multimodal(self, tokens, image_mask, pixel_values) -> jax.Array:
        """tokens int32 [B, T]; image_mask bool [B, T]; pixel_values [N, 3, S, S] or None -> [B, T, H]."""
        embeds = self.language_model.embed(tokens)
        if pixel_values is None:
            return embeds
        features = self.image_features(pixel_values)
        return scatter_features(embeds, features.reshape(-1, features.shape[-1]), image_mask)
