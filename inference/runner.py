"""The model runner: the only place that builds device arrays and calls the jitted paged steps.
It owns every phase of a scheduled batch through one `run(batch)`:

  prefill  write each prompt into its slot's pages; sequences with a compression method are then
           compressed right away, through the same path for every method (`kvjax.compress` on the
           batch's dense view): the prefill records what a query press reads (SnapKV, TOVA, ...)
           for exactly those rows, as `kvjax.prefill_and_compress` does on a dense cache;
  decode   one token per sequence, read through the page table.

Shapes are bucketed (batch rows, table width, prompt length: powers of two), so a run compiles a
small known set of programs however batches come and go. Each step samples on the device (every row with its own
request's config and seed) and syncs with the host once; pages freed by compression go back through the scheduler.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from inference.paged_cache import PageAllocator, PagedKVCache, batch_view, commit, gather_dense, scatter_dense
from kvjax import parallel
from kvjax.compression import observing_press
from kvjax.compression.presses import forward_observed, ratio_free
from kvjax.prompts import bucket
from kvjax.sampling import sample_rows
from kvjax.steps import SplitModel, forward_hidden, last_logits


class StepOutput(NamedTuple):
    """Per sequence of the batch, in its order: the next sampled token, and after a prefill the
    slots its cache holds (compressed or not)."""

    tokens: list[int]
    kv_lens: list[int] | None = None


class RowSampling(NamedTuple):
    """Per batch row: its request's sampling config, seed and tokens sampled so far (`sample_rows`)."""

    seeds: np.ndarray
    counters: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray

    @classmethod
    def of(cls, seqs, batch: int) -> "RowSampling":
        rows = cls(np.zeros(batch, np.int32), np.zeros(batch, np.int32), np.zeros(batch, np.float32),
                   np.zeros(batch, np.int32), np.ones(batch, np.float32))
        for row, seq in enumerate(seqs):
            config = seq.request.sampling
            rows.seeds[row], rows.counters[row] = seq.seed, len(seq.output)
            rows.temperature[row], rows.top_k[row], rows.top_p[row] = config.temperature, config.top_k, config.top_p
        return rows


@functools.partial(jax.jit, static_argnums=(0, 9), donate_argnums=(2,))
def _prefill(graphdef, state, cache, rows, table, tokens, lengths, embeds, sampling, press):
    batch = batch_view(cache, rows, table, fresh=True)
    hidden, batch, observations = forward_observed(graphdef, state, batch, tokens, lengths, embeds, press=press)
    logits = last_logits(graphdef, state, hidden, lengths)
    return sample_rows(logits, *sampling), commit(cache, rows, batch), observations


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
def _decode(graphdef, state, cache, rows, table, tokens, active, sampling):
    batch = batch_view(cache, rows, table)
    hidden, batch = forward_hidden(graphdef, state, batch, tokens[:, None], active.astype(jnp.int32))
    logits = last_logits(graphdef, state, hidden, active.astype(jnp.int32))
    return sample_rows(logits, *sampling), commit(cache, rows, batch)


