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


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """Frequencies of 4000 draws per row follow softmax(logits / T): a chi-square below 25 (3 degrees
    of freedom: p ~ 1e-5 by chance); softmax(logits) instead (T ignored) scores over 200."""
    n = 4000
    logits = jnp.tile(LOGITS, (n, 1))  # rows alternate LOGITS[0], LOGITS[1]: one call, independent draws
    got = np.asarray(sample(logits, jax.random.key(1), Sampling(temperature=temperature))).reshape(n, 2)
    for row in range(2):
        want = n * np.asarray(jax.nn.softmax(LOGITS[row] / temperature))
        counts = np.bincount(got[:, row], minlength=4)
        chi2 = float(((counts - want) ** 2 / want).sum())
        assert chi2 < 25, (temperature, row, counts, want.round())


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-2)])
def test_bad_sampling_values_are_rejected(kwargs):
    with pytest.raises(KVJaxError):
        Sampling(**kwargs)


def test_rows_sample_with_their_own_config_and_seed_whatever_their_batch():
    """sample_rows: a greedy row is argmax beside sampled rows; filters apply per row; a row's draw
    depends on its own seed and counter only, not on the other rows of its batch."""
    from kvjax.sampling import sample_rows

    def rows(configs):  # configs: (logits row, seed, counter, temperature, top_k, top_p) per row
        logits, seeds, counters, temperature, top_k, top_p = zip(*configs)
        return np.asarray(jax.jit(sample_rows)(
            jnp.stack(logits), jnp.asarray(seeds, jnp.int32), jnp.asarray(counters, jnp.int32),
            jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p, jnp.float32)))

    a, b, n = LOGITS[0], LOGITS[1], 300
    mixed = rows([cfg for c in range(n) for cfg in ((a, c, c, 0, 0, 1), (a, 5, c, 1, 0, 1), (a, 9, c, 1, 1, 1),
                                                    (b, 4, c, 1, 0, 1e-6))]).reshape(n, 4)
    np.testing.assert_array_equal(mixed[:, 0], 0)  # greedy
    freq = np.bincount(mixed[:, 1], minlength=4) / n  # temperature 1, no filter: the distribution
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.08)
    np.testing.assert_array_equal(mixed[:, 2], 0)  # top_k 1
    np.testing.assert_array_equal(mixed[:, 3], 3)  # a tiny nucleus: the top token
    alone = rows([(a, 5, c, 1, 0, 1) for c in range(n)])  # seed 5's row without its neighbours
    np.testing.assert_array_equal(alone, mixed[:, 1])
    assert (rows([(a, 6, c, 1, 0, 1) for c in range(n)]) != alone).any()  # another seed, other draws
    np.testing.assert_array_equal(rows([(a, 1, 0, 0, 0, 1), (b, 1, 0, 0, 0, 1)]), [0, 3])  # all greedy
