import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvjax import KVJaxError, Sampling
from kvjax.sampling import sample

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], jnp.float32))


def draws(sampling, n=400):
    keys = jax.random.split(jax.random.key(0), n)
    return np.stack([np.asarray(sample(LOGITS, k, sampling)) for k in keys])


def test_greedy_is_argmax():
    np.testing.assert_array_equal(sample(LOGITS, jax.random.key(0), Sampling()), [0, 3])


def test_top_k_keeps_only_the_k_best():
    got = draws(Sampling(temperature=1.0, top_k=2))
    assert set(got[:, 0]) == {0, 1} and set(got[:, 1]) == {3, 2}


def test_top_p_keeps_the_nucleus():
    got = draws(Sampling(temperature=1.0, top_p=0.7))  # 0.5 + 0.3 covers 0.7
    assert set(got[:, 0]) == {0, 1} and set(got[:, 1]) == {3, 2}
    tiny = draws(Sampling(temperature=1.0, top_p=1e-6), n=50)
    np.testing.assert_array_equal(tiny, np.tile([0, 3], (50, 1)))


def test_temperature_sampling_follows_the_distribution():
    got = draws(Sampling(temperature=1.0), n=2000)
    freq = np.bincount(got[:, 0], minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_values_are_rejected(kwargs):
    with pytest.raises(KVJaxError):
        Sampling(**kwargs)
