"""The live engine loop (submit from other threads, abort, graceful shutdown), sampled requests that
keep their tokens through preemption and batching, the compress batch limit, and the streaming
detokenizer's stop strings."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from inference.engine import Engine
from inference.live import EngineClosed, LiveEngine
from inference.paged_cache import PageAllocator
from inference.scheduler import Request, Scheduler, Sequence
from inference.text_stream import TextStream
from kvjax.compression.presses import get_press
from kvjax.sampling import Sampling

HOT = Sampling(temperature=1.0)


def engine_for(tiny_llama, num_pages):
    model, _ = tiny_llama
    return Engine(model, page_size=8, num_pages=num_pages, max_num_seqs=4, max_model_len=64, prefill_batch_size=2,
                  decoding_batch_size=4, eos_ids=(), check_invariants=True)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(4)
    return [rng.integers(3, 128, n).tolist() for n in (20, 14, 22)]


def test_sampled_tokens_survive_preemption_and_do_not_depend_on_the_batch(tiny_llama, prompts):
    requests = [Request(prompt=p, max_new_tokens=20, sampling=HOT, seed=11 + i) for i, p in enumerate(prompts)]
    roomy = engine_for(tiny_llama, 32).generate(requests)
    tight = engine_for(tiny_llama, 9).generate(requests)  # 3 x 5 pages wanted at the end: preemptions
    alone = [engine_for(tiny_llama, 32).generate([r])[0] for r in requests[:1]]
    assert sum(r.num_preempted for r in tight) > 0
    assert [r.token_ids for r in tight] == [r.token_ids for r in roomy]  # replayed, not re-sampled
    assert alone[0].token_ids == roomy[0].token_ids  # batched with others or alone: the same draws
    assert len({tuple(r.token_ids) for r in roomy}) == 3


def test_live_engine_streams_aborts_and_shuts_down(tiny_llama, prompts):
    live = LiveEngine(engine_for(tiny_llama, 32))
    events, finished = {}, threading.Event()

    def on_event(key):
        def record(event):
            events.setdefault(key, []).append(event)
            if event.result is not None and key == "short":
                finished.set()
        return record

    live.submit(Request(prompt=prompts[0], max_new_tokens=3), on_event("short"))
    assert finished.wait(120)
    streamed = [t for e in events["short"] for t in e.tokens]
    assert streamed == events["short"][-1].result.token_ids and len(streamed) == 3
    long = live.submit(Request(prompt=prompts[1], max_new_tokens=40), on_event("long"))
    while not events.get("long"):  # running: its first tokens arrived
        threading.Event().wait(0.01)
    long.abort()
    while events["long"][-1].result is None:
        threading.Event().wait(0.01)
    assert events["long"][-1].result.finish_reason == "abort"
    assert len([t for e in events["long"] for t in e.tokens]) < 40
    engine = live.engine
    assert engine.allocator.num_free == engine.allocator.num_pages and not engine.scheduler.has_work
    assert live.shutdown(drain_s=0.0) == {"finished": 0, "aborted": 0}  # nothing was left in flight
    with pytest.raises(EngineClosed):
        live.submit(Request(prompt=prompts[0], max_new_tokens=2), on_event("late"))


def test_shutdown_drains_or_aborts_what_is_in_flight(tiny_llama, prompts):
    for drain_s, reason in ((120.0, "length"), (0.0, "abort")):
        live = LiveEngine(engine_for(tiny_llama, 32))
        last = {}
        started = threading.Event()

        def record(event):
            started.set()
            if event.result is not None:
                last["result"] = event.result

        live.submit(Request(prompt=prompts[2], max_new_tokens=30), record)
        assert started.wait(120)
        counts = live.shutdown(drain_s=drain_s)
        assert last["result"].finish_reason == reason
        assert counts == ({"finished": 1, "aborted": 0} if reason == "length" else {"finished": 0, "aborted": 1})


def test_a_prefill_batch_holds_at_most_compress_batch_size_compressing_rows():
    allocator = PageAllocator(64, 8, 8)
    scheduler = Scheduler(allocator, max_pages_per_seq=8, prefill_batch_size=4, decoding_batch_size=4,
                          compress_batch_size=2)
    press = get_press("knorm", compression_ratio=0.5)
    for i, method in enumerate((press, press, press, None, press)):
        scheduler.add(Sequence(i, Request(prompt=[1] * 9, compression=method), [1] * 9))
    first = scheduler.schedule()
    assert [s.request_id for s in first.seqs] == [0, 1]  # the third compressing row waits for the next batch
    with pytest.raises(Exception, match="compress_batch_size"):
        Scheduler(allocator, max_pages_per_seq=8, prefill_batch_size=4, decoding_batch_size=4, compress_batch_size=0)


class CharTokenizer:
    """One character per token id (enough to test what the stream releases)."""

    @staticmethod
    def decode(ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_and_ends_before_it():
    stream = TextStream(CharTokenizer(), stop=["END", "\n\n"])
    pieces = [stream.feed([ord(c)]) for c in "ab E"]
    assert "".join(pieces) == "ab "  # "E" may begin "END": held back
    assert stream.feed([ord("x")]) == "Ex"  # it did not
    assert stream.feed([ord(c) for c in "yEN"]) == "y"
    assert stream.feed([ord("D"), ord("z")]) == "" and stream.stopped
    assert stream.text == "ab Exy" and stream.finish() == ""
    plain = TextStream(CharTokenizer())
    assert plain.feed([104, 0xFFFD]) == "h"  # an incomplete character waits
    assert plain.finish() == "\ufffd"


def test_a_restarted_sequence_replays_its_tokens_instead_of_the_sampled_ones():
    """After a preemption a sequence's earlier tokens are fed again whatever the sampler draws (on a
    device whose numerics vary with the batch shape a re-draw could differ from what was streamed)."""
    allocator = PageAllocator(8, 2, 8)
    scheduler = Scheduler(allocator, max_pages_per_seq=4, prefill_batch_size=1, decoding_batch_size=1)
    seq = Sequence(0, Request(prompt=[1] * 5, max_new_tokens=6), [1] * 5)
    scheduler.add(seq)
    scheduler.postprocess(scheduler.schedule(), [7], [5], 0.0)
    scheduler.postprocess(scheduler.schedule(), [8], None, 0.0)
    scheduler.preempt(seq)
    scheduler.postprocess(scheduler.schedule(), [70], [5], 0.0)  # the re-run draws other tokens
    scheduler.postprocess(scheduler.schedule(), [80], None, 0.0)
    scheduler.postprocess(scheduler.schedule(), [90], None, 0.0)
    assert seq.output == [7, 8, 90] and seq.num_preempted == 1


def test_text_stream_decodes_only_new_tokens_yet_equals_decoding_everything():
    """Token by token, the released text equals the whole answer decoded at once (a real BPE
    tokenizer, multi-byte characters split across tokens included), while each step decodes only
    a few tokens."""
    from kvjax import defaults
    from kvjax.loading.hf import load_tokenizer

    tokenizer = load_tokenizer(defaults.DEFAULT_MODEL)
    ids = tokenizer("In the beginning God created — the heaven and the earth. Café, naïve, 東京.")["input_ids"] * 3
    lengths = []
    decode = tokenizer.decode
    tokenizer.decode = lambda tokens, **kw: (lengths.append(len(tokens)), decode(tokens, **kw))[1]
    stream = TextStream(tokenizer)
    text = "".join(stream.feed([t]) for t in ids) + stream.finish()
    assert text == decode(ids, skip_special_tokens=True)
    assert max(lengths[-20:]) < 16  # late steps decode a short window, not the whole answer
