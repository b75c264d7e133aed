"""The Hugging Face directory helpers every loader shares: config.json, transformers' config
classes, safetensors streaming (with a finite-value check per tensor), the name map and fill,
generation EOS ids, tokenizers.

A loader is eval_shape (no memory, no random init) -> map HF names to state paths -> fill tensor
by tensor from the safetensors files (each tensor is read, checked, cast and placed on the device
before the next, so a 7B model never sits twice in host RAM) -> merge.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax.config import ModelConfig
from kvjax.errors import CheckpointError, KVJaxError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Buffers some exporters save that are not parameters.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_dtype(dtype, config: dict | None = None):
    """'auto'/None -> the checkpoint's own dtype (float32 if it names none); else one of DTYPES."""
    if dtype in (None, "auto"):
        dtype = (config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise KVJaxError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)} or auto")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


def read_config_json(model_dir) -> tuple[pathlib.Path, dict]:
    """Check the directory and parse its config.json, with errors that say what to fix."""
    path = pathlib.Path(model_dir).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model directory {str(path)!r} does not exist; pass a Hugging Face model directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {path}; is this a Hugging Face model directory?")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); restore it from the original checkpoint")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, found {type(config).__name__}")
    return path, config


def hf_config(model_dir: pathlib.Path, config: dict):
    """Parse config.json with transformers' own config class (defaults and rope standardisation)."""
    import transformers

    try:
        return transformers.AutoConfig.for_model(**config)
    except Exception as e:  # transformers 5 validators raise huggingface_hub's own error types too
        raise CheckpointError(f"{model_dir / 'config.json'} is not a valid {config.get('model_type')} config: {e}")


def safetensors_files(model_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files: from the index json when sharded, else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({e})")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index.name} lists missing shard(s) {', '.join(missing)} in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (.bin/.pth pickles are not read: convert them to safetensors)" if any(
            model_dir.glob("*.bin")) else ""
        raise CheckpointError(f"no *.safetensors weights in {model_dir}{hint}")
    return files


def weights_fingerprint(model_dir) -> str:
    """A short id of the directory's weights: sha256 over each safetensors file's name, size and
    first and last MiB (the header and tensor bytes; O(1) even for a 7B model). Compressors record
    the id of the model they were distilled against, so one paired with other weights is caught."""
    import hashlib

    digest = hashlib.sha256()
    for path in safetensors_files(pathlib.Path(model_dir)):
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(1 << 20)
            f.seek(max(size - (1 << 20), 0))
            digest.update(f"{path.name}:{size}:".encode() + head + f.read())
    return digest.hexdigest()[:16]


def iter_tensors(files: Iterable[pathlib.Path]) -> Iterator[tuple[str, np.ndarray]]:
    """(name, host array) one tensor at a time, memory-mapped from safetensors."""
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    array = f.get_tensor(name)
                    check_finite(name, array, file)
                    yield name, array
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"cannot read weights file {file}: {e}; the file is corrupt or truncated")


def check_finite(name: str, array: np.ndarray, file) -> None:
    """A tensor with NaN or inf loads fine and answers nothing: refuse it, naming it (host side,
    one pass over memory the fill reads anyway)."""
    if array.dtype.kind == "f" or array.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        finite = np.isfinite(array.astype(np.float32) if array.dtype.kind != "f" else array)
        if not finite.all():
            raise CheckpointError(f"tensor {name} in {file} holds {int((~finite).sum())} NaN/inf value(s); the "
                                  "checkpoint is corrupt: re-download or re-export it")


def hf_name_to_path(name: str, leaves: dict) -> tuple[tuple, bool] | None:
    """'model.layers.0.mlp.up_proj.weight' -> (state path, needs transpose) or None if unknown.

    HF Linear weights are [out, in]; NNX Linear kernels are [in, out].
    """
    parts = tuple(int(p) if p.isdigit() else p for p in name.split("."))
    head, last = parts[:-1], parts[-1]
    if last == "weight":
        if head + ("kernel",) in leaves:
            return head + ("kernel",), True
        if head + ("embedding",) in leaves:
            return head + ("embedding",), False
    return (parts, False) if parts in leaves else None


