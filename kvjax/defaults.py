"""The models kvjax ships (trained here, see README "The default models"): where they and their
CCM compressors live in the package, and the held-out text the text model's figures use."""

from __future__ import annotations

import pathlib

from kvjax.errors import KVJaxError

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default-llama"  # Llama architecture, trained on the KJV Bible + retrieval tasks
DEFAULT_VLM = ASSETS / "default-llava"  # LLaVA-1.5 architecture, trained on kvjax.scenes image questions
# Each shipped model's CCM compressors, one directory per factor: cf5/, ...
COMPRESSORS = {DEFAULT_MODEL: ASSETS / "default-llama-ccm", DEFAULT_VLM: ASSETS / "default-llava-ccm"}
HELD_OUT_TEXT = ASSETS / "kjv-test.txt"  # the corpus's test split (books the model never saw)
DEFAULT_FACTOR = 5


def _shipped(path: pathlib.Path, what: str) -> pathlib.Path:
    if not (path / "config.json").is_file():
        raise KVJaxError(f"the shipped {what} is missing from {path}: reinstall kvjax, or pass --model-dir DIR "
                         "(or --demo llama / --demo llava for a random demo model)")
    return path


def default_model_dir() -> pathlib.Path:
    return _shipped(DEFAULT_MODEL, "default model")


def default_vlm_dir() -> pathlib.Path:
    return _shipped(DEFAULT_VLM, "default VLM")


def is_default_model(model_dir) -> bool:
    """Whether model_dir is one of the shipped models (text or VLM)."""
    return model_dir is not None and pathlib.Path(model_dir).resolve() in COMPRESSORS


def shipped_factors(model_dir=DEFAULT_MODEL) -> list[int]:
    """Compression factors of a shipped model's compressors, ascending."""
    folder = COMPRESSORS[pathlib.Path(model_dir).resolve()]
    found = [p.name.removeprefix("cf") for p in folder.glob("cf*") if (p / "compressor.json").is_file()]
    return sorted(int(f) for f in found if f.isdigit())


def default_compressor_dir(compression_factor: int | None = None, model_dir=DEFAULT_MODEL) -> pathlib.Path:
    """A shipped model's compressor for this factor (default 5)."""
    factor = DEFAULT_FACTOR if compression_factor is None else compression_factor
    path = COMPRESSORS[pathlib.Path(model_dir).resolve()] / f"cf{factor}"
    if not (path / "compressor.json").is_file():
        have = ", ".join(map(str, shipped_factors(model_dir))) or "none"
        raise KVJaxError(f"no shipped compressor for compression factor {factor} (shipped: {have}); pass "
                         "--kv-compress-ckpt DIR or one of the shipped factors")
    return path
