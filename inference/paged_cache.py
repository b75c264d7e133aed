"""The paged KV cache: one preallocated page pool per layer, page tables per sequence slot, a free list.

Device side (`PagedKVCache`, a pytree): k/v pages [L, P, Hkv, page_size, D] plus the dense cache's
kv_len and positions, one entry per sequence slot. Host side (`PageAllocator`, nano-vllm's block
manager): the free list and each slot's page list, i.e. the page tables. The runner turns a batch's
page lists into a `[B, W]` table each step (attention metadata, `pallas_kernels.paged_attention`),
so the device never holds a table that could disagree with the allocator.

Compression (`compress_slots`) gathers each sequence's pages into a dense `kvjax.KVCache`, runs any
`kvjax.compress` method on it, writes the compacted tokens back into the sequence's first pages and
returns the pages it no longer needs to the free list at once.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import kvjax
from kvjax.cache import KVCache
from kvjax.errors import KVJaxError
from pallas_kernels.paged_attention import PagedKV, gather_pages


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    k_pages: jax.Array  # [L, P, Hkv, page_size, D], keys after RoPE
    v_pages: jax.Array  # [L, P, Hkv, page_size, D]
    kv_len: jax.Array  # int32 [N]: valid slots per sequence slot (as KVCache.kv_len)
    positions: jax.Array  # int32 [N]: RoPE position of each slot's next token (as KVCache.positions)

    @classmethod
    def for_model(cls, cfg, num_pages: int, page_size: int, num_slots: int, dtype: Any = jnp.float32):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_slots", num_slots)):
            if int(value) <= 0:
                raise KVJaxError(f"PagedKVCache: {name} must be > 0, got {value}")
        shape = (cfg.num_layers, num_pages, cfg.num_kv_heads, page_size, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros(num_slots, jnp.int32), jnp.zeros(num_slots, jnp.int32))

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[3]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[1]

    def page_bytes(self) -> int:
        """Bytes of K and V in one page across all layers."""
        return 2 * self.k_pages[:, 0].size * self.k_pages.dtype.itemsize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """A batch of slots seen as a cache by `kvjax.steps.forward_hidden` (same fields as KVCache)."""

    k: PagedKV
    v: PagedKV
    kv_len: jax.Array  # int32 [B]
    positions: jax.Array  # int32 [B]

    @property
    def max_len(self) -> int:
        return self.k.max_len

    def replace(self, **changes) -> PagedBatch:
        return dataclasses.replace(self, **changes)


def batch_view(cache: PagedKVCache, rows, table, fresh: bool = False) -> PagedBatch:
    """Slots `rows` int32 [B] (rows >= N are padding) through `table` int32 [B, W]; fresh: empty rows."""
    kv_len = cache.kv_len.at[rows].get(mode="fill", fill_value=0)
    positions = cache.positions.at[rows].get(mode="fill", fill_value=0)
    if fresh:  # a prefill starts a new sequence in a reused slot
        kv_len, positions = jnp.zeros_like(kv_len), jnp.zeros_like(positions)
    return PagedBatch(PagedKV(cache.k_pages, table), PagedKV(cache.v_pages, table), kv_len, positions)


def commit(cache: PagedKVCache, rows, batch: PagedBatch) -> PagedKVCache:
    """Fold a batch view back into the cache (padding rows are dropped)."""
    return PagedKVCache(batch.k.pages, batch.v.pages, cache.kv_len.at[rows].set(batch.kv_len, mode="drop"),
                        cache.positions.at[rows].set(batch.positions, mode="drop"))


@jax.jit
def _gather(cache: PagedKVCache, rows, table) -> KVCache:
    return KVCache(gather_pages(cache.k_pages, table), gather_pages(cache.v_pages, table),
                   cache.kv_len.at[rows].get(mode="fill", fill_value=0),
                   cache.positions.at[rows].get(mode="fill", fill_value=0))


@functools.partial(jax.jit, donate_argnums=(0,))
def _scatter(cache: PagedKVCache, rows, dest, dense: KVCache) -> PagedKVCache:
    """Write dense [L, B, Hkv, W * ps, D] back page by page; dest int32 [B, W] (P = do not write)."""
    num_layers, batch, num_kv_heads, _, head_dim = dense.k.shape
    shape = (num_layers, batch, num_kv_heads, dest.shape[1], cache.page_size, head_dim)

    def put(pages, x):  # x -> [L, B, W, Hkv, ps, D], one page per (b, w)
        x = jnp.moveaxis(x.reshape(shape), 3, 2)
        return pages.at[:, dest].set(x, mode="drop")

    return PagedKVCache(put(cache.k_pages, dense.k), put(cache.v_pages, dense.v),
                        cache.kv_len.at[rows].set(dense.kv_len, mode="drop"),
                        cache.positions.at[rows].set(dense.positions, mode="drop"))


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

    def table(self, slots, width: int, batch: int | None = None) -> np.ndarray:
        """int32 [batch, width] page table of `slots` (rows past them and entries past a slot's pages
        name page 0: attention masks them and writes never reach them)."""
        out = np.zeros((batch or len(slots), width), np.int32)
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


def compress_slots(cache: PagedKVCache, allocator: PageAllocator, slots, method, image_len, *, width: int,
                   batch: int | None = None, rope_positions: str | None = None, observations=None):
    """Compress the sequences in `slots` with `method` (anything `kvjax.compress` takes) and free
    their unused pages. width: table width covering every slot's pages; batch: padded batch size (a
    bucket); observations: what a press recorded in the prefill of exactly these slots, in this
    order (`Runner.prefill`; batch must be its padded batch). Returns (cache, new kv_len per slot)."""
    batch = batch or len(slots)
    rows = np.full(batch, allocator.num_slots, np.int32)
    rows[:len(slots)] = slots
    table = allocator.table(slots, width, batch)
    # Only a sequence's own pages are written back; padding rows and entries write nowhere.
    dest = np.full((batch, width), cache.num_pages, np.int32)
    for row, slot in enumerate(slots):
        owned = allocator.pages[slot][:width]
        dest[row, :len(owned)] = owned
    lengths = np.zeros(batch, np.int32)
    lengths[:len(slots)] = image_len
    options = {} if observations is None else {"observations": observations}
    dense = kvjax.compress(_gather(cache, rows, table), method, lengths, rope_positions=rope_positions, **options)
    if getattr(dense, "layer_kv_len", None) is not None:  # the source cache is untouched: _gather copies
        raise KVJaxError(per_layer_message(method))
    new_len = np.asarray(dense.kv_len)[:len(slots)].tolist()  # the one sync: pages are freed now
    cache = _scatter(cache, rows, dest, dense)
    for slot, length in zip(slots, new_len):
        allocator.shrink(slot, length)
    return cache, new_len


def per_layer_message(method) -> str:
    return (f"{type(method).__name__} gives each layer its own number of kept tokens, which the paged "
            "cache cannot hold (one length per sequence); serve it with kvjax.generate on the dense "
            "KVCache, or use a press with one budget for all layers")
