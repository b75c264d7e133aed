"""Jitted steps over the dense KV cache: prefill, decode_step, generate (and stream for CLIs).
Compression steps are in `kvjax.compression` (`compress`, `prefill_and_compress`).

Every step is a pure function of (graphdef, state, cache, inputs): the model is split once
(`split`), the graphdef is static, and the cache is donated so XLA updates it in place. Do not
use a cache after passing it to a step; use the one the step returns.

Prefill appends a right-padded chunk to whatever the cache holds: token t of row b is written at
slot kv_len[b] + t with RoPE position positions[b] + t, and reads slots [0, kv_len[b] + t].
Decode is the same computation with one token per row, so it is correct when positions differ
from kv_len (after compression).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kvjax import parallel
from kvjax.cache import KVCache
from kvjax.config import ModelConfig
from kvjax.errors import KVJaxError
from kvjax.sampling import GREEDY, Sampling, sample


class SplitModel(NamedTuple):
    """A model split once for the jit boundary: static graphdef + state pytree, and the
    tensor-parallel mesh its weights live on (None: one device; `kvjax.parallel`)."""

    graphdef: Any
    state: Any
    cfg: ModelConfig
    mesh: Any = None


def split(model) -> SplitModel:
    """Split an NNX model once; pass the result to the steps to skip per-call graph traversal."""
    if isinstance(model, SplitModel):
        return model
    graphdef, state = nnx.split(model)
    return SplitModel(graphdef, state, model.cfg, parallel.mesh_of(state))


def on_mesh(parts: SplitModel, cache):
    """(cache placed on the model's mesh, the context to call a jitted step in): a cache created on
    one device follows a tensor-parallel model; on one device both are no-ops."""
    return parallel.shard_cache(cache, parts.mesh), parallel.tracing_under(parts.mesh)


def forward_hidden(graphdef, state, cache: KVCache, tokens, lengths, embeds=None, tap=None):
    """Traceable core of prefill (use inside your own jit/grad, e.g. training): tokens int32 [B, T]
    (right-padded), lengths int32 [B] -> (hidden [B, T, H] after the final norm, cache with the
    chunk appended). Logits: `nnx.merge(graphdef, state).logits(hidden)`.
    tap(layer, self_attn, h): called with each layer's attention input at trace time (presses)."""
    model = nnx.merge(graphdef, state)
    offsets = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    layer_kv_len = getattr(cache, "layer_kv_len", None)  # the paged batch view has none
    base = cache.kv_len if layer_kv_len is None else layer_kv_len  # [B] or [L, B] (per-layer budgets)
    slots = base[..., None] + offsets  # [B, T] or [L, B, T]
    write_slots = jnp.where(offsets < lengths[:, None], slots, cache.max_len)  # max_len = dropped
    positions = cache.positions[:, None] + offsets
    x = model.embed(tokens) if embeds is None else embeds.astype(cache.k.dtype)
    hidden, k, v = model(x, positions, cache.k, cache.v, write_slots, slots + 1, tap)
    changes = dict(k=k, v=v, kv_len=cache.kv_len + lengths, positions=cache.positions + lengths)
    if layer_kv_len is not None:
        changes["layer_kv_len"] = layer_kv_len + lengths
    return hidden, cache.replace(**changes)


def last_logits(graphdef, state, hidden, lengths) -> jax.Array:
    """hidden [B, T, H], lengths int32 [B] -> float32 logits [B, V] at each row's last real token."""
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    return nnx.merge(graphdef, state).logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])


def _forward(graphdef, state, cache: KVCache, tokens, lengths, embeds, all_logits: bool):
    """tokens int32 [B, T] (right-padded), lengths int32 [B] -> logits, cache with the chunk appended."""
    hidden, cache = forward_hidden(graphdef, state, cache, tokens, lengths, embeds)
    if all_logits:
        return nnx.merge(graphdef, state).logits(hidden), cache  # [B, T, V]
    return last_logits(graphdef, state, hidden, lengths), cache  # [B, V]


@functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=(2,))
def _prefill(graphdef, state, cache, tokens, lengths, embeds, all_logits):
    return _forward(graphdef, state, cache, tokens, lengths, embeds, all_logits)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(graphdef, state, cache, tokens, active):
    # A full row cannot take another token: it stops advancing instead of overwriting.
    lengths = (active & (cache.kv_len < cache.max_len)).astype(jnp.int32)
    return _forward(graphdef, state, cache, tokens[:, None], lengths, None, False)


def _as_int32(x):
    """Host inputs are cast by numpy: a device-side cast would compile once per input dtype."""
    return x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)


