"""The engine against sequential kvjax.generate / prefill + compress + generate_from (greedy),
under continuous batching with staggered arrivals; page accounting checked after every step."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compressors import CompressorConfig, build_compressor
from kvjax.presses import get_press

MAX_LEN = 64
PROMPT_LENS = (5, 17, 30, 9, 28, 12)  # two prompt buckets (16, 32): few compiles


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 128, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def compressor(tiny_llama):
    _, cfg = tiny_llama
    import flax.nnx as nnx

    return build_compressor(CompressorConfig(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                             head_dim=cfg.head_dim, compression_factor=4, min_seq_len=2),
                            rngs=nnx.Rngs(3))


def expected(model, cfg, prompts, max_new, method=None, image_len=0):
    """What each request gives on its own: generate, or prefill + compress + generate_from. One
    right-padded batch (rows are independent) with max(max_new) steps, cut to each row's max_new."""
    max_new = [max_new] * len(prompts) if isinstance(max_new, int) else max_new
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = kvjax.KVCache.for_model(cfg, len(prompts), MAX_LEN)
    if method is None:
        out = kvjax.generate(model, cache, tokens, lengths, max_new_tokens=max(max_new), eos_ids=()).tokens
    else:
        logits, cache = kvjax.prefill(model, cache, tokens, lengths)
        cache = kvjax.compress(cache, method, np.full(len(prompts), image_len, np.int32))
        out = kvjax.generate_from(model, cache, logits, max_new_tokens=max(max_new), eos_ids=()).tokens
    return [row[:n].tolist() for row, n in zip(out, max_new)]


def run_staggered(engine, requests, arrive_every=2):
    """Add one request every `arrive_every` steps (continuous batching), then drain."""
    ids, pending, steps = [], list(requests), 0
    while pending or engine.scheduler.has_work:
        if pending and steps % arrive_every == 0:
            ids.append(engine.add_request(pending.pop(0)))
        engine.step()
        steps += 1
    by_id = {s.request_id: s for s in engine.finished}
    return [by_id[i] for i in ids]


def test_uncompressed_equals_generate_under_staggered_arrivals(tiny_llama, prompts):
    model, cfg = tiny_llama
    max_new = [6, 3, 8, 5, 7, 4]
    engine = Engine(model, page_size=16, max_num_seqs=4, max_model_len=MAX_LEN, decoding_batch_size=4,
                    prefill_batch_size=2, eos_ids=(), check_invariants=True)
    seqs = run_staggered(engine, [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, max_new)])
    assert [s.output for s in seqs] == expected(model, cfg, prompts, max_new)
    assert engine.allocator.num_used == 0  # everything returned
    engine.allocator.check()


def test_compressed_equals_prefill_compress_generate_from(tiny_llama, prompts, compressor):
    model, cfg = tiny_llama
    press = get_press("knorm", compression_ratio=0.5)
    methods = [compressor, press, None] * 2
    engine = Engine(model, page_size=4, max_num_seqs=6, max_model_len=MAX_LEN, eos_ids=(), check_invariants=True,
                    prefill_batch_size=3, compress_batch_size=2)
    requests = [Request(prompt=p, max_new_tokens=5, compression=m, image_len=8 if m is compressor else 0)
                for p, m in zip(prompts, methods)]
    seqs = run_staggered(engine, requests, arrive_every=1)
    for method, image_len in ((compressor, 8), (press, 0), (None, 0)):
        rows = [i for i, m in enumerate(methods) if m is method]
        want = expected(model, cfg, [prompts[i] for i in rows], 5, method, image_len)
        assert [seqs[i].output for i in rows] == want
    assert engine.stats["steps"]["compress"] >= 2
    assert engine.stats["pages_freed_by_compression"] > 0


def test_pages_freed_by_compression_are_reused_and_exhaustion_queues(tiny_llama, compressor):
    model, cfg = tiny_llama
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 128, 40).tolist() for _ in range(6)]
    # 12 pages of 8 slots: one 40-token prompt takes 5 pages, so only two fit before compression
    # (CF 4 leaves 10 tokens = 2 pages); the rest must queue, then reuse the freed pages.
    engine = Engine(model, page_size=8, num_pages=12, max_num_seqs=4, max_model_len=64, eos_ids=(),
                    check_invariants=True)
    seen_pages = []
    for p in prompts:
        engine.add_request(Request(prompt=p, max_new_tokens=4, compression=compressor))
    while engine.scheduler.has_work:
        assert engine.allocator.num_used <= 12
        engine.step()
        seen_pages.append({s.request_id: list(engine.allocator.pages[s.slot]) for s in engine.scheduler.running})
    assert engine.stats["pages_freed_by_compression"] >= 6 * 3
    assert len(engine.finished) == 6 and engine.allocator.num_used == 0
    owners = {}  # a page held by two different requests over the run = reuse
    for snapshot in seen_pages:
        for rid, pages in snapshot.items():
            for page in pages:
                owners.setdefault(page, set()).add(rid)
    assert any(len(ids) > 1 for ids in owners.values())
    outputs = [s.output for s in sorted(engine.finished, key=lambda s: s.request_id)]
    assert outputs == expected(model, cfg, prompts, 4, compressor)


def test_preemption_when_decode_runs_out_of_pages(tiny_llama, prompts):
    model, cfg = tiny_llama
    # 6 pages of 4 slots: three 5-token prompts fit, but their decodes need more pages than exist.
    engine = Engine(model, page_size=4, num_pages=6, max_num_seqs=3, max_model_len=32, eos_ids=(),
                    check_invariants=True)
    results = engine.generate([Request(prompt=prompts[0], max_new_tokens=8) for _ in range(3)])
    want = expected(model, cfg, prompts[:1], 8)[0]
    assert all(r.token_ids == want for r in results)
    assert sum(r.num_preempted for r in results) > 0
    assert all(r.ttft_s >= 0 and r.tpot_s >= 0 for r in results)


def test_text_prompts_and_errors(tiny_llama):
    model, _ = tiny_llama
    engine = Engine(model, page_size=8, max_num_seqs=2, max_model_len=32, eos_ids=())
    with pytest.raises(kvjax.KVJaxError, match="tokenizer"):
        engine.add_request(Request(prompt="hello"))
    with pytest.raises(kvjax.KVJaxError, match="never fits"):
        engine.add_request(Request(prompt=list(range(3, 40))))
