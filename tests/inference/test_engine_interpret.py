"""The engine with its Pallas kernels interpreted on CPU (KVJAX_KERNELS=interpret: paged attention
in decode, compaction in compress) equals its reference-kernel run. The model has head_dim 16:
the kernels fall back to the reference for head_dim 24 (the shared tiny Llama)."""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest

import kvjax

from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compression.presses import get_press
from tests.conftest import write_hf_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_d16")
    write_hf_model(path, "llama", seed=2, head_dim=16)
    return kvjax.load(path, dtype="float32", tokenizer=False)[0]


def outputs(model, requests):
    jax.clear_caches()  # kernels are picked when a step is traced: retrace under the current mode
    engine = Engine(model, page_size=16, num_pages=4, max_num_seqs=2, max_model_len=32, prefill_batch_size=2,
                    decoding_batch_size=2, eos_ids=())
    return [r.token_ids for r in engine.generate(requests)]


def test_interpreted_kernels_equal_reference(model, monkeypatch):
    rng = np.random.default_rng(2)
    requests = [Request(prompt=rng.integers(3, 128, 20).tolist(), max_new_tokens=3),
                Request(prompt=rng.integers(3, 128, 7).tolist(), max_new_tokens=3,
                        compression=get_press("knorm", compression_ratio=0.5))]
    monkeypatch.setenv("KVJAX_KERNELS", "interpret")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        interpreted = outputs(model, requests)
    assert not [w for w in caught if "using the jnp reference" in str(w.message)]  # the kernels did run
    monkeypatch.setenv("KVJAX_KERNELS", "reference")  # last, so later tests find reference compiles
    assert interpreted == outputs(model, requests)