class Runner:
    """Holds the split model, the page pool and (read-only) the allocator's page tables."""

    def __init__(self, parts: SplitModel, cache: PagedKVCache, allocator: PageAllocator, max_pages_per_seq: int,
                 *, prefill_batch_size: int, decoding_batch_size: int):
        self.parts, self.cache, self.allocator = parts, cache, allocator
        self.max_pages_per_seq = max_pages_per_seq
        self.prefill_batch_size, self.decoding_batch_size = prefill_batch_size, decoding_batch_size
        self.num_compress_calls = 0

    def run(self, batch) -> StepOutput:
        """Run one scheduled batch (`inference.scheduler.Batch`) on the device."""
        return self._prefill_batch(batch.seqs) if batch.kind == "prefill" else self._decode_batch(batch.seqs)

    def _rows_and_table(self, slots, num_tokens: int, max_batch: int):
        batch = bucket(len(slots), max_batch)
        width = bucket(self.allocator.pages_for(num_tokens), self.max_pages_per_seq)
        rows = np.full(batch, self.allocator.num_slots, np.int32)  # out of range = padding row
        rows[:len(slots)] = slots
        return rows, self.allocator.table(slots, width, batch), batch

    def _prefill_batch(self, seqs) -> StepOutput:
        """One prefill per static setting (method, RoPE convention, image protection, embeds or not),
        then its compression."""
        groups: dict = {}
        for index, seq in enumerate(seqs):
            request = seq.request
            key = (request.compression, request.rope_positions, request.protect_image, request.embeds is not None)
            groups.setdefault(key, []).append(index)
        tokens, kv_lens = [0] * len(seqs), [0] * len(seqs)
        for (method, rope_positions, protect_image, has_embeds), indices in groups.items():
            group = [seqs[i] for i in indices]
            first, lens = self._prefill_group(group, method, rope_positions, protect_image, has_embeds)
            for i, token, length in zip(indices, first, lens):
                tokens[i], kv_lens[i] = token, length
        return StepOutput(tokens, kv_lens)

    def _prefill_group(self, seqs, method, rope_positions, protect_image: bool, has_embeds: bool):
        slots, prompts = [s.slot for s in seqs], [s.prompt_ids for s in seqs]
        max_len = max(len(p) for p in prompts)
        rows, table, batch = self._rows_and_table(slots, max_len, self.prefill_batch_size)
        # Capped at the slots a sequence may hold, so observations never span more than its pages.
        num_tokens = bucket(max_len, self.max_pages_per_seq * self.allocator.page_size, 16)
        tokens = np.zeros((batch, num_tokens), np.int32)
        lengths = np.zeros(batch, np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
            lengths[row] = len(prompt)
        embeds = None
        if has_embeds:  # host float32; forward_hidden casts to the model dtype
            embeds = np.zeros((batch, num_tokens, np.shape(seqs[0].request.embeds)[-1]), np.float32)
            for row, seq in enumerate(seqs):
                embeds[row, :len(seq.prompt_ids)] = np.asarray(seq.request.embeds, np.float32)
        press = observing_press(method)
        with parallel.tracing_under(self.parts.mesh):
            out, self.cache, observations = _prefill(
                self.parts.graphdef, self.parts.state, self.cache, rows, table, tokens, lengths, embeds,
                RowSampling.of(seqs, batch), None if press is None else ratio_free(press))  # same for every ratio
        first = np.asarray(out)[:len(slots)].tolist()
        if method is None:
            return first, [len(p) for p in prompts]
        width = bucket(self.allocator.pages_for(num_tokens), self.max_pages_per_seq)
        return first, self._compress(seqs, rows, width, method, rope_positions, protect_image, observations)

    def _compress(self, seqs, rows, width: int, method, rope_positions, protect_image: bool,
                  observations) -> list[int]:
        """Compress the prefilled rows with `method` on their dense view and write the compacted
        tokens back into each sequence's first pages. Returns the new kv_len per sequence; the
        scheduler then returns the pages past it."""
        slots = [s.slot for s in seqs]
        batch = len(rows)
        table = self.allocator.table(slots, width, batch)
        dest = self.allocator.table(slots, width, batch, fill=self.cache.num_pages)  # padding writes nowhere
        image_len = np.zeros(batch, np.int32)
        image_len[:len(seqs)] = [s.request.image_len for s in seqs]
        dense = kvjax.compress(gather_dense(self.cache, rows, table), method, image_len, observations=observations,
                               protect_image=protect_image, rope_positions=rope_positions)  # per shard on a mesh
        self.cache = scatter_dense(self.cache, rows, dest, dense)
        self.num_compress_calls += 1
        return np.asarray(dense.kv_len)[:len(seqs)].tolist()  # the one sync: pages are freed next

    def _decode_batch(self, seqs) -> StepOutput:
        """Feed one token per sequence (each owns a page for slot kv_len); the next sampled tokens."""
        slots, kv_lens = [s.slot for s in seqs], [s.kv_len for s in seqs]
        rows, table, batch = self._rows_and_table(slots, max(kv_lens) + 1, self.decoding_batch_size)
        feed = np.zeros(batch, np.int32)
        feed[:len(seqs)] = [s.next_token for s in seqs]
        active = np.arange(batch) < len(seqs)
        with parallel.tracing_under(self.parts.mesh):
            out, self.cache = _decode(self.parts.graphdef, self.parts.state, self.cache, rows, table, feed, active,
                                      RowSampling.of(seqs, batch))
        return StepOutput(np.asarray(out)[:len(seqs)].tolist())
