"""Hugging Face directory -> VLM modules (LLaVA-1.5, MiniCPM-V-2.6); `kvjax.load` dispatches here.

Same path as the text loader (eval_shape -> name map -> fill -> merge). Checkpoint names are
mapped onto the module's names by prefix rules, so every known key layout loads:
  LLaVA   hub (older): language_model.model.* / language_model.lm_head.* /
                       vision_tower[.vision_model].* / multi_modal_projector.*
          transformers-5 in memory: model.language_model.* / lm_head.* / model.vision_tower.* /
                       model.multi_modal_projector.*
  MiniCPM-V (remote code, never executed): llm.* / vpm.* / resampler.*
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError, KVJaxError
from kvjax.loading import (fill_module, iter_tensors, load_tokenizer, resolve_dtype, safetensors_files,
                           with_generation_eos)

VLM_MODEL_TYPES = ("llava", "minicpmv")

# (checkpoint prefix, module prefix), applied in order until none matches.
_LLAVA_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.vision_model.", "vision_tower."),
)
_LAYER = re.compile(r"^(vision_tower|vpm)\.encoder\.layers\.(\d+)\.")


def is_vlm(config: dict) -> bool:
    return config.get("model_type") in VLM_MODEL_TYPES


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


def _hf_config(path: pathlib.Path, config: dict):
    import transformers

    try:
        return transformers.AutoConfig.for_model(**config)
    except Exception as e:  # transformers 5 validators raise huggingface_hub's own error types too
        raise CheckpointError(f"{path / 'config.json'} is not a valid {config.get('model_type')} config: {e}")


def _text_config(hf_text, path: pathlib.Path, top: dict) -> ModelConfig:
    cfg = with_generation_eos(ModelConfig.from_hf_config(hf_text), path)
    if cfg.pad_token_id is None and top.get("pad_token_id") is not None:
        cfg = dataclasses.replace(cfg, pad_token_id=int(top["pad_token_id"]))
    if not cfg.eos_token_ids and top.get("eos_token_id") is not None:
        eos = top["eos_token_id"]
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),))
    return cfg


def _fill(path, abstract, dtype, rename, progress):
    from tqdm import tqdm

    tensors = tqdm(iter_tensors(safetensors_files(path)), desc="loading weights", unit=" tensors",
                   disable=None if progress else True, leave=False)
    return fill_module(abstract, tensors, dtype=dtype, rename=rename, source=str(path))


def load_llava(path: pathlib.Path, config: dict, dtype, *, progress: bool = False):
    """-> (LlavaModel, LlavaConfig)."""
    from kvjax.models.llava import LlavaConfig, LlavaModel

    hf = _hf_config(path, config)
    cfg = LlavaConfig.from_hf_config(hf, _text_config(hf.text_config, path, config))
    abstract = nnx.eval_shape(lambda: LlavaModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    rename = llava_rename(cfg.num_vision_layers, cfg.text.tie_word_embeddings)
    return _fill(path, abstract, dtype, rename, progress), cfg


def _qwen2_text_config(path: pathlib.Path, config: dict) -> ModelConfig:
    """MiniCPM-V's LM fields sit at the top of config.json (MiniCPMVConfig subclasses Qwen2Config):
    read them through transformers' Qwen2Config, so its defaults apply and no remote code runs."""
    import transformers

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "auto_map")}
    try:
        hf = transformers.Qwen2Config(**fields)
    except Exception as e:  # transformers 5 validators raise huggingface_hub's own error types too
        raise CheckpointError(f"{path / 'config.json'} does not hold a valid Qwen2 LM config: {e}")
    hf.architectures = ["Qwen2ForCausalLM"]
    return _text_config(hf, path, config)


def load_minicpmv(path: pathlib.Path, config: dict, dtype, *, progress: bool = False):
    """-> (MiniCPMV, MiniCPMVConfig). config.json is read as data; no remote code runs."""
    from kvjax.models.minicpmv import MiniCPMV, MiniCPMVConfig, minicpmv_rename

    cfg = MiniCPMVConfig.from_config_json(config, _qwen2_text_config(path, config))
    abstract = nnx.eval_shape(lambda: MiniCPMV(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return _fill(path, abstract, dtype, minicpmv_rename(cfg), progress), cfg


def _minicpmv_tokenizer(path: pathlib.Path):
    """The hub's tokenizer_config names a remote-code class (MiniCPMVTokenizerFast: Qwen2's BPE plus
    id attributes) and AutoTokenizer would offer to run it; read tokenizer.json as a plain fast
    tokenizer instead (kvjax.minicpmv_prompt looks the marker ids up by their tokens)."""
    import transformers

    if not (path / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in {path}; kvjax reads MiniCPM-V's tokenizer from it")
    try:
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {e}")


def load_vlm(path: pathlib.Path, config: dict, dtype="auto", *, tokenizer: bool = True,
             progress: bool = False):
    """-> (model, tokenizer or None, VLM config); the config's `.text` is the LM's ModelConfig."""
    kind = config.get("model_type")
    dtype = resolve_dtype(dtype, config)
    if kind == "llava":
        model, cfg = load_llava(path, config, dtype, progress=progress)
    elif kind == "minicpmv":
        model, cfg = load_minicpmv(path, config, dtype, progress=progress)
    else:
        raise KVJaxError(f"unknown VLM model_type {kind!r}; kvjax supports {', '.join(VLM_MODEL_TYPES)}")
    if not tokenizer:
        return model, None, cfg
    return model, (_minicpmv_tokenizer(path) if kind == "minicpmv" else load_tokenizer(path)), cfg
