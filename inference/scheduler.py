"""The scheduler: pure Python over sequences, lengths and the page allocator; never sees an array.

Each engine step is one phase, picked in this order:
  prefill   waiting sequences admitted while a slot and their prompt's pages are free, leaving a
            watermark of one free page per running sequence (so admissions do not force the
            preemptions that would undo them); the runner compresses those with a method right
            after their prefill;
  decode    running sequences sharing one sampling config, each with a page for its next token.
A sequence that cannot get a page makes the newest running sequence give its pages back (it
restarts from its prompt later; greedy output is unchanged). Progress is guaranteed: the oldest
sequence is never preempted for a younger one, and one that holds the whole pool alone and still
needs a page finishes with finish_reason "length" instead of restarting forever.
`postprocess` takes the runner's output: it records tokens and lengths, returns the pages that
compression freed, and finishes sequences (EOS: "stop"; max_new_tokens or a full sequence:
"length"), as nano-vllm's.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any

from inference.paged_cache import PageAllocator
from kvjax.errors import KVJaxError, PromptTooLong
from kvjax.sampling import GREEDY, Sampling


WATERMARK_PAGES_PER_SEQ = 1  # free pages an admission leaves for each running sequence to grow into


@dataclasses.dataclass(kw_only=True)
class Request:
    """prompt: token ids or text (the engine needs a tokenizer for text). embeds: float [T, H] input
    embeddings of the prompt instead (a VLM prompt with its image features, e.g. from
    `kvjax.multimodal.embed_prompt`); prompt may then be omitted. compression: anything
    `kvjax.compress` takes (a CCM compressor, any press, including those that read the prefill or
    give each layer its own budget, such as PyramidKV); image_len: the image prefix (CCM's image
    MLPs; with protect_image a press keeps it outside its budget); seed:
    the sampling seed (None: one derived from the engine's seed and the request id): a request's
    sampled tokens depend on its seed alone, not on what it is batched with; arrival_s: offset from
    the start of `Engine.generate`."""

    prompt: Any = None
    embeds: Any = None
    max_new_tokens: int = 64
    sampling: Sampling = GREEDY
    compression: Any = None
    image_len: int = 0
    protect_image: bool = False
    rope_positions: str | None = None
    seed: int | None = None
    arrival_s: float = 0.0


class Phase(enum.Enum):
    WAITING = "waiting"
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
    replay: list[int] = dataclasses.field(default_factory=list)  # output before a preemption, fed again
    num_preempted: int = 0
    seed: int = 0  # sampling seed (the request's, or the engine's derived one)
    finish_reason: str | None = None  # "stop" (EOS) | "length" (max_new_tokens, sequence or pool full) | "abort"
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def next_token(self) -> int:
        return self.output[-1]

    @property
    def is_done(self) -> bool:
        return len(self.output) >= self.request.max_new_tokens


@dataclasses.dataclass(frozen=True)
class Batch:
    kind: str  # "prefill" | "decode"
    seqs: tuple[Sequence, ...]


class Scheduler:
    def __init__(self, allocator: PageAllocator, *, max_pages_per_seq: int, prefill_batch_size: int,
                 decoding_batch_size: int, compress_batch_size: int | None = None, max_prefill_tokens: int = 1 << 30,
                 eos_ids=()):
        compress_batch_size = prefill_batch_size if compress_batch_size is None else compress_batch_size
        for name, value in (("prefill_batch_size", prefill_batch_size), ("decoding_batch_size", decoding_batch_size),
                            ("compress_batch_size", compress_batch_size)):
            if value <= 0:
                raise KVJaxError(f"{name} must be > 0, got {value}")
        self.allocator = allocator
        self.max_pages_per_seq = max_pages_per_seq
        self.capacity = max_pages_per_seq * allocator.page_size  # slots one sequence may hold
        self.prefill_batch_size, self.decoding_batch_size = prefill_batch_size, decoding_batch_size
        self.compress_batch_size = compress_batch_size  # rows of a prefill batch that compress right after it
        self.max_prefill_tokens, self.eos_ids = max_prefill_tokens, set(eos_ids)
        self.num_pages_freed_by_compression = 0
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # prefilled, in admission order
        self.ended: list[Sequence] = []  # finished while scheduling (the pool ran out); the engine drains it

    def check_fits(self, prompt_len: int) -> None:
        """Refuse a prompt that could never be prefilled, even alone in the pool."""
        pool = self.allocator.num_pages * self.allocator.page_size
        if prompt_len + 1 > min(self.capacity, pool):
            raise PromptTooLong(f"a prompt of {prompt_len} tokens never fits ({self.capacity} "
                             f"slots per sequence, {self.allocator.num_pages} pages of {self.allocator.page_size}); "
                             "raise max_model_len / num_pages or shorten the prompt")

    def add(self, seq: Sequence) -> None:
        self.check_fits(len(seq.prompt_ids))
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _can_admit(self, seq: Sequence, num_admitted: int) -> bool:
        """A slot and the prompt's pages are free, and one page per running sequence stays free for
        it to grow into; with nothing running the pool is all the first sequence's."""
        n = len(seq.prompt_ids)
        if not self.allocator.can_open(n):
            return False
        holders = len(self.running) + num_admitted
        headroom = WATERMARK_PAGES_PER_SEQ * holders
        return holders == 0 or self.allocator.num_free - self.allocator.pages_for(n) >= headroom

    def schedule(self) -> Batch | None:
        admitted, num_tokens, num_compressing = [], 0, 0
        while (self.waiting and len(admitted) < self.prefill_batch_size
               and num_tokens + len(self.waiting[0].prompt_ids) <= self.max_prefill_tokens
               and not (self.waiting[0].request.compression is not None
                        and num_compressing == self.compress_batch_size)
               and self._can_admit(self.waiting[0], len(admitted))):
            seq = self.waiting.popleft()
            seq.slot = self.allocator.open(len(seq.prompt_ids))
            num_tokens += len(seq.prompt_ids)
            num_compressing += seq.request.compression is not None
            admitted.append(seq)
        if admitted:
            return Batch("prefill", tuple(admitted))
        return self._decode_batch()

    def _decode_batch(self) -> Batch | None:
        if not self.running:
            return None
        chosen = []
        for seq in list(self.running):
            if len(chosen) == self.decoding_batch_size:
                break
            if seq not in self.running:  # preempted for an older one
                continue
            # The next token is written at slot kv_len; a full sequence stops (as kvjax.generate).
            while not self.allocator.grow(seq.slot, seq.kv_len + 1):
                if len(self.running) == 1:  # it holds every page in use: the pool can never take more
                    self.ended.append(self._finish(seq, "length"))
                    break
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                chosen.append(seq)
        return Batch("decode", tuple(chosen)) if chosen else None

    def preempt(self, seq: Sequence) -> None:
        """Give back the sequence's pages and slot; it restarts from its prompt, replaying its output."""
        self.running.remove(seq)
        self.allocator.close(seq.slot)
        if len(seq.output) > len(seq.replay):
            seq.replay = seq.output
        seq.phase, seq.slot, seq.kv_len, seq.output = Phase.WAITING, -1, 0, []
        seq.num_preempted += 1
        self.waiting.appendleft(seq)

    def abort(self, request_id: int) -> Sequence | None:
        """Drop a waiting or running sequence now (its pages go back to the pool); finish_reason
        "abort". None when no such sequence is queued or running (it may have finished already)."""
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                seq.phase, seq.finish_reason = Phase.FINISHED, "abort"
                return seq
        for seq in self.running:
            if seq.request_id == request_id:
                return self._finish(seq, "abort")
        return None

    def postprocess(self, batch: Batch, tokens: list[int], kv_lens: list[int] | None, now: float) -> list[Sequence]:
        """Record a run's output (per sequence of the batch: its next token and, after a prefill, the
        slots its cache holds), free what compression released, and finish sequences that sampled
        EOS, reached max_new_tokens or filled their slots (as kvjax.generate). Returns the finished."""
        finished = []
        for index, (seq, token) in enumerate(zip(batch.seqs, tokens)):
            if seq.phase is Phase.WAITING and batch.kind == "decode":
                continue  # preempted while this batch was built: it restarts from its prompt
            if len(seq.output) < len(seq.replay):  # restarted after a preemption: its earlier tokens again
                token = seq.replay[len(seq.output)]
            seq.output.append(token)
            if batch.kind == "prefill":
                seq.times.setdefault("first_token", now)
                seq.kv_len, seq.phase = kv_lens[index], Phase.RUNNING
                self.running.append(seq)
                if seq.request.compression is not None:
                    seq.times["compressed_len"] = seq.kv_len
                    self.num_pages_freed_by_compression += self.allocator.shrink(seq.slot, seq.kv_len)
            else:
                seq.kv_len += 1
            if token in self.eos_ids or seq.is_done or seq.kv_len >= self.capacity:
                seq.times["finish"] = now
                finished.append(self._finish(seq, "stop" if token in self.eos_ids else "length"))
        return finished

    def _finish(self, seq: Sequence, reason: str) -> Sequence:
        self.running.remove(seq)
        self.allocator.close(seq.slot)
        seq.phase, seq.finish_reason = Phase.FINISHED, reason
        return seq
