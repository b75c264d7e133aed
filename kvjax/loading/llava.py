"""LLaVA-1.5 directories -> LlavaModel. Checkpoint names are mapped onto the module's names by
prefix rules, so every known key layout loads:
  hub (older):              language_model.model.* / language_model.lm_head.* /
                            vision_tower[.vision_model].* / multi_modal_projector.*
  transformers-5 in memory: model.language_model.* / lm_head.* / model.vision_tower.* /
                            model.multi_modal_projector.*
"""

from __future__ import annotations

import pathlib
import re

from flax import nnx

from kvjax.loading.hf import fill, hf_config, text_config

# (checkpoint prefix, module prefix), applied in order until none matches.
_LLAVA_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
)
_LAYER = re.compile(r"^(vision_tower|vpm)\.encoder\.layers\.(\d+)\.")


def llava_rename(num_vision_layers: int, tie_word_embeddings: bool):
    """Checkpoint name -> module name (None = not loaded: buffers, unused layers and heads)."""

    def rename(name: str) -> str | None:
        changed = True
        while changed:
            changed = False
            for old, new in _LLAVA_PREFIXES:
                if name.startswith(old):
                    name, changed = new + name[len(old):], True
        if name.endswith("position_ids") or name.startswith("vision_tower.post_layernorm."):
            return None
        layer = _LAYER.match(name)
        if layer and int(layer.group(2)) >= num_vision_layers:
            return None  # layers after the feature layer never run
        if tie_word_embeddings and name == "language_model.lm_head.weight":
            return None
        return name

    return rename


def load_llava(path: pathlib.Path, config: dict, dtype, *, progress: bool = False, mesh=None):
    """-> (LlavaModel, LlavaConfig)."""
    from kvjax.models.llava import LlavaConfig, LlavaModel

    hf = hf_config(path, config)
    cfg = LlavaConfig.from_hf_config(hf, text_config(hf.text_config, path, config))
    abstract = nnx.eval_shape(lambda: LlavaModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    rename = llava_rename(cfg.num_vision_layers, cfg.text.tie_word_embeddings)
    return fill(path, abstract, dtype, rename, progress=progress, mesh=mesh), cfg
