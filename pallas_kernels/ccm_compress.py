"""ccm_compress: FastCache's CCM compression of a KV cache, fused with the in-place compaction.

Each sequence's valid slots [0, kv_len) are split into an image span [0, image_len) and a text
span [image_len, kv_len). A span of length n is cut into n // cf groups of cf consecutive tokens;
per (layer, kv head) a group's cf vectors are concatenated token-major (feature t * D + d) and an
MLP  Linear(cf*D, D) -> ReLU -> Linear(D, D) -> ReLU -> Linear(D, D)  (one per layer, for K and for
V, and per span kind) maps them to one vector. The n % cf leftover tokens stay as they are. A span
with fewer than min_seq_len groups, or an image span without image MLPs, is kept unchanged.
The row is rewritten as  [image groups | image leftovers | text groups | text leftovers]  and its
new length is returned; slots past it are left as they were.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import kernel_mode
from pallas_kernels.compact_kv import compact_kv_reference


class GroupMLP(NamedTuple):
    """One MLP per LM layer, stacked on axis 0; weights are [in, out]."""

    w1: jax.Array  # [L, cf*D, D]
    b1: jax.Array  # [L, D]
    w2: jax.Array  # [L, D, D]
    b2: jax.Array  # [L, D]
    w3: jax.Array  # [L, D, D]
    b3: jax.Array  # [L, D]


class CCMWeights(NamedTuple):
    """The MLPs of one compressor; without image MLPs the image span is kept unchanged."""

    text_k: GroupMLP
    text_v: GroupMLP
    image_k: GroupMLP | None = None
    image_v: GroupMLP | None = None


class CCMPlan(NamedTuple):
    """Where each group's tokens come from and where every output slot comes from, per sequence."""

    group_start: jax.Array  # int32 [B, G]: first slot of group g (its tokens are start .. start+cf-1)
    group_is_image: jax.Array  # bool [B, G]
    src: jax.Array  # int32 [B, N]: compact_kv plan; S + g means "group g's vector"
    new_len: jax.Array  # int32 [B]


def num_out_slots(max_len: int, cf: int, min_seq_len: int) -> int:
    """A static bound N on the compressed length of any row (the output prefix to write)."""
    # A span of length n keeps at most n // cf + extra slots: cf - 1 leftovers when it is
    # compressed, or all of it (< min_seq_len * cf) when it falls back. Two spans share max_len.
    below = max(min_seq_len * cf - 1, 0)
    extra = max(cf - 1, below - below // cf)
    return min(max_len, max_len // cf + 2 * extra)


def ccm_plan(kv_len, image_len, max_len: int, cf: int, min_seq_len: int, compress_image: bool) -> CCMPlan:
    """The group and destination plan for each sequence (all int32 arithmetic, no data read)."""
    kv_len = kv_len.astype(jnp.int32)
    image_len = jnp.clip(image_len.astype(jnp.int32), 0, kv_len)
    text_len = kv_len - image_len

    def groups_of(span_len, allowed=True):
        groups = span_len // cf
        return jnp.where((groups >= min_seq_len) & allowed, groups, 0)

    n_img = groups_of(image_len, compress_image)
    n_txt = groups_of(text_len)
    r_img = image_len - n_img * cf
    r_txt = text_len - n_txt * cf
    new_len = n_img + r_img + n_txt + r_txt

    g = jnp.arange(max_len // cf, dtype=jnp.int32)[None, :]
    is_image = g < n_img[:, None]
    group_start = jnp.where(is_image, g * cf, image_len[:, None] + (g - n_img[:, None]) * cf)
    group_start = jnp.clip(group_start, 0, max_len - cf)  # unused groups read something valid

    j = jnp.arange(num_out_slots(max_len, cf, min_seq_len), dtype=jnp.int32)[None, :]
    n_img, r_img, n_txt = n_img[:, None], r_img[:, None], n_txt[:, None]
    after_img = j - n_img - r_img  # index within the text part
    src = jnp.where(j < n_img, max_len + j,
          jnp.where(j < n_img + r_img, n_img * cf + (j - n_img),
          jnp.where(after_img < n_txt, max_len + n_img + after_img,
                    image_len[:, None] + n_txt * cf + (after_img - n_txt))))
    src = jnp.where(j < new_len[:, None], src, j)  # past the new length: "stay where you are"
    return CCMPlan(group_start, is_image, src, new_len)


def group_mlp(w: GroupMLP, x: jax.Array, dropout: Callable | None = None) -> jax.Array:
    """x [L, ..., cf*D] -> [L, ..., D], layer l through w[l]; `dropout` follows each ReLU (training)."""
    drop = dropout or (lambda h: h)
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1]).astype(w.w1.dtype)
    h = drop(jax.nn.relu(jnp.einsum("lmi,lio->lmo", x, w.w1) + w.b1[:, None]))
    h = drop(jax.nn.relu(jnp.einsum("lmi,lio->lmo", h, w.w2) + w.b2[:, None]))
    out = jnp.einsum("lmi,lio->lmo", h, w.w3) + w.b3[:, None]
    return out.reshape(*shape[:-1], out.shape[-1])


def _compressed_groups(cache, plan: CCMPlan, cf: int, text: GroupMLP, image: GroupMLP | None, dropout):
    """[L, B, H, G, D]: every group of the plan through its span's MLP."""
    num_layers, batch, num_heads, _, head_dim = cache.shape
    num_groups = plan.group_start.shape[1]
    slots = (plan.group_start[:, :, None] + jnp.arange(cf, dtype=jnp.int32)).reshape(batch, -1)
    tokens = jnp.take_along_axis(cache, slots[None, :, None, :, None], axis=3)
    groups = tokens.reshape(num_layers, batch, num_heads, num_groups, cf * head_dim)
    out = group_mlp(text, groups, dropout)
    if image is not None:
        out = jnp.where(plan.group_is_image[None, :, None, :, None], group_mlp(image, groups, dropout), out)
    return out


def ccm_compress_reference(k, v, kv_len, image_len, weights: CCMWeights, *, cf: int, min_seq_len: int,
                           dropout: Callable | None = None):
    """The definition (module docstring) in plain jnp: k, v [L, B, H, S, D], kv_len and image_len
    int32 [B] -> (k, v, new_len [B]). Differentiable in `weights`; `dropout` is for training only."""
    plan = ccm_plan(kv_len, image_len, k.shape[3], cf, min_seq_len, weights.image_k is not None)
    new_k = _compressed_groups(k, plan, cf, weights.text_k, weights.image_k, dropout)
    new_v = _compressed_groups(v, plan, cf, weights.text_v, weights.image_v, dropout)
    src = plan.src[None, :, None, :]
    k, v = compact_kv_reference(k, v, src, plan.new_len, new_k, new_v)
    return k, v, plan.new_len


# ccm_compress_pallas(k, v, kv_len, image_len, weights, *, cf, min_seq_len, interpret=False) goes here.


def ccm_compress(k, v, kv_len, image_len, weights: CCMWeights, *, cf: int, min_seq_len: int,
                 mode: str | None = None):
    """Dispatcher (inference: no dropout): Pallas on GPU, the reference on CPU."""
    mode = kernel_mode(mode)
    if mode == "reference":
        return ccm_compress_reference(k, v, kv_len, image_len, weights, cf=cf, min_seq_len=min_seq_len)
    return ccm_compress_pallas(k, v, kv_len, image_len, weights, cf=cf, min_seq_len=min_seq_len,  # noqa: F821
                               interpret=mode == "interpret")
