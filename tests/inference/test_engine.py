"""The engine against sequential kvjax.generate / prefill + compress + generate_from (greedy),
under continuous batching with staggered arrivals; page accounting checked after every step.

One engine serves the whole module (its jitted steps compile once per bucketed shape, whatever the
test), with a small pool that forces queuing and preemption: 8 pages of 8 slots, 4 sequence slots.
Expected outputs come from batched reference runs shared by the tests."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.compression.presses import compute_n_kept, get_press
from kvjax.compression.int8 import dequantize_cache, quantize_cache

MAX_LEN = 64
PROMPT_LENS = (5, 17, 30, 9, 28, 12)  # two prompt buckets (16, 32): few compiles
LONG_LEN, NUM_LONG = 32, 6  # prompts that need 4 of the 8 pages each before compression
NUM_PAGES, PAGE_SIZE = 8, 8


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(3, 128, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def long_prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(3, 128, LONG_LEN).tolist() for _ in range(NUM_LONG)]


@pytest.fixture(scope="module")
def compressor(tiny_llama):
    _, cfg = tiny_llama
    import flax.nnx as nnx

    return build_compressor(CompressorConfig(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                                             head_dim=cfg.head_dim, compression_factor=4, min_seq_len=2),
                            rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def press():
    return get_press("knorm", compression_ratio=0.5)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    model, _ = tiny_llama
    return Engine(model, page_size=PAGE_SIZE, num_pages=NUM_PAGES, max_num_seqs=4, max_model_len=MAX_LEN,
                  prefill_batch_size=2, decoding_batch_size=4, eos_ids=(),
                  check_invariants=True)


def expected(model, cfg, prompts, max_new, method=None, image_len=0, layer_lens=None, int8=False):
    """What each request gives on its own: generate, or prefill (recording what a press reads) +
    compress + generate_from. One right-padded batch (rows are independent) with max_new steps;
    image_len: int or per row; layer_lens: a list that gets the compressed [L, B] lengths;
    int8: an int8 cache, dequantized to compress and quantized again (as the engine's int8 pages)."""
    tokens = np.zeros((len(prompts), max(map(len, prompts))), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = kvjax.KVCache.for_model(cfg, len(prompts), MAX_LEN)
    if int8:
        cache = quantize_cache(cache)
    if method is None:
        out = kvjax.generate(model, cache, tokens, lengths, max_new_tokens=max_new, eos_ids=()).tokens
    else:
        image_len = np.broadcast_to(np.asarray(image_len, np.int32), len(prompts))
        if int8:  # as the engine's int8 pages: dequantized to compress, quantized again
            logits, cache = kvjax.prefill(model, cache, tokens, lengths)
            cache = quantize_cache(kvjax.compress(dequantize_cache(cache), method, image_len))
        else:
            logits, cache = kvjax.prefill_and_compress(model, cache, tokens, lengths, method=method,
                                                       image_len=image_len)
        if layer_lens is not None:
            layer_lens.append(np.asarray(cache.lengths_per_layer()))
        out = kvjax.generate_from(model, cache, logits, max_new_tokens=max_new, eos_ids=()).tokens
    return [row.tolist() for row in out]


@pytest.fixture(scope="module")
def want(tiny_llama, prompts, long_prompts, compressor, press):
    """Reference tokens (8 per row, tests cut them): 'plain' per prompt; 'ccm' and 'knorm' per
    prompt (CCM with image_len 8), then 'ccm' per long prompt (image_len 0)."""
    model, cfg = tiny_llama
    both = prompts + long_prompts  # same batch shape for both methods: one prefill / decode compile
    return {"plain": expected(model, cfg, prompts, 8),
            "ccm": expected(model, cfg, both, 8, compressor, [8] * len(prompts) + [0] * NUM_LONG),
            "knorm": expected(model, cfg, both, 8, press)[:len(prompts)]}


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


def test_uncompressed_equals_generate_under_staggered_arrivals(engine, prompts, want):
    max_new = [6, 3, 8, 5, 7, 4]
    seqs = run_staggered(engine, [Request(prompt=p, max_new_tokens=n) for p, n in zip(prompts, max_new)])
    assert [s.output for s in seqs] == [row[:n] for row, n in zip(want["plain"], max_new)]
    assert engine.allocator.num_used == 0  # everything returned
    engine.allocator.check()


def test_compressed_equals_prefill_compress_generate_from(engine, prompts, compressor, press, want):
    methods = [compressor, press, None] * 2
    compress_steps, freed = engine.stats["steps"]["compress"], engine.stats["pages_freed_by_compression"]
    requests = [Request(prompt=p, max_new_tokens=5, compression=m, image_len=8 if m is compressor else 0)
                for p, m in zip(prompts, methods)]
    seqs = run_staggered(engine, requests, arrive_every=1)
    for method, name in ((compressor, "ccm"), (press, "knorm"), (None, "plain")):
        rows = [i for i, m in enumerate(methods) if m is method]
        assert [seqs[i].output for i in rows] == [want[name][i][:5] for i in rows]
    assert engine.stats["steps"]["compress"] - compress_steps >= 2
    assert engine.stats["pages_freed_by_compression"] > freed


def test_pages_freed_by_compression_are_reused_and_exhaustion_queues(engine, long_prompts, compressor, want):
    # 8 pages of 8 slots: one 32-token prompt takes 4 pages, so only two fit before compression
    # (CF 4 leaves 8 tokens = 1 page, freeing 3); the rest must queue, then reuse the freed pages.
    freed, first_id = engine.stats["pages_freed_by_compression"], engine.num_requests
    seen_pages = []
    for p in long_prompts:
        engine.add_request(Request(prompt=p, max_new_tokens=4, compression=compressor))
    while engine.scheduler.has_work:
        assert engine.allocator.num_used <= NUM_PAGES
        engine.step()
        seen_pages.append({s.request_id: list(engine.allocator.pages[s.slot]) for s in engine.scheduler.running})
    assert engine.stats["pages_freed_by_compression"] - freed >= NUM_LONG * 3
    finished = sorted((s for s in engine.finished if s.request_id >= first_id), key=lambda s: s.request_id)
    assert len(finished) == NUM_LONG and engine.allocator.num_used == 0
    owners = {}  # a page held by two different requests over the run = reuse
    for snapshot in seen_pages:
        for rid, pages in snapshot.items():
            for page in pages:
                owners.setdefault(page, set()).add(rid)
    assert any(len(ids) > 1 for ids in owners.values())
    assert [s.output for s in finished] == [row[:4] for row in want["ccm"][len(PROMPT_LENS):]]


def test_preemption_when_decode_runs_out_of_pages(engine, prompts, want):
    # Three 12-token prompts take 2 pages each (the watermark leaves 2 free for them to grow into); decodes
    # past slot 16 need a third page each, 9 > 8: the youngest gives its pages back and restarts.
    results = engine.generate([Request(prompt=prompts[5], max_new_tokens=8) for _ in range(3)])
    assert all(r.token_ids == want["plain"][5] and r.finish_reason == "length" for r in results)
    assert sum(r.num_preempted for r in results) > 0
    for r in results:  # arrival -> first token -> last token, the per-token time spread over the rest
        assert 0 < r.ttft_s <= r.latency_s and r.tpot_s > 0
        assert r.latency_s == pytest.approx(r.ttft_s + r.tpot_s * (len(r.token_ids) - 1), rel=1e-9, abs=1e-12)


def test_admission_keeps_a_watermark_so_prompts_that_fill_the_pool_run_one_by_one(engine, prompts, want):
    # Two 28-token prompts take 4 pages each, all 8: admitting both would leave no page to grow into, and
    # the first decode past slot 32 would preempt one of them; the watermark queues the second instead.
    results = engine.generate([Request(prompt=prompts[4], max_new_tokens=8) for _ in range(2)])
    assert all(r.token_ids == want["plain"][4] for r in results)
    assert [r.num_preempted for r in results] == [0, 0]


def test_a_request_larger_than_the_pool_ends_with_length_instead_of_restarting_forever(tiny_llama, long_prompts):
    # A pool of 6 pages of 8 (48 slots) under a 64-slot sequence limit: 32 + 40 tokens never fit. Alone
    # it holds all 6 pages; it stops there with "length" instead of preempting itself and re-prefilling.
    model, cfg = tiny_llama
    engine = Engine(model, page_size=PAGE_SIZE, num_pages=6, max_num_seqs=4, max_model_len=MAX_LEN,
                    prefill_batch_size=2, decoding_batch_size=4, eos_ids=(), check_invariants=True)
    [result] = engine.generate([Request(prompt=long_prompts[0], max_new_tokens=40)])
    reference = kvjax.generate(model, kvjax.KVCache.for_model(cfg, 1, MAX_LEN), [long_prompts[0]],
                               max_new_tokens=40, eos_ids=()).tokens[0].tolist()
    assert result.finish_reason == "length" and result.num_preempted == 0
    assert result.token_ids == reference[:6 * PAGE_SIZE - LONG_LEN + 1]
    assert engine.stats["steps"]["prefill"] == 1 and not engine.scheduler.has_work


def test_a_bad_request_gets_its_own_error_and_loses_no_other_result(engine, prompts, want):
    results = engine.generate([Request(prompt=prompts[0], max_new_tokens=8),
                               Request(prompt=prompts[1], max_new_tokens=0, arrival_s=30.0),
                               Request(prompt=list(range(3, 3 + MAX_LEN)), max_new_tokens=2)])
    assert results[0].token_ids == want["plain"][0] and results[0].error is None
    assert results[1].finish_reason == "error" and "max_new_tokens must be > 0" in results[1].error
    assert results[2].finish_reason == "error" and "never fits" in results[2].error
    assert not results[1].token_ids and not results[2].token_ids


def test_text_prompts_and_errors(engine):
    with pytest.raises(kvjax.KVJaxError, match="tokenizer"):
        engine.add_request(Request(prompt="hello"))
    with pytest.raises(kvjax.KVJaxError, match="never fits"):
        engine.add_request(Request(prompt=list(range(3, 3 + MAX_LEN))))


def test_presses_that_read_the_prefill_equal_prefill_and_compress(engine, tiny_llama, prompts):
    # A 5-token prompt pads to 16 tokens but owns one page of 8: observed attention spans the padding.
    model, cfg = tiny_llama
    snapkv = get_press("snapkv", compression_ratio=0.5, window_size=4)
    observed = get_press("observed_attention", compression_ratio=0.5)
    chosen = {snapkv: [0, 5], observed: [3, 0]}  # prompts of 5, 12, 9 tokens: one prompt bucket
    requests = [Request(prompt=prompts[i], max_new_tokens=4, compression=press)
                for pair in zip(*([(press, i) for i in rows] for press, rows in chosen.items())) for press, i in pair]
    seqs = run_staggered(engine, requests, arrive_every=3)  # one prefill row: fewer compiles
    for press, rows in chosen.items():
        got = [s for s in seqs if s.request.compression is press]
        assert [s.output for s in got] == expected(model, cfg, [prompts[i] for i in rows], 4, press)
        assert [s.times["compressed_len"] for s in got] == [compute_n_kept(PROMPT_LENS[i], 0.5) for i in rows]
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("press", [get_press("pyramidkv", compression_ratio=0.5, window_size=2),
                                   get_press("l2_compress", keep_ratio=0.5, prune_after=0, skip_layers=(0,))])
def test_per_layer_budgets_equal_prefill_and_compress(engine, tiny_llama, prompts, press):
    # Each layer keeps its own number of tokens; the sequence keeps pages for the longest layer.
    model, cfg = tiny_llama
    rows = [1, 4, 2]  # 17, 28 and 30 tokens: one prompt bucket
    layer_lens = []
    want = expected(model, cfg, [prompts[i] for i in rows], 5, press, layer_lens=layer_lens)
    assert (layer_lens[0] != layer_lens[0][0]).any()  # the budgets do differ between layers
    freed = engine.stats["pages_freed_by_compression"]
    seqs = run_staggered(engine, [Request(prompt=prompts[i], max_new_tokens=5, compression=press) for i in rows])
    assert [s.output for s in seqs] == want
    longest = layer_lens[0].max(axis=0).tolist()
    assert [s.times["compressed_len"] for s in seqs] == longest
    pages = engine.allocator.pages_for
    assert engine.stats["pages_freed_by_compression"] - freed == sum(
        pages(PROMPT_LENS[i]) - pages(n) for i, n in zip(rows, longest))
    assert engine.allocator.num_used == 0
