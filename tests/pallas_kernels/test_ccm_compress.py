"""ccm_compress: the fused in-place Pallas kernel (interpreted on CPU) against its jnp reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.ccm_compress import (CCMWeights, GroupMLP, ccm_compress, ccm_compress_pallas,
                                         ccm_compress_reference)
from tests.pallas_kernels._util import assert_close, fast_jit, normal, poison_past
from tests.pallas_kernels.ccm_loop import naive_ccm

# (layers, batch, heads, max_len, head_dim, cf, min_seq_len, image MLPs, dtype, kv_len, image_len, keep_last)
# Spans cover: compressed with leftovers, too short (fallback), empty, whole cache, image-only; a
# kept text tail: shorter than the text, longer than it, and past the output bound without a tail.
CASES = [
    (2, 2, 2, 64, 16, 2, 2, True, jnp.float32, [61, 64], [36, 0], 0),
    (1, 3, 1, 96, 32, 3, 1, False, jnp.float32, [34, 0, 96], [17, 0, 40], 0),
    (1, 4, 2, 64, 32, 5, 2, True, jnp.bfloat16, [64, 9, 40, 23], [30, 9, 0, 12], 0),
    (1, 1, 3, 128, 64, 4, 3, True, jnp.float32, [128], [128], 0),
    (2, 2, 1, 48, 128, 2, 4, False, jnp.float32, [47, 12], [5, 3], 0),
    (1, 3, 1, 64, 32, 4, 1, True, jnp.float32, [50, 10, 64], [10, 0, 4], 16),
]


def _weights(rng, layers, cf, head_dim, dtype, has_image):
    def mlp():
        scale = [1 / np.sqrt(cf * head_dim), 1, 1 / np.sqrt(head_dim), 1, 1 / np.sqrt(head_dim), 1]
        shapes = [(cf * head_dim, head_dim), (head_dim,), (head_dim, head_dim), (head_dim,),
                  (head_dim, head_dim), (head_dim,)]
        return GroupMLP(*(jnp.asarray(normal(rng, (layers, *s)) * f, dtype) for s, f in zip(shapes, scale)))
    return CCMWeights(mlp(), mlp(), *((mlp(), mlp()) if has_image else ()))


@functools.cache
def run_case(index: int):
    """CASES[index] through the interpreted kernel and the reference, once per process:
    -> (inputs k, v as numpy, weights, kernel (k, v, new_len), reference (k, v, new_len))."""
    layers, batch, heads, max_len, head_dim, cf, min_seq_len, has_image, dtype, lengths, image, keep = CASES[index]
    rng = np.random.default_rng(sum(CASES[index][:7]))
    k, v = (poison_past(normal(rng, (layers, batch, heads, max_len, head_dim), dtype), lengths, 1, 3)
            for _ in range(2))
    weights = _weights(rng, layers, cf, head_dim, dtype, has_image)
    args = (jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), jnp.asarray(image, jnp.int32))
    statics = dict(cf=cf, min_seq_len=min_seq_len, keep_last=keep)
    out = fast_jit(functools.partial(ccm_compress_pallas, **statics, block_n=16, interpret=True))(*args, weights)
    ref = fast_jit(functools.partial(ccm_compress_reference, **statics))(*args, weights)
    return k, v, weights, jax.tree.map(np.asarray, out), jax.tree.map(np.asarray, ref)


CASE_IDS = ["l{}b{}h{}s{}d{}cf{}".format(*c[:6]) + (f"keep{c[11]}" if c[11] else "") for c in CASES]


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_pallas_equals_reference_in_place(index):
    dtype = CASES[index][8]
    k, v, _, (out_k, out_v, new_len), (ref_k, ref_v, ref_len) = run_case(index)
    np.testing.assert_array_equal(new_len, ref_len)
    for got, want, before in zip((out_k, out_v), (ref_k, ref_v), (k, v)):
        for b, n in enumerate(new_len):
            assert_close(got[:, b, :, :n], want[:, b, :, :n], dtype)
            assert got[:, b, :, n:].tobytes() == before[:, b, :, n:].tobytes(), "slots past new_len changed"


@pytest.mark.parametrize("index", range(len(CASES)), ids=CASE_IDS)
def test_pallas_and_reference_equal_the_numpy_loop(index):
    """The reference shares the kernel's `ccm_plan`; the numpy loop shares nothing, so a plan bug
    (group counts, fallbacks, leftovers, output bound) shows here. Case 1's third row keeps a
    40-token image whole (no image MLPs) and compresses 56 text tokens: 60 slots, past the output
    bound ccm_plan once used (a bug this test caught). The last case's rows of 26 and 28 slots are
    past the bound without their 16 kept tokens (22)."""
    _, _, _, cf, min_seq_len, _, dtype, lengths, image, keep = CASES[index][2:]
    k, v, weights, (out_k, out_v, new_len), (ref_k, ref_v, ref_len) = run_case(index)
    loop_k, loop_v, loop_len = naive_ccm(k, v, lengths, image, jax.tree.map(np.asarray, weights), cf, min_seq_len, keep)
    np.testing.assert_array_equal(new_len, loop_len)
    np.testing.assert_array_equal(ref_len, loop_len)
    for got, want in zip((out_k, out_v, ref_k, ref_v), (loop_k, loop_v) * 2):
        for b, n in enumerate(loop_len):
            assert_close(got[:, b, :, :n], want[:, b, :, :n], dtype)


def test_dispatcher_falls_back_for_odd_head_dim():
    rng = np.random.default_rng(4)
    k = jnp.asarray(normal(rng, (1, 1, 1, 32, 24)))
    weights = _weights(rng, 1, 2, 24, jnp.float32, False)
    lengths, image = jnp.asarray([30], jnp.int32), jnp.asarray([0], jnp.int32)
    _dispatch._warned.discard(("ccm_compress", "head_dim 24 is not a power of two >= 16"))
    with pytest.warns(UserWarning, match="ccm_compress: using the jnp reference"):
        out = fast_jit(functools.partial(ccm_compress, cf=2, min_seq_len=1, mode="interpret"))(
            k, k, lengths, image, weights)
    want = fast_jit(functools.partial(ccm_compress_reference, cf=2, min_seq_len=1))(k, k, lengths, image, weights)
    np.testing.assert_array_equal(out[0], want[0])
