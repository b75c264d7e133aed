"""kvjax.load: sharded and single-file checkpoints, and one clear error per kind of bad input."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import kvjax
from kvjax.errors import CheckpointError
from tests.conftest import write_hf_model


@pytest.fixture()
def llama_dir(hf_models, tmp_path):
    """A private copy of the tiny Llama checkpoint, free to damage."""
    src, _ = hf_models["llama"]
    return shutil.copytree(src, tmp_path / "llama")


def _reference_logits(path):
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    logits, _ = kvjax.prefill(model, kvjax.KVCache.for_model(cfg, 1, 16), np.arange(3, 12)[None])
    return np.asarray(logits)


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    torch_model = write_hf_model(tmp_path / "single", "qwen3")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    np.testing.assert_array_equal(_reference_logits(tmp_path / "sharded"), _reference_logits(tmp_path / "single"))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        kvjax.load(tmp_path / "nope")


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        kvjax.load(llama_dir)


def test_invalid_config_json(llama_dir):
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        kvjax.load(llama_dir)


def test_unsupported_architecture_is_named_with_the_supported_list(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(kvjax.KVJaxError, match="GPT2LMHeadModel.*LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        kvjax.load(llama_dir)


def test_missing_tensor_is_named(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, llama_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        kvjax.load(llama_dir, tokenizer=False)


def test_misshaped_tensor_names_expected_and_found(llama_dir):
    weights = load_file(llama_dir / "model.safetensors")
    weights["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
    save_file(weights, llama_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*\(8, 64\), expected \(48, 64\)"):
        kvjax.load(llama_dir, tokenizer=False)


def test_corrupt_weights_file(llama_dir):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        kvjax.load(llama_dir, tokenizer=False)


def test_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        kvjax.load(llama_dir, tokenizer=False)


def test_bad_dtype(llama_dir):
    with pytest.raises(kvjax.KVJaxError, match="unsupported dtype 'int8'"):
        kvjax.load(llama_dir, dtype="int8", tokenizer=False)


def test_generation_config_eos_ids_are_added(llama_dir):
    (llama_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    _, _, cfg = kvjax.load(llama_dir, tokenizer=False)
    assert cfg.eos_token_ids == (2, 7, 9)
