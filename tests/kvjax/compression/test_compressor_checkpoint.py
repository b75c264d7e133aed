"""Compressor checkpoints: round trip, dtype cast, and one clear error per bad input."""

import numpy as np
import pytest
from flax import nnx

import kvjax
from kvjax.compression.checkpoint import load_compressor, save_compressor
from kvjax.compression.ccm import CompressorConfig, build_compressor

CFG = CompressorConfig(num_layers=2, num_kv_heads=2, head_dim=8, compression_factor=3, rope_positions="compressed")


def test_round_trip_keeps_weights_and_config(tmp_path):
    compressor = build_compressor(CFG, rngs=nnx.Rngs(7))
    save_compressor(tmp_path / "c", compressor)
    loaded = load_compressor(tmp_path / "c")
    assert loaded.cfg == CFG
    for name in ("text_k", "text_v", "image_k", "image_v"):
        for a, b in zip(getattr(compressor, name).weights(), getattr(loaded, name).weights()):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    half = load_compressor(tmp_path / "c", dtype="bfloat16")
    assert half.cfg.dtype == "bfloat16" and half.text_k.w1[...].dtype == np.dtype("bfloat16")


def test_mismatched_model_is_refused(tmp_path, tiny_llama):
    _, model_cfg = tiny_llama
    save_compressor(tmp_path / "c", build_compressor(CFG))
    with pytest.raises(kvjax.KVJaxError, match=r"compressor has .* \(2, 2, 8\), the model has \(2, 2, 24\)"):
        load_compressor(tmp_path / "c", model_cfg)


def test_bad_paths_name_the_fix(tmp_path):
    with pytest.raises(kvjax.CheckpointError, match="does not exist"):
        load_compressor(tmp_path / "nope")
    (tmp_path / "x.pth").write_bytes(b"0")
    with pytest.raises(kvjax.CheckpointError, match="convert_fastcache"):
        load_compressor(tmp_path / "x.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(kvjax.CheckpointError, match="no compressor.json"):
        load_compressor(tmp_path / "empty")
    save_compressor(tmp_path / "c", build_compressor(CFG))
    (tmp_path / "c" / "compressor.json").write_text("{broken")
    with pytest.raises(kvjax.CheckpointError, match="corrupt"):
        load_compressor(tmp_path / "c")
    save_compressor(tmp_path / "d", build_compressor(CFG))
    for f in (tmp_path / "d" / "params").rglob("*"):
        if f.is_file() and "manifest" in f.name:
            f.write_bytes(b"garbage")
    with pytest.raises(kvjax.CheckpointError, match="cannot read the compressor weights"):
        load_compressor(tmp_path / "d")


def test_save_refuses_to_clobber(tmp_path):
    save_compressor(tmp_path / "c", build_compressor(CFG))
    with pytest.raises(kvjax.KVJaxError, match="already exists"):
        save_compressor(tmp_path / "c", build_compressor(CFG))
    save_compressor(tmp_path / "c", build_compressor(CFG), overwrite=True)
    assert not (tmp_path / "c.old").exists() and not (tmp_path / "c.partial").exists()


def test_compressor_distilled_for_other_weights_warns(tmp_path):
    """A retrained model keeps its shapes, so an old compressor still loads: the fingerprint of the
    teacher's weights it records is what tells them apart."""
    import warnings

    from kvjax.compression.checkpoint import distilled_for

    for name, byte in (("teacher", b"a"), ("retrained", b"b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"header" + byte * 4096)
    save_compressor(tmp_path / "c", build_compressor(CFG), extra=distilled_for(tmp_path / "teacher"))
    save_compressor(tmp_path / "unrecorded", build_compressor(CFG))  # converted, or from an older kvjax
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_compressor(tmp_path / "c", model_dir=tmp_path / "teacher")
        load_compressor(tmp_path / "unrecorded", model_dir=tmp_path / "retrained")
    with pytest.warns(UserWarning, match=r"distilled against other weights than \S*retrained .*"
                                         r"python -m kvjax.train --model-dir"):
        load_compressor(tmp_path / "c", model_dir=tmp_path / "retrained")
