"""The scheduler: pure Python over sequences, lengths and the page allocator; never sees an array.

Each engine step is one phase, picked in this order:
  compress  sequences prefilled with a compression method (frees pages, so it goes first);
  prefill   waiting sequences admitted while a slot and their prompt's pages are free;
  decode    running sequences sharing one sampling config, each with a page for its next token.
A sequence that cannot get a page waits; if no running sequence can, the newest one is preempted:
its pages go back and it restarts from its prompt later (greedy output is unchanged).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any

from inference.paged_cache import PageAllocator
from kvjax.errors import KVJaxError
from kvjax.sampling import GREEDY, Sampling


@dataclasses.dataclass(kw_only=True)
class Request:
    """prompt: token ids or text (the engine needs a tokenizer for text). embeds: float [T, H] input
    embeddings of the prompt instead (a VLM prompt with its image features, e.g. from
    `kvjax.multimodal.embed_prompt`); prompt may then be omitted. compression: anything
    `kvjax.compress` takes (a CCM compressor, any press, including those that read the prefill or
    give each layer its own budget, such as PyramidKV); image_len: the image prefix for CCM; arrival_s: offset from the
    start of `Engine.generate`."""

    prompt: Any = None
    embeds: Any = None
    max_new_tokens: int = 64
    sampling: Sampling = GREEDY
    compression: Any = None
    image_len: int = 0
    rope_positions: str | None = None
    arrival_s: float = 0.0


class Phase(enum.Enum):
    WAITING = "waiting"
    COMPRESS = "compress"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    request_id: int
    request: Request
    prompt_ids: list[int]
    phase: Phase = Phase.WAITING
    slot: int = -1
    kv_len: int = 0  # host mirror of the device kv_len of the slot
    output: list[int] = dataclasses.field(default_factory=list)
    num_preempted: int = 0
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def next_token(self) -> int:
        return self.output[-1]

    @property
    def is_done(self) -> bool:
        return len(self.output) >= self.request.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Batch:
    kind: str  # "prefill" | "compress" | "decode"
    seqs: tuple[Sequence, ...]


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_pages_per_seq: int, prefill_batch_size: int,
                 compress_batch_size: int, decoding_batch_size: int, max_prefill_tokens: int = 1 << 30):
        for name, value in (("prefill_batch_size", prefill_batch_size), ("compress_batch_size", compress_batch_size),
                            ("decoding_batch_size", decoding_batch_size)):
            if value <= 0:
                raise KVJaxError(f"{name} must be > 0, got {value}")
        self.allocator = allocator
        self.max_pages_per_seq = max_pages_per_seq
        self.prefill_batch_size, self.compress_batch_size = prefill_batch_size, compress_batch_size
        self.decoding_batch_size, self.max_prefill_tokens = decoding_batch_size, max_prefill_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # prefilled, in admission order (COMPRESS or RUNNING)

    def add(self, seq: Sequence) -> None:
        capacity = self.max_pages_per_seq * self.allocator.page_size
        if len(seq.prompt_ids) + 1 > min(capacity, self.allocator.num_pages * self.allocator.page_size):
            raise KVJaxError(f"request {seq.request_id}: a prompt of {len(seq.prompt_ids)} tokens never fits "
                             f"({capacity} slots per sequence, {self.allocator.num_pages} pages); raise "
                             f"max_model_len / num_pages or shorten the prompt")
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        pending = [s for s in self.running if s.phase is Phase.COMPRESS]
        if pending:
            first = pending[0].request
            group = [s for s in pending if s.request.compression is first.compression
                     and s.request.rope_positions == first.rope_positions]
            return Batch("compress", tuple(group[:self.compress_batch_size]))
        admitted, num_tokens = [], 0
        while (self.waiting and len(admitted) < self.prefill_batch_size
               and num_tokens + len(self.waiting[0].prompt_ids) <= self.max_prefill_tokens
               and self.allocator.can_open(len(self.waiting[0].prompt_ids))):
            seq = self.waiting.popleft()
            seq.slot = self.allocator.open(len(seq.prompt_ids))
            num_tokens += len(seq.prompt_ids)
            admitted.append(seq)
        if admitted:
            return Batch("prefill", tuple(admitted))
        return self._decode_batch()

    def _decode_batch(self) -> Batch | None:
        if not self.running:
            return None
        sampling = self.running[0].request.sampling
        chosen = []
        for seq in list(self.running):
            if len(chosen) == self.decoding_batch_size:
                break
            if seq.request.sampling != sampling or seq not in self.running:
                continue
            # The next token is written at slot kv_len; a full sequence stops (as kvjax.generate).
            while not self.allocator.grow(seq.slot, seq.kv_len + 1):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                chosen.append(seq)
        return Batch("decode", tuple(chosen)) if chosen else None

    def preempt(self, seq: Sequence) -> None:
        """Give back the sequence's pages and slot; it restarts from its prompt."""
        self.running.remove(seq)
        self.allocator.close(seq.slot)
        seq.phase, seq.slot, seq.kv_len, seq.output = Phase.WAITING, -1, 0, []
        seq.num_preempted += 1
        self.waiting.appendleft(seq)

    def after_prefill(self, batch: Batch, first_tokens: list[int]) -> None:
        for seq, token in zip(batch.seqs, first_tokens):
            seq.kv_len = len(seq.prompt_ids)
            seq.output = [token]
            seq.phase = Phase.COMPRESS if seq.request.compression is not None else Phase.RUNNING
            self.running.append(seq)

    def after_compress(self, batch: Batch, new_lens: list[int]) -> None:
        for seq, length in zip(batch.seqs, new_lens):
            seq.kv_len, seq.phase = length, Phase.RUNNING

    def after_decode(self, batch: Batch, tokens: list[int]) -> None:
        for seq, token in zip(batch.seqs, tokens):
            seq.kv_len += 1
            seq.output.append(token)

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.allocator.close(seq.slot)
        seq.phase = Phase.FINISHED
