"""ccm_compress: the fused in-place Pallas kernel (interpreted on CPU) against its jnp reference."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _dispatch
from pallas_kernels.ccm_compress import (CCMWeights, GroupMLP, ccm_compress, ccm_compress_pallas,
                                         ccm_compress_reference)
from tests.pallas_kernels._util import assert_close, fast_jit, normal, poison_past

# (layers, batch, heads, max_len, head_dim, cf, min_seq_len, image MLPs, dtype, kv_len, image_len)
# Spans cover: compressed with leftovers, too short (fallback), empty, whole cache, image-only.
CASES = [
    (2, 2, 2, 64, 16, 2, 2, True, jnp.float32, [61, 64], [36, 0]),
    (1, 3, 1, 96, 32, 3, 1, False, jnp.float32, [34, 0, 96], [17, 0, 40]),
    (1, 4, 2, 64, 32, 5, 2, True, jnp.bfloat16, [64, 9, 40, 23], [30, 9, 0, 12]),
    (1, 1, 3, 128, 64, 4, 3, True, jnp.float32, [128], [128]),
    (2, 2, 1, 48, 128, 2, 4, False, jnp.float32, [47, 12], [5, 3]),
]


def _weights(rng, layers, cf, head_dim, dtype, has_image):
    def mlp():
        scale = [1 / np.sqrt(cf * head_dim), 1, 1 / np.sqrt(head_dim), 1, 1 / np.sqrt(head_dim), 1]
        shapes = [(cf * head_dim, head_dim), (head_dim,), (head_dim, head_dim), (head_dim,),
                  (head_dim, head_dim), (head_dim,)]
        return GroupMLP(*(jnp.asarray(normal(rng, (layers, *s)) * f, dtype) for s, f in zip(shapes, scale)))
    return CCMWeights(mlp(), mlp(), *((mlp(), mlp()) if has_image else ()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "l{}b{}h{}s{}d{}cf{}".format(*c[:6]))
def test_pallas_equals_reference_in_place(case):
    layers, batch, heads, max_len, head_dim, cf, min_seq_len, has_image, dtype, lengths, image = case
    rng = np.random.default_rng(sum(case[:7]))
    k, v = (poison_past(normal(rng, (layers, batch, heads, max_len, head_dim), dtype), lengths, 1, 3)
            for _ in range(2))
    weights = _weights(rng, layers, cf, head_dim, dtype, has_image)
    args = (jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths, jnp.int32), jnp.asarray(image, jnp.int32))
    statics = dict(cf=cf, min_seq_len=min_seq_len)
    out_k, out_v, new_len = fast_jit(functools.partial(ccm_compress_pallas, **statics, block_n=16,
                                                       interpret=True))(*args, weights)
    ref_k, ref_v, ref_len = fast_jit(functools.partial(ccm_compress_reference, **statics))(*args, weights)
    np.testing.assert_array_equal(new_len, ref_len)
    for got, want, before in zip((out_k, out_v), (ref_k, ref_v), (k, v)):
        got, want = np.asarray(got), np.asarray(want)
        for b, n in enumerate(np.asarray(new_len)):
            assert_close(got[:, b, :, :n], want[:, b, :, :n], dtype)
            assert got[:, b, :, n:].tobytes() == before[:, b, :, n:].tobytes(), "slots past new_len changed"


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
