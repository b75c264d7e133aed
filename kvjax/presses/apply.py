"""The press mechanism, written once: score -> top n_kept per row -> kept slots in positional order
-> `compact_kv` -> kv_len update. Plus the prefill that records what query presses need.

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
from flax import nnx

from kvjax.cache import KVCache
from kvjax.errors import KVJaxError
from kvjax.presses.base import PROTECTED, Press, PressInputs, ScorerPress, slot_index
from kvjax.quantization import is_quantized
from kvjax.steps import _prepare, forward_hidden, split
from pallas_kernels.compact_kv import compact_kv

ROPE_POSITIONS = ("original", "compressed")


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
    k, v = compact_kv(cache.k, cache.v, kept_first(kept, n_kept), new_len, mode=mode)
    positions = cache.positions if rope_positions == "original" else new_len
    return cache.replace(k=k, v=v, kv_len=new_len, positions=positions, layer_kv_len=n_kept if per_layer else None)


@functools.partial(jax.jit, static_argnums=(1, 6, 7, 8), donate_argnums=(0,))
def _compress(cache, press, n_kept, protect_first, protect_last, observations, rope_positions, mode, per_layer):
    return apply_press(cache, press, n_kept, protect_first, observations, protect_last=protect_last,
                       rope_positions=rope_positions, mode=mode, per_layer=per_layer)


_kept_mask = jax.jit(kept_mask, static_argnums=(0,))


def _per_row(name: str, values, batch: int) -> np.ndarray:
    values = np.zeros(batch, np.int32) if values is None else np.broadcast_to(np.asarray(values, np.int32), (batch,))
    if (values < 0).any():
        raise KVJaxError(f"{name} must be {batch} non-negative integers (one per sequence), got {values}")
    return values


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
        raise KVJaxError(f"{type(press).__name__} reads queries/attention from the prefill: run "
                         "kvjax.presses.prefill(model, cache, tokens, press=...) and pass its observations=")
    kv_len = np.asarray(cache.kv_len)
    protect_first = _per_row("image_len", image_len, cache.batch)
    protect_last = _per_row("protect_last", protect_last, cache.batch)
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
    rope_positions = rope_positions or "original"
    if rope_positions not in ROPE_POSITIONS:
        raise KVJaxError(f"rope_positions must be one of {', '.join(ROPE_POSITIONS)}; got {rope_positions!r}")
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


def forward_observed(graphdef, state, cache: KVCache, tokens, lengths, embeds=None, *, press: Press):
    """Traceable `kvjax.steps.forward_hidden` of a fresh prompt that also records what `press`
    reads (per layer, stacked on axis 0; None for key/value-only presses). Returns
    (hidden, cache, observations). The serving engine uses it on its paged batches."""
    observed = []

    def tap(layer, attn, h):
        observed.append(press.observe(attn, h, lengths))

    hidden, cache = forward_hidden(graphdef, state, cache, tokens, lengths, embeds,
                                   tap if press.uses_prefill else None)
    observations = jax.tree.map(lambda *xs: jnp.stack(xs), *observed) if observed else None
    return hidden, cache, observations


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _prefill(graphdef, state, cache, tokens, lengths, embeds, press):
    hidden, cache, observations = forward_observed(graphdef, state, cache, tokens, lengths, embeds, press=press)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    logits = nnx.merge(graphdef, state).logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])
    return logits, cache, observations


def prefill(model, cache: KVCache, tokens, lengths=None, embeds=None, *, press: Press):
    """`kvjax.prefill` into an empty cache that also records, per layer, what `press` reads from the
    prefill (window queries, query statistics, attention sums; nothing for key-only presses).

    Returns (logits [B, V], cache, observations); pass observations= to `kvjax.compress`."""
    parts = split(model)
    tokens, lengths = _prepare(cache, tokens, lengths, embeds)
    if np.asarray(cache.kv_len).any():
        raise KVJaxError("kvjax.presses.prefill needs an empty cache (presses score a fresh prompt, as kvpress does)")
    return _prefill(parts.graphdef, parts.state, cache, tokens, lengths, embeds, ratio_free(press))


def compress_prompt(model, cache: KVCache, tokens, lengths=None, embeds=None, *, press: Press, **options):
    """Press a cache that already holds exactly this prompt (e.g. in `kvjax.stream`'s after_prefill).

    Query presses need the prefill's observations; this re-runs the prefill into a scratch cache to
    record them (one extra prefill; `prefill` + `kvjax.compress` avoids it where you own the prefill)."""
    observations = None
    if press.uses_prefill:
        scratch = KVCache.create(cache.num_layers, cache.batch, cache.k.shape[2], cache.max_len, cache.k.shape[4],
                                 cache.k.dtype)
        _, _, observations = prefill(model, scratch, tokens, lengths, embeds, press=press)
    return compress_with_press(cache, press, observations=observations, **options)


def parse_options(pairs) -> dict:
    """['window_size=8', 'use_vnorm=false'] -> {'window_size': 8, 'use_vnorm': False} (CLI press options)."""
    options = {}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise KVJaxError(f"press option {pair!r} must look like NAME=VALUE, e.g. window_size=16")
        lowered = text.strip().lower()
        if lowered in ("true", "false"):
            options[key] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                options[key] = kind(text)
                break
            except ValueError:
                options[key] = text
    return options