def prepare_prompt(cache: KVCache, tokens, lengths, embeds) -> tuple[jax.Array, jax.Array]:
    """Validate a prompt chunk on the host (prefill is rare enough to sync here)."""
    tokens = _as_int32(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[0] != cache.batch:
        raise KVJaxError(f"tokens must be [batch={cache.batch}, T], got shape {tuple(tokens.shape)}")
    num_new = tokens.shape[1]
    lengths = np.full(cache.batch, num_new, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if lengths.shape != (cache.batch,) or lengths.min() < 0 or lengths.max() > num_new:
        raise KVJaxError(f"lengths must be [batch={cache.batch}] with values in [0, {num_new}], got {lengths}")
    needed = np.asarray(cache.kv_len) + lengths
    if needed.max() > cache.max_len:
        row = int(needed.argmax())
        raise KVJaxError(
            f"prompt does not fit the KV cache: sequence {row} needs {int(needed[row])} slots but the "
            f"cache holds {cache.max_len}; create a larger cache (chat: raise --max-tokens) or shorten the prompt")
    if embeds is not None and tuple(embeds.shape[:2]) != tuple(tokens.shape):
        raise KVJaxError(f"embeds must be [B, T, H] matching tokens {tuple(tokens.shape)}, got {embeds.shape}")
    return jnp.asarray(tokens), jnp.asarray(lengths)


def prefill(model, cache: KVCache, tokens, lengths=None, embeds=None, *, all_logits: bool = False):
    """Append a right-padded prompt chunk to the cache.

    tokens int32 [B, T]; lengths int32 [B] real tokens per row (default T); embeds [B, T, H]
    replaces the token embeddings (VLM prompts). Returns (logits, cache): logits float32 [B, V]
    at each row's last real token, or [B, T, V] with all_logits=True.
    """
    parts = split(model)
    tokens, lengths = prepare_prompt(cache, tokens, lengths, embeds)
    cache, context = on_mesh(parts, cache)
    with context:
        return _prefill(parts.graphdef, parts.state, cache, tokens, lengths, embeds, all_logits)


def decode_step(model, cache: KVCache, tokens, active=None):
    """One token per row: tokens int32 [B] -> (logits float32 [B, V], cache).

    Rows with active=False (bool [B]) are computed but write nothing and do not advance.
    """
    parts = split(model)
    tokens = jnp.asarray(_as_int32(tokens))
    if active is None:
        active = np.ones(tokens.shape, bool)
    elif not isinstance(active, jax.Array):  # device masks stay on the device (no sync)
        active = np.asarray(active, bool)
    cache, context = on_mesh(parts, cache)
    with context:
        return _decode(parts.graphdef, parts.state, cache, tokens, active)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerationState:
    cache: KVCache
    logits: jax.Array  # float32 [B, V], for the token to sample next
    tokens: jax.Array  # int32 [B, N], generated so far (pad_id after a row is done)
    num_generated: jax.Array  # int32 [B]
    done: jax.Array  # bool [B]
    step: jax.Array  # int32 []
    rng: jax.Array


class Generation(NamedTuple):
    tokens: np.ndarray  # int32 [B, N]; row b is valid up to num_generated[b]
    num_generated: np.ndarray  # int32 [B]
    cache: KVCache


def _advance(graphdef, state, gen: GenerationState, max_new, sampling, eos_ids, pad_id):
    """Sample one token per unfinished row, record it, and feed it to the model if the row goes on."""
    token = sample(gen.logits, jax.random.fold_in(gen.rng, gen.step), sampling)
    token = jnp.where(gen.done, pad_id, token)
    num_generated = gen.num_generated + (~gen.done).astype(jnp.int32)
    is_eos = jnp.isin(token, jnp.asarray(eos_ids, jnp.int32)) if eos_ids else jnp.zeros_like(gen.done)
    is_full = gen.cache.kv_len >= gen.cache.max_len
    done = gen.done | is_eos | (num_generated >= max_new) | is_full
    logits, cache = _forward(graphdef, state, gen.cache, token[:, None], (~done).astype(jnp.int32), None, False)
    return GenerationState(cache=cache, logits=logits, tokens=gen.tokens.at[:, gen.step].set(token),
                           num_generated=num_generated, done=done, step=gen.step + 1, rng=gen.rng)


def _start(cache, logits, rng, num_new) -> GenerationState:
    batch = logits.shape[0]
    return GenerationState(cache=cache, logits=logits, tokens=jnp.zeros((batch, num_new), jnp.int32),
                           num_generated=jnp.zeros(batch, jnp.int32), done=jnp.zeros(batch, bool),
                           step=jnp.zeros((), jnp.int32), rng=rng)


def _decode_loop(graphdef, state, cache, logits, rng, max_new, num_new, sampling, eos_ids, pad_id):
    gen = jax.lax.while_loop(
        lambda g: (g.step < num_new) & ~jnp.all(g.done),
        lambda g: _advance(graphdef, state, g, max_new, sampling, eos_ids, pad_id),
        _start(cache, logits, rng, num_new))
    return gen.tokens, gen.num_generated, gen.cache


@functools.partial(jax.jit, static_argnums=(0, 8, 9, 10, 11), donate_argnums=(2,))
def _generate(graphdef, state, cache, tokens, lengths, embeds, rng, max_new,
              num_new, sampling, eos_ids, pad_id):
    logits, cache = _forward(graphdef, state, cache, tokens, lengths, embeds, False)
    return _decode_loop(graphdef, state, cache, logits, rng, max_new, num_new, sampling, eos_ids, pad_id)


_generate_from = jax.jit(_decode_loop, static_argnums=(0, 6, 7, 8, 9), donate_argnums=(2,))


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6), donate_argnums=(2,))
def _stream_step(graphdef, state, gen, max_new, sampling, eos_ids, pad_id):
    return _advance(graphdef, state, gen, max_new, sampling, eos_ids, pad_id)


