"""MiniCPM-V-2.6 directories (remote-code layout llm.* / vpm.* / resampler.*) -> MiniCPMV.
config.json is read as data and the tokenizer as a plain fast tokenizer: no remote code runs."""

from __future__ import annotations

import json
import pathlib

from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError
from kvjax.loading.hf import fill, text_config


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
    return text_config(hf, path, config)


def _preprocessor(path: pathlib.Path) -> dict | None:
    """preprocessor_config.json, whose slicing settings the original processor reads (they win)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); restore it from the original checkpoint") from None


def load_minicpmv(path: pathlib.Path, config: dict, dtype, *, progress: bool = False, mesh=None):
    """-> (MiniCPMV, MiniCPMVConfig). config.json is read as data; no remote code runs."""
    from kvjax.models.minicpmv import MiniCPMV, MiniCPMVConfig, minicpmv_rename

    cfg = MiniCPMVConfig.from_config_json(config, _qwen2_text_config(path, config), _preprocessor(path))
    abstract = nnx.eval_shape(lambda: MiniCPMV(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return fill(path, abstract, dtype, minicpmv_rename(cfg), progress=progress, mesh=mesh), cfg


def load_minicpmv_tokenizer(path: pathlib.Path):
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
