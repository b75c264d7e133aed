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
import numpy as np
from flax import nnx

from kvjax.cache import KVCache
from kvjax.errors import KVJaxError
from kvjax.presses.base import PROTECTED, Press, PressInputs, ScorerPress, slot_index
from kvjax.quantization import is_quantized
from pallas_kernels.compact_kv import compact_kv

ROPE_POSITIONS = ("original", "compressed")


def _traced(press: Press) -> Press:
    """The press the jits see: scores never depend on compression_ratio (budgets travel as n_kept),
    so every ratio shares one compile."""
    return dataclasses.replace(press, compression_ratio=0.0) if isinstance(press, ScorerPress) else press


def kept_mask(press: Press, inputs: PressInputs, n_kept, protect_first) -> jax.Array:
    """bool [L, B, Hkv, S]: the top n_kept[l, b] valid slots of every row (traceable).

    n_kept int32 [L, B]; protect_first int32 [B]: leading slots always kept (e.g. the image).
    Ties go to the lower slot (kvpress leaves tie order to torch.topk)."""
    scores = press.score(inputs).astype(jnp.float32)
    slots = slot_index(inputs)
    scores = jnp.where((slots[None, :] < protect_first[:, None])[None, :, None], PROTECTED, scores)
    # Padding gets the lowest score; the lowest finite value keeps the argsort NaN-free.
    valid = (slots[None, :] < inputs.kv_len[:, None])[None, :, None]
    scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
    order = jnp.argsort(-scores, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # inverse permutation: each slot's place in the ranking
    return rank < n_kept[:, :, None, None]


def apply_press(cache: KVCache, press: Press, n_kept, protect_first, observations=None, *,
                rope_positions: str = "original", mode: str | None = None) -> KVCache:
    """Traceable press step (use inside your own jit). n_kept int32 [L, B] must be equal across layers."""
    inputs = PressInputs(cache.k, cache.v, cache.kv_len, cache.positions, observations)
    kept = kept_mask(press, inputs, n_kept, protect_first)
    src = jnp.argsort(~kept, axis=-1, stable=True).astype(jnp.int32)  # kept slots first, ascending
    new_len = n_kept[0].astype(jnp.int32)
    k, v = compact_kv(cache.k, cache.v, src, new_len, mode=mode)
    positions = cache.positions if rope_positions == "original" else new_len
    return cache.replace(k=k, v=v, kv_len=new_len, positions=positions)


@functools.partial(jax.jit, static_argnums=(1, 5, 6), donate_argnums=(0,))
def _compress(cache, press, n_kept, protect_first, observations, rope_positions, mode):
    return apply_press(cache, press, n_kept, protect_first, observations, rope_positions=rope_positions, mode=mode)


_kept_mask = jax.jit(kept_mask, static_argnums=(0,))


def plan(cache: KVCache, press: Press, observations=None, image_len=None):
    """Host side of a press call: n_kept [L, B] by the press's Python rule, protect_first [B]."""
    if not isinstance(press, Press):
        raise KVJaxError(f"expected a press, got {type(press).__name__}")
    if is_quantized(cache):
        raise KVJaxError("presses score and compact a dense cache: apply the press first, then quantize")
    if press.uses_prefill and observations is None:
        raise KVJaxError(f"{type(press).__name__} reads queries/attention from the prefill: run "
                         "kvjax.presses.prefill(model, cache, tokens, press=...) and pass its observations=")
    kv_len = np.asarray(cache.kv_len)
    for n in kv_len:
        if n > 0:
            press.check(int(n))
    n_kept = np.array([[press.num_kept(int(n), layer, cache.num_layers) if n > 0 else 0 for n in kv_len]
                       for layer in range(cache.num_layers)], np.int32)
    protect_first = np.zeros(cache.batch, np.int32) if image_len is None else np.asarray(image_len, np.int32)
    if protect_first.shape != (cache.batch,) or (protect_first < 0).any():
        raise KVJaxError(f"image_len must be {cache.batch} non-negative integers, got {protect_first}")
    return jnp.asarray(n_kept), jnp.asarray(protect_first)


def compress_with_press(cache: KVCache, press: Press, image_len=None, *, observations=None,
                        protect_image: bool = False, rope_positions: str | None = None,
                        mode: str | None = None) -> KVCache:
    """The press step: jitted, cache donated; kv_len shrinks to n_kept, positions stay ('original').

    protect_image=True always keeps each row's first image_len slots (they still count in n)."""
    rope_positions = rope_positions or "original"
    if rope_positions not in ROPE_POSITIONS:
        raise KVJaxError(f"rope_positions must be one of {', '.join(ROPE_POSITIONS)}; got {rope_positions!r}")
    n_kept, protect_first = plan(cache, press, observations, image_len)
    if not protect_image:
        protect_first = jnp.zeros_like(protect_first)
    if (np.asarray(n_kept) != np.asarray(n_kept[0])).any():
        raise KVJaxError(
            f"{type(press).__name__} keeps a different number of tokens per layer {np.asarray(n_kept)[:, 0].tolist()}; "
            "the dense KVCache has one kv_len per sequence, so it cannot hold per-layer budgets. "
            "Use kvjax.presses.kept_tokens to inspect them, or a press with one budget for all layers")
    return _compress(cache, _traced(press), n_kept, protect_first, observations, rope_positions, mode)


def kept_tokens(cache: KVCache, press: Press, observations=None, image_len=None) -> np.ndarray:
    """bool [L, B, Hkv, S] host array: which slots the press keeps (per-layer budgets allowed)."""
    n_kept, protect_first = plan(cache, press, observations, image_len)
    inputs = PressInputs(cache.k, cache.v, cache.kv_len, cache.positions, observations)
    return np.asarray(_kept_mask(_traced(press), inputs, n_kept, protect_first))


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _prefill(graphdef, state, cache, tokens, lengths, embeds, press):
    # A fresh prefill (checked by the caller): token t sits in slot t at position t.
    model = nnx.merge(graphdef, state)
    offsets = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    write_slots = jnp.where(offsets < lengths[:, None], offsets, cache.max_len)  # max_len = dropped
    observed = []

    def tap(layer, attn, h):
        observed.append(press.observe(attn, h, lengths))

    x = model.embed(tokens) if embeds is None else embeds.astype(cache.k.dtype)
    hidden, k, v = model(x, offsets, cache.k, cache.v, write_slots, offsets + 1,
                         tap if press.uses_prefill else None)
    cache = cache.replace(k=k, v=v, kv_len=lengths, positions=lengths)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    logits = model.logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])
    observations = jax.tree.map(lambda *xs: jnp.stack(xs), *observed) if observed else None
    return logits, cache, observations


def prefill(model, cache: KVCache, tokens, lengths=None, embeds=None, *, press: Press):
    """`kvjax.prefill` into an empty cache that also records, per layer, what `press` reads from the
    prefill (window queries, query statistics, attention sums; nothing for key-only presses).

    Returns (logits [B, V], cache, observations); pass observations= to `kvjax.compress`."""
    from kvjax.steps import _prepare, split  # one validation for all prefills

    parts = split(model)
    tokens, lengths = _prepare(cache, tokens, lengths, embeds)
    if np.asarray(cache.kv_len).any():
        raise KVJaxError("kvjax.presses.prefill needs an empty cache (presses score a fresh prompt, as kvpress does)")
    return _prefill(parts.graphdef, parts.state, cache, tokens, lengths, embeds, _traced(press))


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
