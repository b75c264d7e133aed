"""THE compression path: `compress` for a cache that holds prompts, `prefill_and_compress` for one
prefill that records what the method reads and then compresses. Chat, evaluation, training's
validation and the engine all call these.

A method is one of
  a CCM compressor (`ccm.CCMCompressor`: learned MLPs merge every cf tokens),
  a press (`presses.get_press(name, ...)`: score, keep the top n_kept, compact),
  `int8.Int8KV()` (int8 K/V, kv_len unchanged),
  a tuple of these applied in order, e.g. `(press, Int8KV())` (int8 must come last), or None.

    logits, cache = kvjax.prefill_and_compress(model, cache, tokens, lengths, method=press)
    cache = kvjax.compress(cache, compressor, image_len=prompt.image_len)
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from kvjax import parallel
from kvjax.cache import KVCache
from kvjax.compression import presses
from kvjax.compression.ccm import CCMCompressor, compress_ccm
from kvjax.compression.int8 import Int8KV, quantize_cache
from kvjax.compression.presses import Press, compress_with_press, forward_observed, ratio_free
from kvjax.errors import KVJaxError
from kvjax.steps import last_logits, on_mesh, prepare_prompt, split

METHOD_TYPES = (CCMCompressor, Press, Int8KV)


def steps_of(method) -> tuple:
    """A method value -> its steps in order (None -> none), each a CCM compressor, press or Int8KV."""
    steps = () if method is None else tuple(method) if isinstance(method, (tuple, list)) else (method,)
    for step in steps:
        if not isinstance(step, METHOD_TYPES):
            raise KVJaxError(f"unknown compression method {type(step).__name__}: use a CCM compressor, a press "
                             "(kvjax.presses.get_press), kvjax.compression.Int8KV(), or a tuple of them")
    if any(isinstance(step, Int8KV) for step in steps[:-1]):
        raise KVJaxError("int8 must be the last step of a method: presses and CCM read a dense cache")
    return steps


def observing_press(method) -> Press | None:
    """The press of `method` that reads the prefill (queries / attention), or None."""
    return next((s for s in steps_of(method) if isinstance(s, Press) and s.uses_prefill), None)


def compress(cache: KVCache, method, image_len=None, *, observations=None, protect_image: bool = False,
             protect_last=None, rope_positions: str | None = None, mode: str | None = None) -> KVCache:
    """The compress step for every method (jitted per step, cache donated): kv_len shrinks (CCM,
    presses) or K/V become int8.

    image_len int32 [B]: each row's image prefix (CCM's image MLPs; a press keeps it with
    protect_image=True). protect_last (int or [B]): trailing tokens (the question) a press keeps
    outside its budget. observations: what a query press recorded in the prefill (use
    `prefill_and_compress`, which passes them). rope_positions: 'original' | 'compressed' (default:
    the compressor's own convention; 'original' for presses)."""
    steps = steps_of(method)
    if not any(isinstance(s, Press) for s in steps) and (observations is not None or protect_image
                                                          or protect_last is not None):
        raise KVJaxError("observations, protect_image and protect_last apply to presses; this method has none")
    with parallel.tracing_under(parallel.mesh_of(cache)):  # a tensor-parallel cache compresses per shard
        for step in steps:
            if isinstance(step, Int8KV):
                cache = quantize_cache(cache)
            elif isinstance(step, Press):
                cache = compress_with_press(cache, step, image_len, observations=observations,
                                            protect_image=protect_image, protect_last=protect_last,
                                            rope_positions=rope_positions, mode=mode)
            else:
                cache = compress_ccm(cache, step, image_len, rope_positions=rope_positions, mode=mode)
    return cache


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _prefill_observing(graphdef, state, cache, tokens, lengths, embeds, press):
    hidden, cache, observations = forward_observed(graphdef, state, cache, tokens, lengths, embeds, press=press)
    return last_logits(graphdef, state, hidden, lengths), cache, observations


def prefill_observing(model, cache: KVCache, tokens, lengths=None, embeds=None, *, press: Press | None):
    """The prefill of `prefill_and_compress` alone: (logits [B, V], cache, observations), where
    observations is what `press` reads (None for key/value-only presses), e.g. for
    `presses.kept_tokens`. The cache must be empty: presses score a fresh prompt (as kvpress)."""
    parts = split(model)
    tokens, lengths = prepare_prompt(cache, tokens, lengths, embeds)
    if np.asarray(cache.kv_len).any():
        raise KVJaxError("prefill_and_compress needs an empty cache: methods compress a fresh prompt (as kvpress)")
    cache, context = on_mesh(parts, cache)
    with context:
        return _prefill_observing(parts.graphdef, parts.state, cache, tokens, lengths, embeds,
                                  None if press is None else ratio_free(press))


def prefill_and_compress(model, cache: KVCache, tokens, lengths=None, embeds=None, *, method, image_len=None,
                         protect_image: bool = False, protect_last=None, rope_positions: str | None = None,
                         mode: str | None = None):
    """ONE prefill of a prompt batch into an empty cache that records what `method` reads (window
    queries, query statistics or attention for SnapKV, TOVA, expected / observed attention;
    nothing otherwise), then `compress`. Returns (logits float32 [B, V] at each row's last token,
    compressed cache). tokens int32 [B, T] right-padded, lengths [B], embeds [B, T, H] (VLMs)."""
    logits, cache, observations = prefill_observing(model, cache, tokens, lengths, embeds,
                                                    press=observing_press(method))
    cache = compress(cache, method, image_len, observations=observations, protect_image=protect_image,
                     protect_last=protect_last, rope_positions=rope_positions, mode=mode) if method else cache
    return logits, cache


__all__ = ["compress", "prefill_and_compress", "prefill_observing", "steps_of", "observing_press", "presses", "CCMCompressor",
           "Int8KV"]
