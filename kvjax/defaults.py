"""The models kvjax ships (trained here, see README "The default text model"): where they live in
the package, and the held-out text their figures are measured on."""

from __future__ import annotations

import pathlib

from kvjax.errors import KVJaxError

ASSETS = pathlib.Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "default-llama"  # Llama architecture, trained on the KJV Bible + retrieval tasks
DEFAULT_COMPRESSORS = ASSETS / "default-llama-ccm"  # its CCM compressors, one directory per factor: cf5/, ...
HELD_OUT_TEXT = ASSETS / "kjv-test.txt"  # the corpus's test split (books the model never saw)
DEFAULT_FACTOR = 5


def default_model_dir() -> pathlib.Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise KVJaxError(f"the shipped default model is missing from {DEFAULT_MODEL}: reinstall kvjax, or pass "
                         "--model-dir DIR (or --demo llama for the random demo model)")
    return DEFAULT_MODEL


def is_default_model(model_dir) -> bool:
    return model_dir is not None and pathlib.Path(model_dir).resolve() == DEFAULT_MODEL


def shipped_factors() -> list[int]:
    """Compression factors of the shipped compressors, ascending."""
    found = [p.name.removeprefix("cf") for p in DEFAULT_COMPRESSORS.glob("cf*") if (p / "compressor.json").is_file()]
    return sorted(int(f) for f in found if f.isdigit())


def default_compressor_dir(compression_factor: int | None = None) -> pathlib.Path:
    """The shipped compressor of the default model for this factor (default 5)."""
    factor = DEFAULT_FACTOR if compression_factor is None else compression_factor
    path = DEFAULT_COMPRESSORS / f"cf{factor}"
    if not (path / "compressor.json").is_file():
        have = ", ".join(map(str, shipped_factors())) or "none"
        raise KVJaxError(f"no shipped compressor for compression factor {factor} (shipped: {have}); pass "
                         "--kv-compress-ckpt DIR or one of the shipped factors")
    return path
