"""A tiny Llama (2 layers, hidden 32) and the demo dataset, shared by the training tests."""

import pytest


@pytest.fixture(scope="session")
def tiny_train_setup(tmp_path_factory):
    """-> (model_dir, data_path, home); KVJAX_HOME points at a temporary directory."""
    from kvjax import demo

    home = tmp_path_factory.mktemp("kvjax_home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVJAX_HOME", str(home))
        from training.demo_data import ensure_demo_dataset

        data = ensure_demo_dataset()
        model_dir = demo.write_checkpoint(home / "tiny", "llama", hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                          head_dim=16, max_position_embeddings=512)
        yield model_dir, data, home


def tiny_config(model_dir, data, out, **overrides):
    """Settings that keep every batch in one compiled shape (context bucket 128, continuation 32)."""
    from training.config import TrainConfig

    base = dict(model_dir=str(model_dir), data=str(data), out=str(out), batch_size=4, max_context_len=96,
                max_answer_len=24, min_bucket=128, compression_factor=4, quiet=True, save_every=1000)
    return TrainConfig(**{**base, **overrides})
