"""FastCache compressor .pth -> kvjax compressor checkpoint (orbax); `python -m kvjax.convert_fastcache`.

Reads bare state dicts, the FastCache training scripts' wrapper dict
({'model_state_dict': {'compressor': ...}, 'optimizer_state_dict': ..., ...}) and its older
wrapper ({'compressor': ...}) with
torch.load(weights_only=True): nothing in the file can run code. Keys
`compress_{tk,tv,ik,iv}.<layer>.{0,3,6}.{weight,bias}` map onto the kvjax MLPs (Linear weights
are transposed to [in, out]); `attention.*` (unused by FastCache's forward) and optimizer state
are ignored; the compression factor is read from the first Linear's shape.
"""

from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np

from kvjax.compression.checkpoint import save_compressor
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.errors import CheckpointError, KVJaxError
from kvjax.loading import read_config_json

# torch names the global a weights-only load refused: "unsupported GLOBAL posix.system whose module ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_KEY = re.compile(r"^compress_(tk|tv|ik|iv)\.(\d+)\.([036])\.(weight|bias)$")
_IGNORED = re.compile(r"^attention\.\d+\.(weight|bias)$")
_SETS = {"tk": "text_k", "tv": "text_v", "ik": "image_k", "iv": "image_v"}
_PARAMS = {("0", "weight"): "w1", ("0", "bias"): "b1", ("3", "weight"): "w2", ("3", "bias"): "b2",
           ("6", "weight"): "w3", ("6", "bias"): "b3"}


def lm_shape(model_dir) -> tuple[int, int, int, str]:
    """(num_layers, num_kv_heads, head_dim, model_type) of the language model in an HF directory."""
    path, config = read_config_json(model_dir)
    text = config.get("text_config")
    if isinstance(text, dict):  # LLaVA-style: fields the hub file omits take transformers' defaults
        import transformers  # noqa: PLC0415

        fields = {k: v for k, v in text.items() if k != "model_type"}
        text = transformers.AutoConfig.for_model(text.get("model_type", "llama"), **fields).to_dict()
    else:
        text = config
    try:
        heads = int(text["num_attention_heads"])
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        return int(text["num_hidden_layers"]), int(text.get("num_key_value_heads") or heads), head_dim, \
            str(config.get("model_type", ""))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'} lacks a usable language-model field ({e}); "
                              "pass the model directory the compressor was trained for")


