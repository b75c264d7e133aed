"""ccm_compress: FastCache's CCM compression of a KV cache, fused with the in-place compaction.

Each sequence's valid slots [0, kv_len) are split into an image span [0, image_len) and a text
span [image_len, kv_len). A span of length n is cut into n // cf groups of cf consecutive tokens;
per (layer, kv head) a group's cf vectors are concatenated token-major (feature t * D + d) and an
MLP  Linear(cf*D, D) -> ReLU -> Linear(D, D) -> ReLU -> Linear(D, D)  (one per layer, for K and for
V, and per span kind) maps them to one vector. The n % cf leftover tokens stay as they are. A span
with fewer than min_seq_len groups, or an image span without image MLPs, is kept unchanged.
keep_last > 0 keeps the text span's last keep_last tokens (the question, the chat template's tail)
as they are too: only the tokens before them are grouped, and the leftovers are counted there.
The row is rewritten as  [image groups | image leftovers | text groups | text leftovers]  and its
new length is returned; slots past it are left as they were.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _compat
from pallas_kernels._dispatch import choose_mode
from pallas_kernels.compact_kv import compact_kv_reference, compact_rows, load_rows


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


def num_out_slots(max_len: int, cf: int, min_seq_len: int, compress_image: bool = True, keep_last: int = 0) -> int:
    """A static bound N on the compressed length of any row (the output prefix to write). An image
    span kept whole (no image MLPs) may fill the cache, so then the bound is max_len."""
    if not compress_image:
        return max_len
    # A span of length n keeps at most n // cf + extra slots: cf - 1 leftovers when it is
    # compressed, or all of it (< min_seq_len * cf) when it falls back. Two spans share max_len;
    # the text span also keeps its last keep_last tokens.
    below = max(min_seq_len * cf - 1, 0)
    extra = max(cf - 1, below - below // cf)
    return min(max_len, max_len // cf + 2 * extra + keep_last)


def ccm_plan(kv_len, image_len, max_len: int, cf: int, min_seq_len: int, compress_image: bool,
             keep_last: int = 0) -> CCMPlan:
    """The group and destination plan for each sequence (all int32 arithmetic, no data read)."""
    kv_len = kv_len.astype(jnp.int32)
    image_len = jnp.clip(image_len.astype(jnp.int32), 0, kv_len)
    text_len = kv_len - image_len

    def groups_of(span_len, allowed=True):
        groups = span_len // cf
        return jnp.where((groups >= min_seq_len) & allowed, groups, 0)

    n_img = groups_of(image_len, compress_image)
    n_txt = groups_of(jnp.maximum(text_len - keep_last, 0))
    r_img = image_len - n_img * cf
    r_txt = text_len - n_txt * cf
    new_len = n_img + r_img + n_txt + r_txt

    g = jnp.arange(max_len // cf, dtype=jnp.int32)[None, :]
    is_image = g < n_img[:, None]
    group_start = jnp.where(is_image, g * cf, image_len[:, None] + (g - n_img[:, None]) * cf)
    group_start = jnp.clip(group_start, 0, max_len - cf)  # unused groups read something valid

    j = jnp.arange(num_out_slots(max_len, cf, min_seq_len, compress_image, keep_last), dtype=jnp.int32)[None, :]
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
    if image is not None:  # static shapes: both MLPs see every group, and the span picks
        def with_image():
            return jnp.where(plan.group_is_image[None, :, None, :, None], group_mlp(image, groups, dropout), out)
        # Skip the image MLP when no row has an image group (text prompts); a stateful dropout
        # (training) cannot run inside lax.cond, so then it always runs.
        out = with_image() if dropout else jax.lax.cond(plan.group_is_image.any(), with_image, lambda: out)
    return out


def ccm_compress_reference(k, v, kv_len, image_len, weights: CCMWeights, *, cf: int, min_seq_len: int,
                           keep_last: int = 0, dropout: Callable | None = None):
    """The definition (module docstring) in plain jnp: k, v [L, B, H, S, D], kv_len and image_len
    int32 [B] -> (k, v, new_len [B]). Differentiable in `weights`; `dropout` is for training only."""
    plan = ccm_plan(kv_len, image_len, k.shape[3], cf, min_seq_len, weights.image_k is not None, keep_last)
    new_k = _compressed_groups(k, plan, cf, weights.text_k, weights.image_k, dropout)
    new_v = _compressed_groups(v, plan, cf, weights.text_v, weights.image_v, dropout)
    src = plan.src[None, :, None, :]
    k, v = compact_kv_reference(k, v, src, plan.new_len, new_k, new_v)
    return k, v, plan.new_len


@dataclasses.dataclass(frozen=True, slots=True)
class CCMBlocks:
    """Tiling knobs. block_n: output slots per step, i.e. the rows of each MLP matmul (a power of
    two >= 16 dividing S, lowered to fit). The defaults are the largest tile that compiles for
    H100 without register spills at 7B shapes (head_dim 128, cf 5, bs 64; see
    scripts/gpu_compile_check.py): block_n 32 or num_warps 4 spill there."""

    block_n: int = 16
    num_warps: int = 8
    num_stages: int = 1


def unsupported_reason(k_shape) -> str | None:
    """Why the Pallas kernel cannot take this cache shape (the dispatcher then uses the reference)."""
    max_len, head_dim = k_shape[3], k_shape[4]
    if not _compat.is_power_of_2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16"
    if _compat.largest_power_of_2_dividing(max_len, 1 << 30) < 16:
        return f"max_len {max_len} is not a multiple of 16"
    return None


def _mlp(refs, kind, token, cf: int):
    """One group MLP on a chunk: refs = w1 [K, cf, D, D], b1 [K, D], w2, b2, w3, b3 (one layer's
    MLPs of each span kind, kind 0 text, 1 image); token(t) -> [n, D] is token t of each group;
    returns [n, D] f32. Splitting w1 by token keeps every matmul a power of two wide, whatever cf
    is; loading each token only for its own matmul keeps one token tile live at a time."""
    w1, b1, w2, b2, w3, b3 = refs
    dtype = w1.dtype
    h = b1[kind].astype(jnp.float32)[None, :]
    for t in range(cf):
        h = h + _compat.dot(token(t).astype(dtype), w1[kind, t])
    h = jax.nn.relu(h).astype(dtype)
    h = jax.nn.relu(_compat.dot(h, w2[kind]) + b2[kind].astype(jnp.float32)[None, :]).astype(dtype)
    return _compat.dot(h, w3[kind]) + b3[kind].astype(jnp.float32)[None, :]


def _ccm_kernel(new_len_ref, src_ref, start_ref, is_image_ref, k_in, v_in, *refs, cf, block_n, max_len,
                num_dst, interpret):
    """One (layer, sequence, head) row. new_len_ref []; src_ref [Np]; start_ref, is_image_ref [G];
    refs = the MLP weights of k, then of v (6 refs each, see _mlp), then k_out, v_out [S, D]
    (aliased to k_in, v_in; only the outputs are read and written)."""
    del k_in, v_in
    k_ref, v_ref = refs[-2:]
    num_groups = start_ref.shape[0]

    def group_vectors(src, is_group):
        def compute():
            group = jnp.clip(src - max_len, 0, num_groups - 1)
            start = start_ref[group]
            kind = jnp.where(is_group, (is_image_ref[group] != 0).astype(jnp.int32), -1)  # 0 text, 1 image
            # Only the span kinds present in the chunk run their MLP: kinds [first, last). One
            # loop body for both kinds emits each MLP once, which keeps the kernel within H100's
            # registers (an unrolled text and image MLP per K/V spilled).
            first = jnp.min(jnp.where(is_group, kind, 1))  # 0 if the chunk holds a text group
            last = jnp.maximum(kind.max(), 0) + 1  # 2 if it holds an image group
            out = []
            for cache, mlp in zip((k_ref, v_ref), (refs[:6], refs[6:12])):
                def token(t, cache=cache):
                    return load_rows(cache, start + t, is_group, jnp.zeros((), cache.dtype))

                def run_kind(i, vec, mlp=mlp, token=token):
                    return jnp.where((kind == i)[:, None], _mlp(mlp, i, token, cf), vec)

                zeros = jnp.zeros((block_n, cache.shape[1]), jnp.float32)
                out.append(lax.fori_loop(first, last, run_kind, zeros))
            return tuple(out)

        zeros = tuple(jnp.zeros((block_n, r.shape[1]), jnp.float32) for r in (k_ref, v_ref))
        return lax.cond(is_group.astype(jnp.int32).max() > 0, compute, lambda: zeros)

    num_live = jnp.minimum(new_len_ref[()], num_dst)
    compact_rows((k_ref, v_ref), (), src_ref, num_live, block_n=block_n, max_len=max_len,
                 interpret=interpret, new_rows=group_vectors)


def ccm_compress_pallas(k, v, kv_len, image_len, weights: CCMWeights, *, cf: int, min_seq_len: int,
                        keep_last: int = 0, block_n: int = 16, interpret: bool = False):
    """One pass per (layer, sequence, head) row, in place (k, v aliased to the outputs): walking the
    output slots in ascending chunks, each chunk gathers its groups' tokens, runs the MLPs and
    writes compressed vectors and moved leftovers. Every slot's sources lie at or after it."""
    return _ccm_pallas(k, v, kv_len, image_len, weights, cf, min_seq_len, keep_last, CCMBlocks(block_n), interpret)


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9))
def _ccm_pallas(k, v, kv_len, image_len, weights, cf, min_seq_len, keep_last, blocks: CCMBlocks, interpret):
    num_layers, batch, num_heads, max_len, head_dim = k.shape
    if v.shape != k.shape or kv_len.shape != (batch,) or image_len.shape != (batch,):
        raise ValueError(f"ccm_compress: k {k.shape}, v {v.shape}, kv_len {kv_len.shape}, "
                         f"image_len {image_len.shape} do not fit [L, B, H, S, D] / [B]")
    if weights.text_k.w1.shape != (num_layers, cf * head_dim, head_dim):
        raise ValueError(f"ccm_compress: w1 {weights.text_k.w1.shape} does not fit cf={cf}, D={head_dim}")
    reason = unsupported_reason(k.shape)
    if reason:
        raise ValueError(f"ccm_compress_pallas: {reason}; use ccm_compress (falls back)")
    _compat.quiet_triton_deprecation()
    has_image = weights.image_k is not None
    plan = ccm_plan(kv_len, image_len, max_len, cf, min_seq_len, has_image, keep_last)
    block_n = _compat.largest_power_of_2_dividing(max_len, max(blocks.block_n, 16))
    num_dst = plan.src.shape[1]
    padded = pl.cdiv(num_dst, block_n) * block_n  # <= S because block_n divides S
    src = jnp.pad(plan.src, ((0, 0), (0, padded - num_dst)))
    num_groups = plan.group_start.shape[1]

    row = pl.BlockSpec((None, None, None, max_len, head_dim), lambda l, b, h: (l, b, h, 0, 0))
    per_seq = lambda n: pl.BlockSpec((None, n), lambda l, b, h: (b, 0))  # noqa: E731
    weight_args, weight_specs = [], []
    by_kind = ([weights.text_k, weights.image_k], [weights.text_v, weights.image_v]) if has_image else \
        ([weights.text_k], [weights.text_v])
    for kinds in by_kind:
        # Each weight stacked over span kinds: [K, L, ...] (a copy of the MLPs, small beside the cache).
        mlp = GroupMLP(*(jnp.stack(ws) for ws in zip(*kinds)))
        w1 = mlp.w1.reshape(len(kinds), num_layers, cf, head_dim, head_dim)  # row t*D+d = token t, feature d
        for w in (w1, mlp.b1, mlp.w2, mlp.b2, mlp.w3, mlp.b3):
            weight_args.append(w)
            weight_specs.append(pl.BlockSpec((len(kinds), None, *w.shape[2:]),
                                             lambda l, b, h, n=w.ndim - 2: (0, l) + (0,) * n))
    kernel = functools.partial(_ccm_kernel, cf=cf, block_n=block_n, max_len=max_len, num_dst=num_dst,
                               interpret=interpret)
    k, v = pl.pallas_call(
        kernel,
        grid=(num_layers, batch, num_heads),
        in_specs=[pl.BlockSpec((None,), lambda l, b, h: (b,)), per_seq(padded), per_seq(num_groups),
                  per_seq(num_groups), row, row, *weight_specs],
        out_specs=[row, row],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        input_output_aliases={4: 0, 5: 1},
        compiler_params=_compat.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="kvjax_ccm_compress",
    )(plan.new_len, src, plan.group_start, plan.group_is_image.astype(jnp.int32), k, v, *weight_args)
    return k, v, plan.new_len


def ccm_compress(k, v, kv_len, image_len, weights: CCMWeights, *, cf: int, min_seq_len: int, keep_last: int = 0,
                 mode: str | None = None):
    """Dispatcher (inference: no dropout): Pallas on GPU, the reference on CPU."""
    mode = choose_mode("ccm_compress", mode, unsupported_reason(k.shape))
    statics = dict(cf=cf, min_seq_len=min_seq_len, keep_last=keep_last)
    if mode == "reference":
        return ccm_compress_reference(k, v, kv_len, image_len, weights, **statics)
    return ccm_compress_pallas(k, v, kv_len, image_len, weights, **statics, interpret=mode == "interpret")
