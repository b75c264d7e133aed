"""The model runner: the only place that builds device arrays and calls the jitted paged steps.

Both steps read the page pool in place and write new K/V through the batch's page table (see
`pallas_kernels.paged_attention`). Shapes are bucketed (batch rows, table width, prompt length:
powers of two), so a run compiles a small known set of programs however batches come and go.
Each step samples on the device and syncs with the host once, for the sampled tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.paged_cache import PageAllocator, PagedKVCache, batch_view, commit
from kvjax.sampling import Sampling, sample
from kvjax.steps import SplitModel, forward_hidden


def bucket(n: int, limit: int | None = None, smallest: int = 1) -> int:
    """The smallest power of two >= max(n, smallest), capped at limit (when n fits under it)."""
    size = max(smallest, 1 << max(int(n) - 1, 0).bit_length())
    return min(size, limit) if limit is not None and n <= limit else size


@functools.partial(jax.jit, static_argnums=(0, 8), donate_argnums=(2,))
def _prefill(graphdef, state, cache, rows, table, tokens, lengths, rng, sampling):
    batch = batch_view(cache, rows, table, fresh=True)
    hidden, batch = forward_hidden(graphdef, state, batch, tokens, lengths)
    last = jnp.maximum(lengths - 1, 0)[:, None, None]
    logits = nnx.merge(graphdef, state).logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])
    return sample(logits, rng, sampling), commit(cache, rows, batch)


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

    def prefill(self, slots, prompts: list[list[int]], sampling: Sampling, max_batch: int) -> list[int]:
        """Write each prompt into its slot's pages (the slots own them); the first sampled tokens."""
        max_len = max(len(p) for p in prompts)
        rows, table, batch = self._rows_and_table(slots, max_len, max_batch)
        tokens = np.zeros((batch, bucket(max_len, None, 16)), np.int32)
        lengths = np.zeros(batch, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
        out, self.cache = _prefill(self.parts.graphdef, self.parts.state, self.cache, rows, table, tokens,
                                   lengths, self._next_rng(), sampling)
        return np.asarray(out)[:len(slots)].tolist()

    def decode(self, slots, tokens: list[int], kv_lens: list[int], sampling: Sampling, max_batch: int) -> list[int]:
        """Feed one token per slot (each slot owns a page for slot kv_len); the next sampled tokens."""
        rows, table, batch = self._rows_and_table(slots, max(kv_lens) + 1, max_batch)
        feed = np.zeros(batch, np.int32)
        feed[:len(slots)] = tokens
        active = np.arange(batch) < len(slots)
        out, self.cache = _decode(self.parts.graphdef, self.parts.state, self.cache, rows, table, feed, active,
                                  self._next_rng(), sampling)
        return np.asarray(out)[:len(slots)].tolist()