def read_state_dict(path) -> tuple[dict[str, np.ndarray], str]:
    """The tensors of a FastCache .pth as float32 numpy arrays, and the MLP weights' torch dtype."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        raise KVJaxError("converting a .pth needs PyTorch: pip install 'kvjax[torch]' (CPU torch is enough)")
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"FastCache checkpoint {str(path)!r} does not exist; pass the .pth file")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before failing cleanly
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused or "Unsupported global" in str(e):
            name = f" ({refused.group(1)})" if refused else ""
            raise CheckpointError(
                f"{path} holds pickled code or Python objects{name} that a safe load (weights_only=True) refuses; "
                "kvjax reads tensors only. If you trust the file, re-save just the state dict in a trusted "
                "environment: torch.save(ckpt['model_state_dict']['compressor'], 'compressor_only.pth')") from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}); "
                              "check the file is complete (not a Git-LFS pointer) and re-download it") from None
    if isinstance(obj, dict) and isinstance(obj.get("model_state_dict"), dict):  # the training scripts' wrapper
        obj = obj["model_state_dict"]
    if isinstance(obj, dict) and isinstance(obj.get("compressor"), dict):  # {'compressor': state_dict}
        obj = obj["compressor"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} is not a compressor state dict (expected tensors named "
                              "compress_tk.<layer>.0.weight, ...)")
    dtypes = {str(v.dtype).removeprefix("torch.") for k, v in obj.items() if _KEY.match(k.removeprefix("module."))}
    tensors = {k.removeprefix("module."): v.detach().float().numpy() for k, v in obj.items()}
    return tensors, (dtypes.pop() if len(dtypes) == 1 else "float32")


def _mlp_arrays(tensors, which: str, num_layers: int, head_dim: int, cf: int, path) -> dict[str, np.ndarray]:
    """Stack one MLP set over layers as [in, out] weights, checking every key and shape."""
    out = {}
    for (idx, kind), name in _PARAMS.items():
        fan_in = cf * head_dim if idx == "0" else head_dim
        want = (head_dim, fan_in) if kind == "weight" else (head_dim,)
        layers = []
        for layer in range(num_layers):
            key = f"compress_{which}.{layer}.{idx}.{kind}"
            if key not in tensors:
                raise CheckpointError(f"{path} lacks {key}; the model has {num_layers} layers, so the compressor "
                                      f"needs compress_{which}.0 ... compress_{which}.{num_layers - 1}")
            if tensors[key].shape != want:
                raise CheckpointError(f"{path}: {key} has shape {tuple(tensors[key].shape)}, expected {want} "
                                      f"(head_dim {head_dim}, compression factor {cf})")
            layers.append(tensors[key].T if kind == "weight" else tensors[key])
        out[name] = np.stack(layers)
    return out


def convert_fastcache(input_path, model_dir, output, *, kind: str = "auto", rope_positions: str | None = None,
                      min_seq_len: int = 2, dtype: str | None = None, overwrite: bool = False) -> pathlib.Path:
    """Convert a FastCache compressor checkpoint for the model in `model_dir`; returns the output dir.

    kind: 'decoupled' (image and text MLPs, FastCache's LLaVA compressor), 'hybrid' (text MLPs for
    the whole cache, FastCache's MiniCPM-V use) or 'auto' (hybrid for MiniCPM-V models and for
    files without image MLPs, else decoupled). rope_positions defaults to the convention FastCache
    trained that kind with: 'compressed' for decoupled, 'original' for hybrid (DESIGN.md).
    """
    num_layers, num_kv_heads, head_dim, model_type = lm_shape(model_dir)
    tensors, file_dtype = read_state_dict(input_path)
    unknown = sorted(k for k in tensors if not _KEY.match(k) and not _IGNORED.match(k))
    if unknown:
        raise CheckpointError(f"{input_path} has keys a FastCache CCM compressor does not: {unknown[:5]}"
                              f"{' ...' if len(unknown) > 5 else ''}")
    sets = {m.group(1) for m in map(_KEY.match, tensors) if m}
    if not {"tk", "tv"} <= sets:
        raise CheckpointError(f"{input_path} lacks the text MLPs (compress_tk.*, compress_tv.*)")
    has_image = {"ik", "iv"} <= sets
    if kind == "auto":
        kind = "hybrid" if model_type == "minicpmv" or not has_image else "decoupled"
    if kind not in ("decoupled", "hybrid"):
        raise KVJaxError(f"kind must be auto, decoupled or hybrid; got {kind!r}")
    if kind == "decoupled" and not has_image:
        raise CheckpointError(f"{input_path} has no image MLPs (compress_ik/iv), so it cannot be decoupled; "
                              "use kind hybrid")
    first = tensors.get("compress_tk.0.0.weight")
    got_head_dim = tensors["compress_tk.0.6.weight"].shape[0] if "compress_tk.0.6.weight" in tensors else None
    if first is None or got_head_dim is None:
        raise CheckpointError(f"{input_path} lacks compress_tk.0.0.weight / compress_tk.0.6.weight")
    if got_head_dim != head_dim or first.shape[1] % head_dim:
        raise KVJaxError(f"compressor does not fit the model: {input_path} has head_dim {got_head_dim} "
                         f"(first Linear {tuple(first.shape)}), the model in {model_dir} has head_dim {head_dim}; "
                         "use the compressor trained for this model")
    cf = first.shape[1] // head_dim
    cfg = CompressorConfig(
        num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, compression_factor=cf,
        min_seq_len=min_seq_len, image_mode="image_mlp" if kind == "decoupled" else "text_mlp",
        rope_positions=rope_positions or ("compressed" if kind == "decoupled" else "original"),
        dtype=dtype or (file_dtype if file_dtype in ("float32", "bfloat16", "float16") else "float32"))
    compressor = build_compressor(cfg)
    for which in ("tk", "tv", "ik", "iv") if kind == "decoupled" else ("tk", "tv"):
        mlp = getattr(compressor, _SETS[which])
        for name, array in _mlp_arrays(tensors, which, num_layers, head_dim, cf, input_path).items():
            getattr(mlp, name)[...] = np.asarray(array).astype(getattr(mlp, name)[...].dtype)
    return save_compressor(output, compressor, overwrite=overwrite,
                           extra={"converted_from": str(pathlib.Path(input_path).name), "fastcache_kind": kind})
