"""Shared fixtures: tiny random HF-format checkpoints written with transformers, loaded by kvjax."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests run tiny models, so XLA's compile time outweighs the run time: cheaper CPU code
# generation cuts the suite by about a third (also in the CLIs and servers the tests start).
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                    "--xla_llvm_disable_expensive_passes=true"]).strip()

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


# The shared training run (`trained_run` below) and the tests that use it: under `-n N` they run on
# one worker, which makes the run (and compiles its train step) once. xdist's own loadgroup does
# not group on pytest 9 (it sets `item._nodeid`, which pytest 9 no longer reads), so the grouping
# is done here by test name. The hook must live in this top conftest: xdist's controller does not
# collect, so it loads only the conftests of the command-line paths (`tests`, from testpaths).
# Likewise the tensor-parallel tests, which share one subprocess's report (module fixture `report`).
SHARED_REPORT_MODULE = "tests/kvjax/test_parallel.py"
SHARED_RUN_TESTS = ("test_training_lowers_validation_kl", "test_kill_and_resume_is_bitwise_equal",
                    "test_train_from_yaml_then_chat_reads_the_compressor")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `-n N` (dist `load`): the SHARED_RUN_TESTS form one scope, every other test its own."""
    if config.getoption("dist", "no") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):  # every other test is a scope of its own, as under `load`
            if nodeid.startswith(SHARED_REPORT_MODULE):
                return SHARED_REPORT_MODULE
            return "trained_run" if nodeid.split("::")[-1].split("[")[0] in SHARED_RUN_TESTS else nodeid

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_train_setup(tmp_path_factory):
    """The training tests' tiny Llama (2 layers, hidden 32) and the demo dataset -> (model_dir,
    data_path, home); KVJAX_HOME points at a temporary directory."""
    from kvjax.testing import text as demo

    home = tmp_path_factory.mktemp("kvjax_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVJAX_HOME", str(home))
        from training.demo_data import ensure_demo_dataset

        data = ensure_demo_dataset()
        model_dir = demo.write_checkpoint(home / "tiny", "llama", hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=512)
        yield model_dir, data, home


@pytest.fixture(scope="session")
def trained_run(tiny_train_setup, tmp_path_factory):
    """-> dict(out, summary, start (params before), backbone (before), trainer) of one SHARED run
    (tests/training/conftest.py), defined here so tests/training and tests/kvjax/cli share it."""
    import jax
    import numpy as np
    from flax import nnx

    from tests.training.conftest import SHARED, tiny_config
    from training.trainer import Trainer

    model_dir, data, _ = tiny_train_setup
    out = tmp_path_factory.mktemp("shared") / "run"
    trainer = Trainer(tiny_config(model_dir, data, out, **SHARED))
    backbone = jax.tree.map(np.array, trainer.backbone_state)
    start = jax.tree.map(np.array, nnx.to_pure_dict(trainer.state["params"]))
    summary = trainer.run()
    return dict(out=out, summary=summary, start=start, backbone=backbone, trainer=trainer)
