"""A tiny Llama (2 layers, hidden 32), the demo dataset, and one trained run shared by the training
tests (one compile of the train step per worker: every text test uses the same static settings)."""

import pytest


# Tests that use `trained_run`; under `-n N` they run on one worker, which makes the run (and
# compiles its train step) once. xdist's own loadgroup does not group on pytest 9 (it sets
# `item._nodeid`, which pytest 9 no longer reads), so the grouping is done here by test name.
SHARED_RUN_TESTS = ("test_training_lowers_validation_kl", "test_kill_and_resume_is_bitwise_equal",
                    "test_train_from_yaml_then_chat_reads_the_compressor")


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Active when this directory is named on the command line (its conftest loads in the controller)."""
    if config.getoption("dist", "no") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):  # every other test is a scope of its own, as under `load`
            return "trained_run" if nodeid.split("::")[-1].split("[")[0] in SHARED_RUN_TESTS else nodeid

    return SharedRunScheduling(config, log)


@pytest.fixture(scope="session")
def tiny_train_setup(tmp_path_factory):
    """-> (model_dir, data_path, home); KVJAX_HOME points at a temporary directory."""
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


# The shared run: 20 train / 5 val examples, 5 micro-steps per epoch, 2 micro-steps per update.
SHARED = dict(epochs=4, accumulate=2, lr=1e-2)


def tiny_config(model_dir, data, out, **overrides):
    """Settings that keep every batch in one compiled shape (context bucket 128, continuation 32)."""
    from training.config import TrainConfig

    base = dict(model_dir=str(model_dir), data=str(data), out=str(out), batch_size=4, max_context_len=96,
                max_answer_len=24, min_bucket=128, compression_factor=4, quiet=True, save_every=1000)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def trained_run(tiny_train_setup, tmp_path_factory):
    """-> dict(out, summary, start (params before), backbone (before), trainer) of one SHARED run."""
    import jax
    import numpy as np
    from flax import nnx

    from training.trainer import Trainer

    model_dir, data, _ = tiny_train_setup
    out = tmp_path_factory.mktemp("shared") / "run"
    trainer = Trainer(tiny_config(model_dir, data, out, **SHARED))
    backbone = jax.tree.map(np.array, trainer.backbone_state)
    start = jax.tree.map(np.array, nnx.to_pure_dict(trainer.state["params"]))
    summary = trainer.run()
    return dict(out=out, summary=summary, start=start, backbone=backbone, trainer=trainer)


def assert_every_layer_moved(start, params):
    """Every layer ([layers, ...] leading axis) of every weight changed: its gradient was non-zero."""
    import jax
    import numpy as np

    def moved(a, b):
        diff = np.abs(np.asarray(a) - np.asarray(b)).reshape(np.shape(a)[0], -1).sum(axis=1)
        return bool((diff > 0).all())

    flat = jax.tree_util.tree_leaves_with_path(jax.tree.map(moved, start, params))
    assert flat and all(ok for _, ok in flat), [jax.tree_util.keystr(p) for p, ok in flat if not ok]
