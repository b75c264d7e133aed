"""The paged KV cache: one preallocated page pool per layer, page tables per sequence slot, a free list.

Device side (`PagedKVCache`, a pytree): k/v pages [L, P, Hkv, page_size, D] (or int8 pages with
per-token scales) plus the dense cache's kv_len, positions and per-layer lengths, per sequence slot.
A sequence's pages are shared by all its layers, so it owns pages for its longest layer (kv_len). Host side (`PageAllocator`, nano-vllm's block
manager): the free list and each slot's page list, i.e. the page tables. The runner turns a batch's
page lists into a `[B, W]` table each step (attention metadata, `pallas_kernels.paged_attention`),
so the device never holds a table that could disagree with the allocator.

Compression (the runner's) gathers a batch's pages into a dense `kvjax.KVCache` (`gather_dense`;
int8 pages dequantized), runs `kvjax.compress` on it and writes the compacted tokens back into each
sequence's first pages (`scatter_dense`; quantized again for int8 pages); the scheduler then
returns the pages past the new length to the free list.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kvjax import parallel
from kvjax.cache import KVCache, QuantizedArray, as_dense, quantize
from kvjax.errors import KVJaxError
from pallas_kernels.paged_attention import PagedKV, gather_pages


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k_pages: Any  # [L, P, Hkv, page_size, D] keys after RoPE, or int8 pages (QuantizedArray + scales)
    v_pages: Any  # same as k_pages
    kv_len: jax.Array  # int32 [N]: slots each sequence slot occupies (as KVCache.kv_len: the max over layers)
    positions: jax.Array  # int32 [N]: RoPE position of each slot's next token (as KVCache.positions)
    # int32 [L, N]: each layer's length (as KVCache.layer_kv_len; per-layer budgets such as PyramidKV).
    # Always present, so one program serves both kinds of sequence; equal to kv_len otherwise.
    layer_kv_len: jax.Array

    @classmethod
    def for_model(cls, cfg, num_pages: int, page_size: int, num_slots: int, dtype: Any = jnp.float32,
                  kv_cache_dtype: str | None = None, mesh=None):
        """kv_cache_dtype: None keeps K/V in `dtype`; "int8" stores int8 values with one float32 scale
        per token and KV head (kvjax.quantization), read back as `dtype`. mesh: a tensor-parallel
        mesh (`kvjax.parallel`): the pools are created split over KV heads, never whole on one device."""
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_slots", num_slots)):
            if int(value) <= 0:
                raise KVJaxError(f"PagedKVCache: {name} must be > 0, got {value}")
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise KVJaxError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES} (None: the model's dtype), "
                             f"got {kv_cache_dtype!r}")
        shape = (cfg.num_layers, num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)

        def zeros(shape, dtype):
            return parallel.zeros(shape, dtype, mesh)

        def pool():  # distinct buffers: the steps donate every leaf
            if kv_cache_dtype == "int8":
                return QuantizedArray(zeros(shape, jnp.int8), zeros(shape[:-1] + (1,), jnp.float32), jnp.dtype(dtype))
            return zeros(shape, dtype)

        return cls(pool(), pool(), zeros(num_slots, jnp.int32), zeros(num_slots, jnp.int32),
                   zeros((cfg.num_layers, num_slots), jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    @property
    def is_quantized(self) -> bool:
        return isinstance(self.k_pages, QuantizedArray)

    def page_bytes(self) -> int:
        """Bytes of K and V in one page across all layers, int8 scales included (works on
        `jax.eval_shape` of a cache too, to size a pool before building it)."""
        leaves = jax.tree.leaves((self.k_pages, self.v_pages))
        return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in leaves) // self.num_pages


KV_CACHE_DTYPES = (None, "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """A batch of slots seen as a cache by `kvjax.steps.forward_hidden` (same fields as KVCache)."""

    k: PagedKV
    v: PagedKV
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]
    layer_kv_len: jax.Array  # int32 [L, B]: forward_hidden writes and reads each layer at its own length

    @property
    def max_len(self) -> int:
        return self.k.max_len

    def replace(self, **changes) -> PagedBatch:
        return dataclasses.replace(self, **changes)


def _rows_of(x, rows):
    """x[..., rows] ([N] or [L, N] -> [B] or [L, B]); rows >= N (padding) read 0."""
    return x.at[..., rows].get(mode="fill", fill_value=0)


def _set_rows(x, rows, new):
    return x.at[..., rows].set(new, mode="drop")


def batch_view(cache: PagedKVCache, rows, table, fresh: bool = False) -> PagedBatch:
    """Slots `rows` int32 [B] (rows >= N are padding) through `table` int32 [B, W]; fresh: empty rows."""
    lengths = [_rows_of(x, rows) for x in (cache.kv_len, cache.positions, cache.layer_kv_len)]
    if fresh:  # a prefill starts a new sequence in a reused slot
        lengths = [jnp.zeros_like(x) for x in lengths]
    return PagedBatch(PagedKV(cache.k_pages, table), PagedKV(cache.v_pages, table), *lengths)


def commit(cache: PagedKVCache, rows, batch: PagedBatch) -> PagedKVCache:
    """Fold a batch view back into the cache (padding rows are dropped)."""
    return PagedKVCache(batch.k.pages, batch.v.pages, _set_rows(cache.kv_len, rows, batch.kv_len),
                        _set_rows(cache.positions, rows, batch.positions),
                        _set_rows(cache.layer_kv_len, rows, batch.layer_kv_len))


@jax.jit
def gather_dense(cache: PagedKVCache, rows, table) -> KVCache:
    """The dense (dequantized) view of `rows`. One length per row: compression follows a fresh
    prefill, where every layer holds kv_len."""
    def dense(pages):
        return as_dense(jax.tree.map(lambda x: gather_pages(x, table), pages))

    return KVCache(dense(cache.k_pages), dense(cache.v_pages), _rows_of(cache.kv_len, rows),
                   _rows_of(cache.positions, rows))


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_dense(cache: PagedKVCache, rows, dest, dense: KVCache) -> PagedKVCache:
    """Write dense [L, B, Hkv, W * ps, D] back page by page (quantized again for int8 pages); dest
    int32 [B, W] (P = do not write)."""
    num_layers, batch, num_kv_heads, _, _ = dense.k.shape
    shape = (num_layers, batch, num_kv_heads, dest.shape[1], cache.page_size)

    def put(pages, x):  # x -> [L, B, W, Hkv, ps, D], one page per (b, w)
        x = jnp.moveaxis(x.reshape(shape + x.shape[-1:]), 3, 2)
        return pages.at[:, dest].set(x, mode="drop")

    def store(pages, x):
        x = as_dense(x)  # a method ending in int8 hands back int8 K/V: quantized again per page below
        if isinstance(pages, QuantizedArray):
            x = quantize(x, pages.dtype)
        return jax.tree.map(put, pages, x)

    return PagedKVCache(store(cache.k_pages, dense.k), store(cache.v_pages, dense.v),
                        _set_rows(cache.kv_len, rows, dense.kv_len), _set_rows(cache.positions, rows, dense.positions),
                        _set_rows(cache.layer_kv_len, rows, dense.lengths_per_layer()))


class PageAllocator:
    """Host bookkeeping: free pages, free sequence slots, and each slot's pages in order."""

    def __init__(self, num_pages: int, num_slots: int, page_size: int):
        self.num_pages, self.num_slots, self.page_size = num_pages, num_slots, page_size
        self.free_pages = collections.deque(range(num_pages))
        self.free_slots = collections.deque(range(num_slots))
        self.pages: dict[int, list[int]] = {}  # slot -> its pages (the page table row)
        self.peak_used = 0

    @property
    def num_free(self) -> int:
        return len(self.free_pages)

    @property
    def num_used(self) -> int:
        return self.num_pages - len(self.free_pages)

    def pages_for(self, num_tokens: int) -> int:
        return -(-int(num_tokens) // self.page_size)

    def can_open(self, num_tokens: int) -> bool:
        return bool(self.free_slots) and self.pages_for(num_tokens) <= self.num_free

    def open(self, num_tokens: int) -> int:
        """A free slot owning enough pages for num_tokens."""
        if not self.can_open(num_tokens):
            raise KVJaxError(f"no room for {num_tokens} tokens: {self.num_free} free pages, "
                             f"{len(self.free_slots)} free slots")
        slot = self.free_slots.popleft()
        self.pages[slot] = []
        self.grow(slot, num_tokens)
        return slot

    def grow(self, slot: int, num_tokens: int) -> bool:
        """Make `slot` own pages for num_tokens; False (nothing taken) if the pool is short."""
        missing = self.pages_for(num_tokens) - len(self.pages[slot])
        if missing > self.num_free:
            return False
        self.pages[slot].extend(self.free_pages.popleft() for _ in range(max(missing, 0)))
        self.peak_used = max(self.peak_used, self.num_used)
        return True

    def shrink(self, slot: int, num_tokens: int) -> int:
        """Return the pages past num_tokens to the free list; the number freed."""
        keep = self.pages_for(num_tokens)
        freed = self.pages[slot][keep:]
        del self.pages[slot][keep:]
        self.free_pages.extend(freed)
        return len(freed)

    def close(self, slot: int) -> None:
        self.shrink(slot, 0)
        del self.pages[slot]
        self.free_slots.append(slot)

    def table(self, slots, width: int, batch: int | None = None, fill: int = 0) -> np.ndarray:
        """int32 [batch, width] page table of `slots`. Rows past them and entries past a slot's pages
        name page `fill`: 0 for reads (attention masks them and writes never reach them), the pool
        size for writes that must go nowhere."""
        out = np.full((batch or len(slots), width), fill, np.int32)
        for row, slot in enumerate(slots):
            owned = self.pages[slot][:width]
            out[row, :len(owned)] = owned
        return out

    def check(self, kv_len: dict[int, int] | None = None) -> None:
        """Invariants: no page owned twice, free + owned = pool, and each slot in kv_len owns pages
        for its tokens. Raises AssertionError naming the broken one."""
        owned = [p for pages in self.pages.values() for p in pages]
        assert len(owned) == len(set(owned)), f"a page is owned twice: {sorted(owned)}"
        assert not set(owned) & set(self.free_pages), "a page is both free and owned"
        assert len(owned) + len(self.free_pages) == self.num_pages, \
            f"{len(owned)} owned + {len(self.free_pages)} free != {self.num_pages} pages"
        assert len(set(self.free_pages)) == len(self.free_pages), "a page is free twice"
        assert not set(self.pages) & set(self.free_slots), "a slot is both free and open"
        for slot, length in (kv_len or {}).items():
            assert len(self.pages[slot]) >= self.pages_for(length), f"slot {slot} lacks pages for {length} tokens"
