"""Shared fixtures: tiny random HF-format checkpoints written with transformers, loaded by kvjax."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2)

# family -> (config class, model class, extra config): one per family, each exercising what sets
# it apart (Llama-3 rope scaling and head_dim != hidden/heads; Qwen2 q/k/v bias and tied
# embeddings; Qwen3 q/k norms).
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict()),
}


def write_hf_model(path, family: str, seed: int = 0, **overrides):
    """Write a tiny random transformers model to `path` with save_pretrained; return the torch model."""
    import torch
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (model dir, torch model)."""
    root = tmp_path_factory.mktemp("hf")
    return {family: (root / family, write_hf_model(root / family, family)) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A loaded tiny Llama (model, cfg) without tokenizer."""
    import kvjax

    path = tmp_path_factory.mktemp("tiny_llama")
    write_hf_model(path, "llama", seed=1)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    return model, cfg
