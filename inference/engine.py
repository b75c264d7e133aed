"""The serving engine: `Engine(model_dir or model).generate(requests)` -> texts, tokens, metrics.

`step()` is schedule -> run -> postprocess (nano-vllm's split): the scheduler (pure Python) picks a
prefill or decode batch; the runner runs it on the paged cache (a prefill compresses the requests
that carry a method, through the one `kvjax.compress` path); the scheduler's postprocess appends
tokens, returns pages compression freed, and finishes sequences (EOS, max_new_tokens, full). Greedy outputs
equal `kvjax.generate` (and prefill + `kvjax.compress` + `kvjax.generate_from`) per request.
A VLM serves through its language model: its requests carry their prompt's embeddings.
`kv_cache_dtype="int8"` keeps the pages int8 (outputs then equal the dense int8 cache's).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

import kvjax
from inference.paged_cache import PageAllocator, PagedKVCache
from inference.runner import Runner
from inference.scheduler import Request, Scheduler, Sequence
from kvjax import parallel
from kvjax.compression import steps_of
from kvjax.compression.presses import Press
from kvjax.errors import KVJaxError


@dataclasses.dataclass
class Result:
    request_id: int
    token_ids: list[int]
    text: str | None
    ttft_s: float  # arrival -> first token
    tpot_s: float  # mean time per output token after the first
    latency_s: float  # arrival -> last token
    num_preempted: int
    compressed_len: int | None  # kv_len after compression
    finish_reason: str = "length"  # "stop" (EOS) | "length" | "abort" | "error" (refused: see error)
    error: str | None = None  # why the request was refused; nothing ran for it


class Engine:
    """page_size: slots per page; num_pages: the pool (default: max_num_seqs full sequences), or
    kv_cache_bytes: as many pages as fit in these bytes; kv_cache_dtype: None (the model's dtype) or
    "int8" (one float32 scale per token and KV head: about 3.6x the pages of float32 per byte);
    max_model_len: slots one sequence may hold; prefill / decoding_batch_size: rows per step (a
    prefill batch's compression runs on the same rows); compress_batch_size: at most this many rows
    of a prefill batch carry a compression method (default: prefill_batch_size); seed: derives the
    sampling seed of requests that bring none;
    check_invariants: verify the allocator after every step (tests)."""

    def __init__(self, model, *, tokenizer=None, dtype: str = "float32", page_size: int = 16,
                 num_pages: int | None = None, max_num_seqs: int = 32, max_model_len: int = 1024,
                 prefill_batch_size: int = 4, decoding_batch_size: int = 32, compress_batch_size: int | None = None,
                 max_prefill_tokens: int = 1 << 30, eos_ids=None, seed: int = 0, check_invariants: bool = False,
                 kv_cache_dtype: str | None = None, kv_cache_bytes: int | None = None,
                 tensor_parallel: int | None = None, clock: Callable[[], float] = time.perf_counter):
        if not isinstance(model, kvjax.SplitModel) and not hasattr(model, "cfg"):  # a model directory
            model, tokenizer, _ = kvjax.load(model, dtype=dtype, tensor_parallel=tensor_parallel)
        model = getattr(model, "language_model", model)  # a VLM: image requests bring their embeds
        self.parts = kvjax.split(model)
        if tensor_parallel is not None and parallel.tp_size(self.parts.mesh) != tensor_parallel:
            if isinstance(model, kvjax.SplitModel):
                raise KVJaxError(f"tensor_parallel={tensor_parallel} but the split model given is on "
                                 f"{parallel.tp_size(self.parts.mesh)} device(s); load it with tensor_parallel=")
            self.parts = kvjax.split(parallel.shard_model(model, parallel.make_mesh(tensor_parallel)))
        self.tokenizer = tokenizer
        cfg = self.parts.cfg
        max_pages_per_seq = -(-max_model_len // page_size)
        dtype = jax.tree.leaves(self.parts.state)[0].dtype  # attention reads K/V in the model's dtype
        if kv_cache_bytes is not None:
            num_pages = pages_in(kv_cache_bytes, num_pages, cfg, page_size, dtype, kv_cache_dtype)
        num_pages = num_pages or max_num_seqs * max_pages_per_seq
        self.allocator = PageAllocator(num_pages, max_num_seqs, page_size)
        cache = PagedKVCache.for_model(cfg, num_pages, page_size, max_num_seqs, dtype, kv_cache_dtype, self.parts.mesh)
        self.runner = Runner(self.parts, cache, self.allocator, max_pages_per_seq,
                             prefill_batch_size=prefill_batch_size, decoding_batch_size=decoding_batch_size)
        self.scheduler = Scheduler(self.allocator, max_pages_per_seq=max_pages_per_seq,
                                   prefill_batch_size=prefill_batch_size, decoding_batch_size=decoding_batch_size,
                                   compress_batch_size=compress_batch_size, max_prefill_tokens=max_prefill_tokens,
                                   eos_ids=cfg.eos_token_ids if eos_ids is None else eos_ids)
        self.check_invariants, self.clock, self.seed = check_invariants, clock, seed
        self.num_requests = 0
        self.finished: list[Sequence] = []
        self.stats = {"steps": {"prefill": 0, "compress": 0, "decode": 0}, "pages_freed_by_compression": 0,
                      "max_running": 0}

    def add_request(self, request: Request) -> int:
        """Validate a request and queue it now; returns its id. A bad request raises KVJaxError and
        changes nothing."""
        return self.enqueue(request, self.validate(request)).request_id

    def validate(self, request: Request) -> list[int]:
        """The request's prompt ids, or KVJaxError naming what is wrong with it."""
        if request.max_new_tokens <= 0:
            raise KVJaxError(f"max_new_tokens must be > 0, got {request.max_new_tokens}")
        prompt = request.prompt
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise KVJaxError("a text prompt needs a tokenizer: pass tokenizer= or token ids")
            prompt = self.tokenizer.encode(prompt)
        if request.embeds is not None:
            prompt = self._check_embeds(request.embeds, prompt)
        ids = [int(t) for t in (prompt if prompt is not None else ())]
        if not ids:
            raise KVJaxError("empty prompt (give prompt= token ids or embeds=)")
        for step in steps_of(request.compression):  # refuse now what compression would refuse later
            if isinstance(step, Press):
                step.check(len(ids))
        self.scheduler.check_fits(len(ids))
        return ids

    def enqueue(self, request: Request, prompt_ids: list[int]) -> Sequence:
        """Queue a request whose prompt `validate` returned; its Sequence (the id, the output so far)."""
        seq = Sequence(self.num_requests, request, prompt_ids)
        seed = request.seed if request.seed is not None else self.seed * 1_000_003 + seq.request_id
        seq.seed = int(seed) % (1 << 31)  # an int32 on the device
        seq.times["arrival"] = self.clock()
        self.scheduler.add(seq)
        self.num_requests += 1
        return seq

    def _check_embeds(self, embeds, prompt):
        """embeds [T, H] of the model's hidden size; prompt ids, if given, must have T entries."""
        shape, hidden = tuple(np.shape(embeds)), self.parts.cfg.hidden_size
        if len(shape) != 2 or shape[1] != hidden:
            raise KVJaxError(f"embeds must be [prompt_len, {hidden}] (the model's hidden size), got shape {shape}")
        if prompt is None:
            return [0] * shape[0]  # the tokens are never read: the embeddings replace them
        if len(prompt) != shape[0]:
            raise KVJaxError(f"embeds has {shape[0]} rows but the prompt has {len(prompt)} tokens; "
                             "give one embedding per prompt token (or omit prompt)")
        return prompt

    def step(self) -> list[Sequence]:
        """One scheduled batch: schedule -> run -> postprocess; returns the sequences that finished."""
        batch = self.scheduler.schedule()
        finished = self._drain_ended()
        if batch is None:
            self.finished.extend(finished)
            return finished
        self.stats["steps"][batch.kind] += 1
        output = self.runner.run(batch)
        finished += self.scheduler.postprocess(batch, output.tokens, output.kv_lens, self.clock())
        self.finished.extend(finished)
        self.stats["steps"]["compress"] = self.runner.num_compress_calls
        self.stats["pages_freed_by_compression"] = self.scheduler.num_pages_freed_by_compression
        self.stats["max_running"] = max(self.stats["max_running"], len(self.scheduler.running))
        if self.check_invariants:
            self.allocator.check({s.slot: s.kv_len for s in self.scheduler.running})
        return finished

    def abort(self, request_id: int) -> Sequence | None:
        """Stop a queued or running request now and return its pages to the pool (finish_reason
        "abort"); None if it is not queued or running."""
        seq = self.scheduler.abort(request_id)
        if seq is not None:
            seq.times["finish"] = self.clock()
            self.finished.append(seq)
        return seq

    def _drain_ended(self) -> list[Sequence]:
        """Sequences the scheduler finished while building a batch (the pool ran out)."""
        ended, self.scheduler.ended = self.scheduler.ended, []
        for seq in ended:
            seq.times["finish"] = self.clock()
        return ended

    def generate(self, requests: list[Request], *, progress: Callable[[int], None] | None = None) -> list[Result]:
        """Run requests to completion; each enters the queue at its arrival_s after the start.
        Results come back in request order. Every request is validated first: a bad one gets a
        Result with finish_reason "error" and its message, and the others run as if it were absent."""
        start, first_id = self.clock(), self.num_requests
        prompts, errors = {}, {}
        for index, request in enumerate(requests):
            try:
                prompts[index] = self.validate(request)
            except KVJaxError as e:
                errors[index] = str(e)
        pending = sorted(prompts, key=lambda i: requests[i].arrival_s)
        ids: dict[int, int] = {}
        while pending or self.scheduler.has_work:
            elapsed = self.clock() - start
            while pending and requests[pending[0]].arrival_s <= elapsed:
                index = pending.pop(0)
                ids[index] = self.enqueue(requests[index], prompts[index]).request_id
            if not self.scheduler.has_work:  # idle until the next arrival
                time.sleep(max(0.0, min(requests[pending[0]].arrival_s - elapsed, 0.05)))
                continue
            finished = self.step()
            if progress is not None and finished:
                progress(len(finished))
        by_id = {seq.request_id: seq for seq in self.finished if seq.request_id >= first_id}
        return [self.result_of(by_id[ids[i]]) if i in ids else refused(errors[i]) for i in range(len(requests))]

    def result_of(self, seq: Sequence) -> Result:
        t = seq.times
        num = len(seq.output)
        text = self.tokenizer.decode(seq.output) if self.tokenizer is not None else None
        first = t.get("first_token", float("nan"))  # none for a request aborted before its prefill
        return Result(seq.request_id, list(seq.output), text, first - t["arrival"],
                      (t["finish"] - first) / max(num - 1, 1), t["finish"] - t["arrival"],
                      seq.num_preempted, t.get("compressed_len"), seq.finish_reason)


def refused(error: str) -> Result:
    nan = float("nan")
    return Result(-1, [], None, nan, nan, nan, 0, None, "error", error)


def pages_in(kv_cache_bytes: int, num_pages, cfg, page_size: int, dtype, kv_cache_dtype) -> int:
    """The pages of a pool of kv_cache_bytes (K and V of all layers, int8 scales included)."""
    if num_pages is not None:
        raise KVJaxError("give num_pages or kv_cache_bytes, not both")
    shapes = jax.eval_shape(lambda: PagedKVCache.for_model(cfg, 1, page_size, 1, dtype, kv_cache_dtype))
    num_pages = int(kv_cache_bytes) // shapes.page_bytes()
    if num_pages <= 0:
        raise KVJaxError(f"kv_cache_bytes={kv_cache_bytes} holds no page of {shapes.page_bytes()} bytes; "
                         "raise it or lower page_size")
    return num_pages
