"""compact_kv: the in-place Pallas kernel (interpreted on CPU) against its jnp reference."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.compact_kv import compact_kv, compact_kv_chunked, compact_kv_pallas, compact_kv_reference
from tests.pallas_kernels._util import fast_jit, normal, poison_past

# (layers, batch, heads, max_len, head_dim, num_dst, num_new, per_layer, per_head, dtype, block_n)
CASES = [
    (1, 1, 1, 16, 16, 16, 0, False, False, jnp.float32, 64),
    (2, 3, 2, 64, 32, 40, 0, True, True, jnp.bfloat16, 16),
    (2, 2, 4, 48, 16, 30, 6, False, True, jnp.float32, 32),
    (1, 4, 3, 512, 128, 200, 0, False, False, jnp.float16, 64),
    (3, 2, 1, 96, 64, 96, 20, True, False, jnp.float32, 16),
]


def _plan(rng, case):
    """new_len [B] (row 0 keeps nothing: an untouched row), old lengths [B], src [Ls, B, Hs, N]:
    the first m slots of a row take new vectors, then kept tokens in order with src[j] >= j."""
    layers, batch, heads, max_len, _, num_dst, num_new, per_layer, per_head = case[:9]
    new_len = rng.integers(0, num_dst + 1, batch)
    new_len[0] = 0
    new_len[-1] = num_dst if batch > 1 else new_len[-1]
    old_len = np.array([rng.integers(n, max_len + 1) for n in new_len])
    src = np.tile(np.arange(num_dst, dtype=np.int32), (layers if per_layer else 1, batch, heads if per_head else 1, 1))
    for l, b, h in np.ndindex(src.shape[:3]):
        n = new_len[b]
        m = rng.integers(0, min(num_new, n) + 1) if num_new else 0
        src[l, b, h, :m] = max_len + rng.permutation(num_new)[:m]
        src[l, b, h, m:n] = np.sort(rng.choice(np.arange(m, old_len[b]), n - m, replace=False))
    return new_len, old_len, src


@pytest.mark.parametrize("case", CASES, ids=lambda c: "l{}b{}h{}s{}d{}n{}m{}".format(*c[:7]))
def test_pallas_equals_reference_in_place(case):
    layers, batch, heads, max_len, head_dim, num_dst, num_new, _, _, dtype, block_n = case
    rng = np.random.default_rng(sum(case[:7]))
    new_len, old_len, src = _plan(rng, case)
    k, v = (poison_past(normal(rng, (layers, batch, heads, max_len, head_dim), dtype), old_len, 1, 3)
            for _ in range(2))
    new = [None, None]
    if num_new:
        new = [jnp.asarray(normal(rng, (layers, batch, heads, num_new, head_dim), dtype)) for _ in range(2)]
    args = (jnp.asarray(k), jnp.asarray(v), jnp.asarray(src), jnp.asarray(new_len, jnp.int32), *new)
    kernel = fast_jit(functools.partial(compact_kv_pallas, block_n=block_n, interpret=True))
    out = kernel(*args)
    ref = fast_jit(compact_kv_reference)(*args)
    for got, want, before in zip(out, ref, (k, v)):
        assert got.dtype == before.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
        # Slots past the new length, and all of row 0 (new_len 0), are bitwise what they were.
        got, before = np.asarray(got), np.asarray(before)
        for b, n in enumerate(new_len):
            assert got[:, b, :, n:].tobytes() == before[:, b, :, n:].tobytes()


@pytest.mark.parametrize("chunk", [16, 7, 256])  # 7: the shifted last chunk; 256: one chunk
@pytest.mark.parametrize("case", CASES[:3] + CASES[4:], ids=lambda c: "l{}b{}h{}s{}d{}n{}m{}".format(*c[:7]))
def test_chunked_cpu_path_equals_reference(case, chunk):
    layers, batch, heads, max_len, head_dim, num_dst, num_new, _, _, dtype, _ = case
    rng = np.random.default_rng(sum(case[:7]) + chunk)
    new_len, old_len, src = _plan(rng, case)
    k, v = (normal(rng, (layers, batch, heads, max_len, head_dim), dtype) for _ in range(2))
    new = [None, None]
    if num_new:
        new = [jnp.asarray(normal(rng, (layers, batch, heads, num_new, head_dim), dtype)) for _ in range(2)]
    args = (jnp.asarray(k), jnp.asarray(v), jnp.asarray(src), jnp.asarray(new_len, jnp.int32), *new)
    got = fast_jit(functools.partial(compact_kv_chunked, chunk=chunk))(*args)
    want = fast_jit(compact_kv_reference)(*args)
    for g, w in zip(got, want):
        assert np.asarray(g).tobytes() == np.asarray(w).tobytes()


def test_donated_in_place_under_jit():
    # The kernel aliases its inputs: inside a jit that donates the cache no second buffer is needed.
    rng = np.random.default_rng(1)
    k, v = (jnp.asarray(normal(rng, (1, 2, 2, 32, 16))) for _ in range(2))
    expect = [np.asarray(x)[:, :, :, ::2] for x in (k, v)]
    src = jnp.asarray(np.arange(0, 32, 2, dtype=np.int32))[None, None, None].repeat(2, 1)
    step = fast_jit(functools.partial(compact_kv, mode="interpret"), donate_argnums=(0, 1))
    out = step(k, v, src, jnp.asarray([16, 16], jnp.int32))
    for got, want in zip(out, expect):
        np.testing.assert_array_equal(np.asarray(got)[:, :, :, :16], want)


def test_dispatcher_falls_back_for_odd_head_dim():
    rng = np.random.default_rng(2)
    k = jnp.asarray(normal(rng, (1, 1, 2, 16, 24)))
    src = jnp.asarray([[[[3, 5, 9]]]], jnp.int32)
    _dispatch._warned.discard(("compact_kv", "head_dim 24 is not a power of two"))
    with pytest.warns(UserWarning, match="compact_kv: using the jnp reference"):
        out = compact_kv(k, k, src, jnp.asarray([3], jnp.int32), mode="pallas")
    np.testing.assert_array_equal(out[0], compact_kv_reference(k, k, src, jnp.asarray([3], jnp.int32))[0])
