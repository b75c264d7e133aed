"""Compressor checkpoints: a directory with `compressor.json` (format, config) and `params/` (orbax).

Saving writes into a temporary sibling directory and renames it into place, so an interrupted
save never leaves a half-written checkpoint and never destroys the previous one.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from kvjax.compression.ccm import CCMCompressor, CompressorConfig, build_compressor
from kvjax.errors import CheckpointError, KVJaxError

FORMAT = "kvjax-ccm-compressor"
VERSION = 1
META_FILE = "compressor.json"


def _checkpointer():
    import orbax.checkpoint as ocp  # noqa: PLC0415 (slow import; only checkpoint I/O needs it)

    return ocp.StandardCheckpointer()


def save_compressor(path, compressor: CCMCompressor, *, overwrite: bool = False, extra: dict | None = None) -> pathlib.Path:
    """Write `compressor` to directory `path`; `extra` (JSON-able) is stored in compressor.json."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not overwrite:
        raise KVJaxError(f"{path} already exists; choose another output path or pass overwrite=True (--overwrite)")
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = nnx.to_pure_dict(nnx.state(compressor, nnx.Param))
    with _checkpointer() as checkpointer:
        checkpointer.save(tmp / "params", params)
    meta = {"format": FORMAT, "version": VERSION, "config": compressor.cfg.to_dict(), **({"extra": extra} if extra else {})}
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if path.exists():
        old = path.with_name(path.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def read_compressor_config(path) -> tuple[pathlib.Path, dict]:
    """Check `path` is a kvjax compressor checkpoint; returns (dir, parsed compressor.json)."""
    path = pathlib.Path(path).expanduser().absolute()
    if path.is_file() and path.suffix in (".pth", ".pt", ".bin"):
        raise CheckpointError(f"{path} is a PyTorch file, not a kvjax compressor checkpoint; convert it first: "
                              f"python -m kvjax.convert_fastcache --input {path} --model-dir MODEL --output OUT")
    if not path.is_dir():
        raise CheckpointError(f"compressor checkpoint {str(path)!r} does not exist; pass a directory written by "
                              "kvjax (training or python -m kvjax.convert_fastcache)")
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {META_FILE}, so it is not a kvjax compressor checkpoint; "
                              "convert FastCache .pth files with python -m kvjax.convert_fastcache")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_path} is corrupt ({e}); re-create the checkpoint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{meta_path} is not a {FORMAT} description; re-create the checkpoint")
    if meta.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer kvjax (format version {meta['version']} > {VERSION}); "
                              "upgrade kvjax")
    return path, meta


def distilled_for(model_dir) -> dict:
    """The `extra` entry a trained compressor records: the fingerprint of its teacher's weights."""
    from kvjax.loading.hf import weights_fingerprint  # noqa: PLC0415

    return {"model_fingerprint": weights_fingerprint(model_dir)}


def warn_if_other_weights(path: pathlib.Path, meta: dict, model_dir) -> None:
    """Same shapes but other weights (e.g. an old compressor beside a retrained model) loads and
    runs, yet compresses like an untrained one: say so. Silent for checkpoints without a record."""
    from kvjax.loading.hf import weights_fingerprint  # noqa: PLC0415

    saved = (meta.get("extra") or {}).get("model_fingerprint")
    if saved is not None and saved != (found := weights_fingerprint(model_dir)):
        warnings.warn(f"compressor {path} was distilled against other weights than {model_dir} (fingerprint {saved}, "
                      f"this model {found}): it will compress poorly; distil one for this model with "
                      f"python -m kvjax.train --model-dir {model_dir}", stacklevel=3)


RUNTIME_FIELDS = ("min_seq_len", "keep_last", "rope_positions", "dropout")  # safe to change without retraining shapes


def load_compressor(path, model_cfg=None, *, dtype: str | None = None, compression_factor: int | None = None,
                    model_dir=None, **overrides) -> CCMCompressor:
    """Read a compressor checkpoint; with `model_cfg`, refuse one made for another model's shape,
    with `model_dir`, warn when it was distilled against other weights of that shape, and with
    `compression_factor`, refuse one that merges another number of tokens. `dtype` ('float32',
    'bfloat16', 'float16') casts the weights, e.g. to the model's dtype; `overrides` may set
    RUNTIME_FIELDS (None = keep the checkpoint's)."""
    path, meta = read_compressor_config(path)
    if model_dir is not None:
        warn_if_other_weights(path, meta, model_dir)
    saved_factor = meta["config"].get("compression_factor")
    if compression_factor is not None and compression_factor != saved_factor:
        raise KVJaxError(f"compression factor {compression_factor} does not match the checkpoint {path}, whose MLPs "
                         f"merge {saved_factor} tokens; use the checkpoint's factor or another checkpoint")
    if bad := sorted(set(overrides) - set(RUNTIME_FIELDS)):
        raise KVJaxError(f"load_compressor cannot override {bad}; only {', '.join(RUNTIME_FIELDS)}")
    changes = {k: v for k, v in dict(overrides, dtype=dtype).items() if v is not None}
    cfg = CompressorConfig.from_dict({**meta["config"], **changes})
    if model_cfg is not None:
        cfg.check_against(model_cfg)
    compressor = build_compressor(cfg)
    state = nnx.state(compressor, nnx.Param)
    target = nnx.to_pure_dict(state)
    try:
        with _checkpointer() as checkpointer:
            restored = checkpointer.restore(path / "params", target)
    except Exception as e:  # orbax raises many types (missing files, shape mismatch, bad msgpack)
        first_line = (str(e).splitlines() or [""])[0]
        raise CheckpointError(f"cannot read the compressor weights in {path / 'params'} "
                              f"({type(e).__name__}: {first_line}); re-create the checkpoint")
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda a, t: jnp.asarray(a, t.dtype), restored, target))
    nnx.update(compressor, state)
    return compressor