def fill_module(abstract: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]], *, dtype,
                rename: Callable[[str], str | None] = lambda n: n, source: str = "checkpoint",
                mesh=None) -> nnx.Module:
    """Fill an eval_shape'd module from (HF name, array) pairs; every parameter must be found.

    `rename` maps a checkpoint name to the module's HF-style name (None = not ours, skipped).
    `mesh`: each tensor goes from the host straight to its shards (`kvjax.parallel.placement`), so
    a model too big for one device loads tensor-parallel.
    """
    from kvjax import parallel

    where = parallel.placement(abstract, mesh) if mesh is not None else lambda path: None
    graphdef, state = nnx.split(abstract)
    leaves = dict(nnx.to_flat_state(state))
    values: dict[tuple, jax.Array] = {}
    unexpected = []
    for raw_name, array in tensors:
        name = rename(raw_name)
        if name is None or name.endswith(_IGNORED_SUFFIXES):
            continue
        found = hf_name_to_path(name, leaves)
        if found is None:
            unexpected.append(raw_name)
            continue
        path, transpose = found
        expected = leaves[path].get_value().shape
        shape = array.shape[::-1] if transpose else array.shape
        if tuple(shape) != tuple(expected):
            want = expected[::-1] if transpose else expected
            raise CheckpointError(f"tensor {raw_name} in {source} has shape {tuple(array.shape)}, "
                                  f"expected {tuple(want)}; the checkpoint does not match its config.json")
        # Cast and transpose on the host (numpy + ml_dtypes): no per-shape compiles on the device.
        host = np.ascontiguousarray((array.T if transpose else array).astype(jnp.dtype(dtype)))
        values[path] = jax.device_put(host, where(path))
    missing = [p for p in leaves if p not in values]
    if missing:
        names = [".".join(map(str, p)).replace(".kernel", ".weight").replace(".embedding", ".weight")
                 for p in missing]
        raise CheckpointError(f"{source} is missing {len(missing)} tensor(s), e.g. {', '.join(names[:3])} "
                              f"(shape {tuple(leaves[missing[0]].get_value().shape)}); "
                              "the checkpoint is incomplete or of another architecture")
    if unexpected:
        warnings.warn(f"ignored {len(unexpected)} unexpected tensor(s) in {source}, e.g. {unexpected[:3]}")
    for path, var in leaves.items():
        var.set_value(values[path])
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def with_generation_eos(cfg: ModelConfig, model_dir: pathlib.Path) -> ModelConfig:
    """Add generation_config.json's EOS ids: chat models end turns with tokens config.json may
    not list (Llama-3-Instruct's <|eot_id|>, Qwen's <|im_end|>)."""
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return cfg
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it")
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    merged = tuple(dict.fromkeys([*cfg.eos_token_ids, *map(int, extra)]))
    return dataclasses.replace(cfg, eos_token_ids=merged)


def fill(path: pathlib.Path, abstract: nnx.Module, dtype, rename=lambda n: n, *, progress: bool = False,
         mesh=None):
    """fill_module from the directory's safetensors files (placed on `mesh` if given), with a tqdm
    bar if progress."""
    from tqdm import tqdm

    tensors = tqdm(iter_tensors(safetensors_files(path)), desc="loading weights", unit=" tensors",
                   disable=None if progress else True, leave=False)  # None: only on a terminal
    return fill_module(abstract, tensors, dtype=dtype, rename=rename, source=str(path), mesh=mesh)


def text_config(hf, path: pathlib.Path, top: dict | None = None) -> ModelConfig:
    """transformers config of an LM -> ModelConfig with generation_config's EOS ids; `top` (a VLM's
    config.json) supplies pad/eos ids its text config lacks."""
    cfg = with_generation_eos(ModelConfig.from_hf_config(hf), path)
    top = top or {}
    if cfg.pad_token_id is None and top.get("pad_token_id") is not None:
        cfg = dataclasses.replace(cfg, pad_token_id=int(top["pad_token_id"]))
    if not cfg.eos_token_ids and top.get("eos_token_id") is not None:
        eos = top["eos_token_id"]
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (int(eos),))
    return cfg


def load_tokenizer(model_dir: pathlib.Path):
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"cannot load the tokenizer from {model_dir}: {e}; "
                              "the directory needs tokenizer.json or the model's tokenizer files")
