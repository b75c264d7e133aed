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

MAX_LEN = 96
PROMPT_LENS = (5, 17, 33, 9, 40, 12)


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


def expected(model, cfg, prompt, max_new, method=None, image_len=0):
    """What one request alone gives: generate, or prefill + compress + generate_from."""
    cache = kvjax.KVCache.for_model(cfg, 1, MAX_LEN)
    if method is None:
        return kvjax.generate(model, cache, np.array([prompt]), max_new_tokens=max_new, eos_ids=()).tokens[0].tolist()
    logits, cache = kvjax.prefill(model, cache, np.array([prompt]))
    cache = kvjax.compress(cache, method, np.array([image_len]))
    return kvjax.generate_from(model, cache, logits, max_new_tokens=max_new, eos_ids=()).tokens[0].tolist()


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
    engine = Engine(model, page_size=8, max_num_seqs=4, max_model_len=MAX_LEN, decoding_batch_size=4,
                    prefill_batch_size=2, eos_ids=(), check_invariants=True)
    seqs = run_staggered(engine, [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, max_new)])
    for seq, prompt, n in zip(seqs, prompts, max_new):
        assert seq.output == expected(model, cfg, prompt, n)
    assert engine.allocator.num_used == 0  # everything returned
    engine.allocator.check()


def test_compressed_equals_prefill_compress_generate_from(tiny_llama, prompts, compressor):
    model, cfg = tiny_llama
    press = get_press("knorm", compression_ratio=0.5)
    cases = [(p, compressor if i % 3 == 0 else press if i % 3 == 1 else None, 8 if i % 3 == 0 else 0)
             for i, p in enumerate(prompts)]
    engine = Engine(model, page_size=4, max_num_seqs=6, max_model_len=MAX_LEN, eos_ids=(), check_invariants=True,
                    prefill_batch_size=3, compress_batch_size=2)
    requests = [Request(prompt=p, max_new_tokens=5, compression=m, image_len=il) for p, m, il in cases]
    seqs = run_staggered(engine, requests, arrive_every=1)
    for seq, (prompt, method, image_len) in zip(seqs, cases):
        assert seq.output == expected(model, cfg, prompt, 5, method, image_len), seq.request_id
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
    for seq, prompt in zip(sorted(engine.finished, key=lambda s: s.request_id), prompts):
        assert seq.output == expected(model, cfg, prompt, 4, compressor)


def test_preemption_when_decode_runs_out_of_pages(tiny_llama, prompts):
    model, cfg = tiny_llama
    # 6 pages of 4 slots: three 5-token prompts fit, but their decodes need more pages than exist.
    engine = Engine(model, page_size=4, num_pages=6, max_num_seqs=3, max_model_len=32, eos_ids=(),
                    check_invariants=True)
    results = engine.generate([Request(prompt=prompts[0], max_new_tokens=8) for _ in range(3)])
    want = expected(model, cfg, prompts[0], 8)
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
