"""Text LMs (Llama, Qwen2, Qwen3, GPT-NeoX): config.json -> ModelConfig -> the family's module filled
from safetensors."""

from __future__ import annotations

import pathlib

from flax import nnx

from kvjax.config import SUPPORTED_ARCHITECTURES
from kvjax.errors import KVJaxError
from kvjax.loading.hf import fill, hf_config, text_config


def load_causal_lm(model_class, rename_for=None):
    """A loader for a decoder-only LM module class with HF parameter names (a LOADERS row);
    rename_for(cfg) -> rename maps a family's checkpoint names (buffers to skip, old head names)."""

    def load(path: pathlib.Path, config: dict, dtype, *, progress: bool = False, mesh=None):
        archs = config.get("architectures") or []
        if archs and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise KVJaxError(f"unsupported architecture {', '.join(archs)} in {path}; kvjax's text models support "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        cfg = text_config(hf_config(path, config), path)
        abstract = nnx.eval_shape(lambda: model_class(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
        # Tied checkpoints sometimes still carry the head's weight: the embedding is the head.
        head = getattr(model_class, "HEAD_NAME", "lm_head.weight")
        rename = (lambda n: None if n == head else n) if cfg.tie_word_embeddings else (lambda n: n)
        rename = rename_for(cfg) if rename_for is not None else rename
        return fill(path, abstract, dtype, rename, progress=progress, mesh=mesh), cfg

    return load
