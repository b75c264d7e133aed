"""Helpers of the training tests: the shared run's settings (SHARED, tiny_config) and checks.
Its fixtures (`tiny_train_setup`, `trained_run`) and the xdist hook that keeps the shared run on one
worker live in tests/conftest.py: tests outside this directory (tests/kvjax/cli/test_train_cli.py)
use the same run, and xdist's controller loads only the top conftest."""


# The shared run: 20 train / 5 val examples, 5 micro-steps per epoch, 2 micro-steps per update.
SHARED = dict(epochs=4, accumulate=2, lr=1e-2)


def tiny_config(model_dir, data, out, **overrides):
    """Settings that keep every batch in one compiled shape (context bucket 128, continuation 32)."""
    from training.config import TrainConfig

    base = dict(model_dir=str(model_dir), data=str(data), out=str(out), batch_size=4, max_context_len=96,
                max_answer_len=24, min_bucket=128, compression_factor=4, quiet=True, save_every=1000)
    return TrainConfig(**{**base, **overrides})


def assert_every_layer_moved(start, params):
    """Every layer ([layers, ...] leading axis) of every weight changed: its gradient was non-zero."""
    import jax
    import numpy as np

    def moved(a, b):
        diff = np.abs(np.asarray(a) - np.asarray(b)).reshape(np.shape(a)[0], -1).sum(axis=1)
        return bool((diff > 0).all())

    flat = jax.tree_util.tree_leaves_with_path(jax.tree.map(moved, start, params))
    assert flat and all(ok for _, ok in flat), [jax.tree_util.keystr(p) for p, ok in flat if not ok]
