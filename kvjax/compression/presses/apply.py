"""The press mechanism, written once: score -> top n_kept per row -> kept slots in positional order
-> `compact_kv` -> kv_len update. Plus the forward pass that records what query presses read
(`forward_observed`, used by `kvjax.prefill_and_compress` and the engine's paged prefill).

kvpress stores kept rows in top-k order; kvjax keeps them in positional order. Attention over a
cache does not depend on slot order (keys carry their RoPE), so the kept *sets* are what match.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from kvjax import parallel
from kvjax.cache import KVCache, is_quantized
from kvjax.compression.common import check_rope_positions, next_positions, per_row
from kvjax.compression.presses.base import PROTECTED, Press, PressInputs, ScorerPress, slot_index
from kvjax.errors import KVJaxError
from kvjax.steps import forward_hidden
from pallas_kernels.compact_kv import compact_kv

def ratio_free(press: Press) -> Press:
    """The press the jits see: scores never depend on compression_ratio (budgets travel as n_kept),
    so every ratio shares one compile."""
    return dataclasses.replace(press, compression_ratio=0.0) if isinstance(press, ScorerPress) else press


def _ordered_bits(x: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (flip negatives, set the sign bit of the rest);
    -0.0 (and denormals, which XLA on CPU flushes) become 0.0 first, as they compare equal."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x).astype(jnp.float32), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _top_rows(scores: jax.Array, n_kept: jax.Array) -> jax.Array:
    """bool mask of the n_kept highest scores of every row (no NaN), ties to the lower slot.

    A radix select finds each row's n_kept-th largest score: 32 halvings of the uint32 key range,
    each one count per row, with n_kept dynamic (one compile for every ratio). On CPU it is ~10x
    faster than sorting the row; a cumsum then breaks ties at the threshold by slot."""
    keys = _ordered_bits(scores)

    def halve(_, bounds):  # invariant: count(keys >= lo) >= n_kept, and the answer is <= hi
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = (keys >= mid).sum(axis=-1, keepdims=True) >= n_kept
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    start = jnp.zeros(scores.shape[:-1] + (1,), jnp.uint32)
    threshold, _ = lax.fori_loop(0, 32, halve, (start, start + jnp.uint32(0xFFFFFFFF)))
    above, tied = keys > threshold, keys == threshold
    room = n_kept - above.sum(axis=-1, keepdims=True)
    return (above | (tied & (jnp.cumsum(tied, axis=-1) <= room))) & (n_kept > 0)


def kept_mask(press: Press, inputs: PressInputs, n_kept, protect_first, protect_last=None) -> jax.Array:
    """bool [L, B, Hkv, S]: the top n_kept[l, b] valid slots of every row (traceable).

    n_kept int32 [L, B]; protect_first / protect_last int32 [B]: leading (image) / trailing
    (question) slots always kept, within n_kept. Ties go to the lower slot (kvpress leaves tie
    order to torch.topk)."""
    scores = press.score(inputs).astype(jnp.float32)
    slots = slot_index(inputs)[None, :]
    kv_len = inputs.kv_len[:, None]
    lowest = jnp.finfo(jnp.float32).min  # padding; also NaN scores, so every row keeps exactly n_kept
    scores = jnp.where((slots < protect_first[:, None])[None, :, None], PROTECTED,
                       jnp.nan_to_num(scores, nan=lowest))
    if protect_last is not None:  # the question outranks even a protected image: it is outside the budget
        scores = jnp.where((slots >= kv_len - protect_last[:, None])[None, :, None], jnp.inf, scores)
    scores = jnp.where((slots < kv_len)[None, :, None], scores, lowest)
    return _top_rows(scores, n_kept[:, :, None, None])


def kept_first(kept: jax.Array, n_kept: jax.Array) -> jax.Array:
    """int32 [L, B, Hkv, S] compaction plan: slot j < n_kept[l, b] takes the j-th kept slot (in
    positional order); slots past n_kept (per-layer budgets) stay where they are."""
    slots = jnp.arange(kept.shape[-1], dtype=jnp.int32)
    dest = jnp.where(kept, jnp.cumsum(kept, axis=-1, dtype=jnp.int32) - 1, kept.shape[-1])  # S = dropped

    def row(d):
        return slots.at[d].set(slots, mode="drop")

    return jax.vmap(jax.vmap(jax.vmap(row)))(dest)


def apply_press(cache: KVCache, press: Press, n_kept, protect_first, observations=None, *,
                protect_last=None, rope_positions: str = "original", mode: str | None = None,
                per_layer: bool = False) -> KVCache:
    """Traceable press step (use inside your own jit). n_kept int32 [L, B]; with per_layer=False it
    must be equal across layers, else the cache gets `layer_kv_len` = n_kept."""
    inputs = PressInputs(cache.k, cache.v, cache.kv_len, cache.positions, observations)
    kept = kept_mask(press, inputs, n_kept, protect_first, protect_last)
    n_kept = n_kept.astype(jnp.int32)
    new_len = n_kept.max(axis=0) if per_layer else n_kept[0]
    heads = parallel.LAYER_HEADS  # per shard of the KV heads when tensor-parallel: slots move within a head
    k, v = parallel.per_shard(functools.partial(compact_kv, mode=mode), (cache.k, cache.v, kept_first(kept, n_kept),
                              new_len), (heads, heads, heads, parallel.REPLICATED), out_specs=(heads, heads))
    return cache.replace(k=k, v=v, kv_len=new_len, positions=next_positions(cache, new_len, rope_positions),
                         layer_kv_len=n_kept if per_layer else None)


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8), donate_argnums=(0,))
def _compress(cache, press, n_kept, protect_first, protect_last, observations, rope_positions, mode, per_layer):
    return apply_press(cache, press, n_kept, protect_first, observations, protect_last=protect_last,
                       rope_positions=rope_positions, mode=mode, per_layer=per_layer)


_kept_mask = jax.jit(kept_mask, static_argnums=(0,))


def plan(cache: KVCache, press: Press, observations=None, image_len=None, protect_last=None):
    """Host side of a press call: n_kept [L, B] by the press's Python rule, protect_first [B],
    protect_last [B]. Protected trailing tokens (the question) are kept on top of the budget, which
    applies to the rest (the context), as kvpress compresses the context only."""
    if not isinstance(press, Press):
        raise KVJaxError(f"expected a press, got {type(press).__name__}")
    if is_quantized(cache):
        raise KVJaxError("presses score and compact a dense cache: apply the press first, then quantize")
    if cache.layer_kv_len is not None:
        raise KVJaxError("this cache was already pressed with per-layer budgets; press a fresh prefill instead")
    if press.uses_prefill and observations is None:
        raise KVJaxError(f"{type(press).__name__} reads queries/attention from the prefill: compress with "
                         "kvjax.prefill_and_compress(model, cache, tokens, method=press), which records them (or "
                         "pass the observations= of kvjax.compression.prefill_observing)")
    kv_len = np.asarray(cache.kv_len)
    protect_first = per_row("image_len", image_len, cache.batch)
    protect_last = per_row("protect_last", protect_last, cache.batch)
    if (protect_last > kv_len).any():
        raise KVJaxError(f"protect_last {protect_last.tolist()} exceeds the cached lengths {kv_len.tolist()}")
    context = kv_len - protect_last
    for n in context:
        if n > 0:
            press.check(int(n))
    n_kept = np.array([[press.num_kept(int(n), layer, cache.num_layers) if n > 0 else 0 for n in context]
                       for layer in range(cache.num_layers)], np.int32) + protect_last
    return jnp.asarray(n_kept), jnp.asarray(protect_first), jnp.asarray(protect_last)


def compress_with_press(cache: KVCache, press: Press, image_len=None, *, observations=None,
                        protect_image: bool = False, protect_last=None, rope_positions: str | None = None,
                        mode: str | None = None) -> KVCache:
    """The press step: jitted, cache donated; kv_len shrinks to n_kept, positions stay ('original').

    protect_image=True always keeps each row's first image_len slots (they still count in n).
    protect_last (int or [B]): each row's last tokens, e.g. the question, are kept outside the
    budget. Presses with per-layer budgets (PyramidKV) give the cache a `layer_kv_len`."""
    check_rope_positions(rope_positions)
    rope_positions = rope_positions or "original"
    n_kept, protect_first, protect_last = plan(cache, press, observations, image_len, protect_last)
    if not protect_image:
        protect_first = jnp.zeros_like(protect_first)
    per_layer = bool((np.asarray(n_kept) != np.asarray(n_kept[0])).any())
    return _compress(cache, ratio_free(press), n_kept, protect_first, protect_last, observations, rope_positions,
                     mode, per_layer)


def kept_tokens(cache: KVCache, press: Press, observations=None, image_len=None, protect_last=None) -> np.ndarray:
    """bool [L, B, Hkv, S] host array: which slots the press keeps (per-layer budgets allowed)."""
    n_kept, protect_first, protect_last = plan(cache, press, observations, image_len, protect_last)
    inputs = PressInputs(cache.k, cache.v, cache.kv_len, cache.positions, observations)
    return np.asarray(_kept_mask(ratio_free(press), inputs, n_kept, protect_first, protect_last))


def forward_observed(graphdef, state, cache: KVCache, tokens, lengths, embeds=None, *, press: Press | None):
    """Traceable `kvjax.steps.forward_hidden` of a fresh prompt that also records what `press`
    reads (per layer, stacked on axis 0; None for key/value-only presses or press=None). Returns
    (hidden, cache, observations); dense caches and the engine's paged batches alike."""
    observed = []

    def tap(layer, attn, h):
        observed.append(press.observe(attn, h, lengths))

    uses_prefill = press is not None and press.uses_prefill
    hidden, cache = forward_hidden(graphdef, state, cache, tokens, lengths, embeds, tap if uses_prefill else None)
    observations = jax.tree.map(lambda *xs: jnp.stack(xs), *observed) if observed else None
    return hidden, cache, observations