def _generation_args(parts: SplitModel, max_new_tokens, sampling, eos_ids, seed, batch):
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise KVJaxError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(sampling, Sampling):
        raise KVJaxError(f"sampling must be a kvjax.Sampling, got {type(sampling).__name__}")
    eos = parts.cfg.eos_token_ids if eos_ids is None else tuple(int(e) for e in eos_ids)
    pad_id = parts.cfg.pad_token_id if parts.cfg.pad_token_id is not None else (eos[0] if eos else 0)
    max_new = jnp.full((batch,), max_new_tokens, jnp.int32)
    return eos, int(pad_id), max_new, jax.random.key(seed)


def generate(model, cache: KVCache, tokens, lengths=None, embeds=None, *, max_new_tokens: int,
             sampling: Sampling = GREEDY, eos_ids=None, seed: int = 0) -> Generation:
    """Prefill a prompt batch and decode up to max_new_tokens per row in one compiled loop.

    A row stops at one of eos_ids (default: the config's), after max_new_tokens, or when its
    cache is full. Compiled once per (batch, prompt length, max_new_tokens, sampling).
    The returned cache holds each prompt and its generated tokens except the last one (which
    was sampled but never fed back), so continuing a conversation starts by feeding that token.
    """
    parts = split(model)
    tokens, lengths = prepare_prompt(cache, tokens, lengths, embeds)
    eos, pad_id, max_new, rng = _generation_args(parts, max_new_tokens, sampling, eos_ids, seed, cache.batch)
    cache, context = on_mesh(parts, cache)
    with context:
        out, num, cache = _generate(parts.graphdef, parts.state, cache, tokens, lengths, embeds, rng, max_new,
                                    max_new_tokens, sampling, eos, pad_id)
    return Generation(np.asarray(out), np.asarray(num), cache)


def generate_from(model, cache: KVCache, logits, *, max_new_tokens: int, sampling: Sampling = GREEDY,
                  eos_ids=None, seed: int = 0) -> Generation:
    """Like `generate`, but starting from a cache that already holds the prompts (e.g. prefilled,
    then compressed); logits float32 [B, V] are the prefill's, for the first token to sample."""
    parts = split(model)
    eos, pad_id, max_new, rng = _generation_args(parts, max_new_tokens, sampling, eos_ids, seed, cache.batch)
    cache, context = on_mesh(parts, cache)
    with context:
        out, num, cache = _generate_from(parts.graphdef, parts.state, cache, logits, rng, max_new,
                                         max_new_tokens, sampling, eos, pad_id)
    return Generation(np.asarray(out), np.asarray(num), cache)


def stream_from(model, cache: KVCache, logits, *, max_new_tokens: int, sampling: Sampling = GREEDY,
                eos_ids=None, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Decode from a cache that holds the prompts (prefilled, maybe compressed), yielding
    (token [B], is_new [B]) per step so a caller can print as it goes; logits float32 [B, V] are
    the prefill's. Same sampling stream as `generate_from` for the same seed. The final cache is
    the generator's return value."""
    parts = split(model)
    eos, pad_id, max_new, rng = _generation_args(parts, max_new_tokens, sampling, eos_ids, seed, cache.batch)
    cache, _ = on_mesh(parts, cache)
    gen = _start(cache, logits, rng, max_new_tokens)
    done = np.zeros(cache.batch, bool)
    for step in range(max_new_tokens):
        if done.all():
            break
        with parallel.tracing_under(parts.mesh):  # per call: the caller runs between yields
            gen = _stream_step(parts.graphdef, parts.state, gen, max_new, sampling, eos, pad_id)
        token, now_done = jax.device_get((gen.tokens[:, step], gen.done))  # one sync per token
        yield token, ~done
        done = now_done
    return gen.cache


def stream(model, cache: KVCache, tokens, lengths=None, embeds=None, *, max_new_tokens: int,
           sampling: Sampling = GREEDY, eos_ids=None, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`prefill` then `stream_from`: like `generate`, but yields (token [B], is_new [B]) per step."""
    parts = split(model)
    logits, cache = prefill(parts, cache, tokens, lengths, embeds)
    return (yield from stream_from(parts, cache, logits, max_new_tokens=max_new_tokens, sampling=sampling,
                                   eos_ids=eos_ids, seed=seed))
