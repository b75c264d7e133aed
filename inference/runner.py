"""The model runner: the only place that builds device arrays and calls the jitted paged steps.

Both steps read the page pool in place and write new K/V through the batch's page table (see
`pallas_kernels.paged_attention`). Shapes are bucketed (batch rows, table width, prompt length:
powers of two), so a run compiles a small known set of programs however batches come and go.
Each step samples on the device and syncs with the host once, for the sampled tokens.
A prefill for a press that reads the prefill (SnapKV, TOVA, ...) also returns the press's
observations, which stay on the device until the compress step right after it.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.paged_cache import PageAllocator, PagedKVCache, batch_view, commit
from kvjax.presses import forward_observed, ratio_free
from kvjax.sampling import Sampling, sample
from kvjax.steps import SplitModel, forward_hidden


def bucket(n: int, limit: int | None = None, smallest: int = 1) -> int:
    """The smallest power of two >= max(n, smallest), capped at limit (when n fits under it)."""
    size = max(smallest, 1 << max(int(n) - 1, 0).bit_length())
    return min(size, limit) if limit is not None and n <= limit else size


class Observations(NamedTuple):
    """What a press recorded in one prefill, for `kvjax.compress(..., observations=)`."""

    values: Any  # the press's pytree, per layer on axis 0, the prefill's padded batch on axis 1
    batch: int  # that padded batch size (the compress batch must match it)
    num_tokens: int  # the prefill's padded prompt length (e.g. observed attention spans it)


@functools.partial(jax.jit, static_argnums=(0, 9, 10), donate_argnums=(2,))
def _prefill(graphdef, state, cache, rows, table, tokens, lengths, embeds, rng, sampling, press):
    batch = batch_view(cache, rows, table, fresh=True)
    observations = None
    if press is None:
        hidden, batch = forward_hidden(graphdef, state, batch, tokens, lengths, embeds)
    else:  # the press's own tap records what it reads from the prompt
        hidden, batch, observations = forward_observed(graphdef, state, batch, tokens, lengths, embeds, press=press)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    logits = nnx.merge(graphdef, state).logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])
    return sample(logits, rng, sampling), commit(cache, rows, batch), observations


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(2,))
def _decode(graphdef, state, cache, rows, table, tokens, active, rng, sampling):
    batch = batch_view(cache, rows, table)
    hidden, batch = forward_hidden(graphdef, state, batch, tokens[:, None], active.astype(jnp.int32))
    logits = nnx.merge(graphdef, state).logits(hidden[:, 0])
    return sample(logits, rng, sampling), commit(cache, rows, batch)


class Runner:
    """Holds the split model, the page pool and the allocator; runs prefill and decode batches."""

    def __init__(self, parts: SplitModel, cache: PagedKVCache, allocator: PageAllocator, max_pages_per_seq: int,
                 seed: int = 0):
        self.parts, self.cache, self.allocator = parts, cache, allocator
        self.max_pages_per_seq = max_pages_per_seq
        self.rng = jax.random.key(seed)
        self.num_calls = 0

    def _next_rng(self):
        self.num_calls += 1
        return jax.random.fold_in(self.rng, self.num_calls)

    def _rows_and_table(self, slots, num_tokens: int, max_batch: int):
        batch = bucket(len(slots), max_batch)
        width = bucket(self.allocator.pages_for(num_tokens), self.max_pages_per_seq)
        rows = np.full(batch, self.allocator.num_slots, np.int32)  # out of range = padding row
        rows[:len(slots)] = slots
        return rows, self.allocator.table(slots, width, batch), batch

    def prefill(self, slots, prompts: list[list[int]], sampling: Sampling, max_batch: int, *, embeds=None,
                press=None) -> tuple[list[int], Observations | None]:
        """Write each prompt into its slot's pages (the slots own them). embeds: one [T, H] array per
        prompt (VLM prompts) or None; press: record what this press reads from the prefill.
        Returns the first sampled tokens and the press's observations (None without a press)."""
        max_len = max(len(p) for p in prompts)
        rows, table, batch = self._rows_and_table(slots, max_len, max_batch)
        # Capped at the slots a sequence may hold, so observations never span more than its pages.
        num_tokens = bucket(max_len, self.max_pages_per_seq * self.allocator.page_size, 16)
        tokens = np.zeros((batch, num_tokens), np.int32)
        lengths = np.zeros(batch, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
        dense_embeds = None
        if embeds is not None:  # host float32; forward_hidden casts to the model dtype
            dense_embeds = np.zeros((batch, num_tokens, embeds[0].shape[-1]), np.float32)
            for row, prompt_embeds in enumerate(embeds):
                dense_embeds[row, :len(prompt_embeds)] = np.asarray(prompt_embeds, np.float32)
        press = None if press is None else ratio_free(press)  # what it records is the same for every ratio
        out, self.cache, observed = _prefill(self.parts.graphdef, self.parts.state, self.cache, rows, table, tokens,
                                             lengths, dense_embeds, self._next_rng(), sampling, press)
        observations = None if press is None else Observations(observed, batch, num_tokens)
        return np.asarray(out)[:len(slots)].tolist(), observations

    def decode(self, slots, tokens: list[int], kv_lens: list[int], sampling: Sampling, max_batch: int) -> list[int]:
        """Feed one token per slot (each slot owns a page for slot kv_len); the next sampled tokens."""
        rows, table, batch = self._rows_and_table(slots, max(kv_lens) + 1, max_batch)
        feed = np.zeros(batch, np.int32)
        feed[:len(slots)] = tokens
        active = np.arange(batch) < len(slots)
        out, self.cache = _decode(self.parts.graphdef, self.parts.state, self.cache, rows, table, feed, active,
                                  self._next_rng(), sampling)
        return np.asarray(out)[:len(slots)].tolist()
