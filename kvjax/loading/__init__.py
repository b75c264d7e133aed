"""Hugging Face directory -> (model, tokenizer, config): ONE table from config.json's model_type to
the loader of that family. A new family is one model file plus one row here.

    model, tokenizer, cfg = kvjax.load("path/to/hf_model", dtype="bfloat16")
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from kvjax import parallel
from kvjax.errors import KVJaxError
from kvjax.loading.hf import (fill_module, iter_tensors, load_tokenizer, read_config_json, resolve_dtype,
                              safetensors_files, weights_fingerprint)
from kvjax.loading.llava import load_llava
from kvjax.loading.minicpmv import load_minicpmv, load_minicpmv_tokenizer
from kvjax.loading.text import load_causal_lm
from kvjax.models.gpt_neox import GPTNeoXForCausalLM, gpt_neox_rename
from kvjax.models.llama import CausalLM


@dataclasses.dataclass(frozen=True)
class Loader:
    """load(path, config, dtype, progress=, mesh=) -> (module, config: its weights on `mesh`, if
    given, as they are read); tokenizer(path) -> tokenizer."""

    load: Callable[..., tuple[Any, Any]]
    tokenizer: Callable = load_tokenizer


LOADERS: dict[str, Loader] = {
    "llama": Loader(load_causal_lm(CausalLM)),
    "qwen2": Loader(load_causal_lm(CausalLM)),
    "qwen3": Loader(load_causal_lm(CausalLM)),
    "gpt_neox": Loader(load_causal_lm(GPTNeoXForCausalLM, gpt_neox_rename)),
    "llava": Loader(load_llava),
    "minicpmv": Loader(load_minicpmv, load_minicpmv_tokenizer),
}


def load(model_dir, dtype: Any = "auto", *, tokenizer: bool = True, progress: bool = False,
         tensor_parallel: int | None = None, mesh=None):
    """Load a HF directory of any family in LOADERS -> (model, tokenizer or None, config).

    VLMs (LLaVA-1.5, MiniCPM-V-2.6) return their module and a config whose `.text` is the LM's.
    dtype: "auto" (the checkpoint's own), "float32", "bfloat16" or "float16".
    progress: show a tqdm bar over the tensors (worth it for multi-GB checkpoints).
    tensor_parallel=N (or a `kvjax.parallel.make_mesh` mesh): the LM's layers split over N devices
    (`kvjax.parallel`); the steps then run tensor-parallel with the same calls.
    """
    path, config = read_config_json(model_dir)
    kind = config.get("model_type")
    if kind not in LOADERS:
        raise KVJaxError(f"unsupported model_type {kind!r} in {path / 'config.json'}; kvjax loads "
                         f"{', '.join(sorted(LOADERS))}")
    loader = LOADERS[kind]
    if tensor_parallel is not None and mesh is None:
        mesh = parallel.make_mesh(tensor_parallel)
    model, cfg = loader.load(path, config, resolve_dtype(dtype, config), progress=progress, mesh=mesh)
    return model, (loader.tokenizer(path) if tokenizer else None), cfg


__all__ = ["load", "LOADERS", "Loader", "fill_module", "iter_tensors", "safetensors_files", "read_config_json",
           "weights_fingerprint"]
