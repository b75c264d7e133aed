"""Image requests: the engine serving a tiny random LLaVA through its language model, each request
carrying its prompt's embeddings (image features scattered in), equals kvjax.generate and
prefill + CCM compress + generate_from with the same embeddings (greedy), preemption included."""

from __future__ import annotations

import numpy as np
import pytest

import kvjax
from inference.engine import Engine
from inference.scheduler import Request
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.vision.prompt import embed_prompt, image_prefix_len, pack

MAX_LEN, MAX_NEW = 64, 6


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    """(model, cfg, tokens [2, T], lengths [2], embeds [2, T, H], image_len [2]): two prompts with
    text around the image; 30 and 28 tokens, so each owns 4 pages of 8 before decoding."""
    from kvjax.testing.vlm import write_vlm_checkpoint

    path = write_vlm_checkpoint(tmp_path_factory.mktemp("vlm") / "llava", "llava", init_std=0.1)
    model, _, cfg = kvjax.load(path, dtype="float32", tokenizer=False)
    rng = np.random.default_rng(0)
    image, num_image = cfg.image_token_id, cfg.num_image_tokens
    rows = [[1, *rng.integers(3, 200, before)] + [image] * num_image + list(rng.integers(3, 200, after))
            for before, after in ((3, 30 - 4 - num_image), (2, 28 - 3 - num_image))]
    tokens, lengths, mask = pack(rows, [[t == image for t in row] for row in rows], pad_id=0, length=32)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((2, 3, size, size)).astype(np.float32)
    embeds = np.asarray(embed_prompt(model, tokens, mask, pixels))
    return model, cfg, tokens, lengths, embeds, image_prefix_len(mask)


def requests(vlm, **options):
    _, _, tokens, lengths, embeds, image_len = vlm
    return [Request(prompt=tokens[b, :n].tolist(), embeds=embeds[b, :n], image_len=int(image_len[b]),
                    max_new_tokens=MAX_NEW, **options) for b, n in enumerate(lengths)]


def reference(vlm, method, **options):
    """prefill with the embeddings (+ compress) + generate_from: one decode compile for all."""
    model, cfg, tokens, lengths, embeds, image_len = vlm
    logits, cache = kvjax.prefill(model.language_model, kvjax.KVCache.for_model(cfg.text, 2, MAX_LEN), tokens,
                                  lengths, embeds=embeds)
    if method is not None:
        cache = kvjax.compress(cache, method, image_len, **options)
    return kvjax.generate_from(model.language_model, cache, logits, max_new_tokens=MAX_NEW, eos_ids=()).tokens


def test_image_requests_equal_generate_and_ccm_compress(vlm):
    model, cfg, _, lengths, _, _ = vlm
    compressor = build_compressor(CompressorConfig.for_model(cfg.text, compression_factor=4))
    # 9 pages: both prompts fit (4 + 4, one left for the watermark); past slot 32 each needs a fifth, 10 > 9 ->
    # the younger is preempted and restarts from its embeds.
    engine = Engine(model, page_size=8, num_pages=9, max_num_seqs=2, max_model_len=MAX_LEN, prefill_batch_size=2,
                    decoding_batch_size=2, eos_ids=(), check_invariants=True)
    plain = engine.generate(requests(vlm))
    ccm = engine.generate(requests(vlm, compression=compressor))
    want, want_ccm = (reference(vlm, method) for method in (None, compressor))
    assert [r.token_ids for r in plain] == want.tolist()
    assert sum(r.num_preempted for r in plain) > 0  # the preempted request restarted from its embeds
    assert [r.token_ids for r in ccm] == want_ccm.tolist()
    assert all(r.compressed_len < n for r, n in zip(ccm, lengths))


def test_embeds_must_match_the_model_and_the_prompt(vlm):
    model, cfg, tokens, lengths, embeds, _ = vlm
    engine = Engine(model, page_size=8, num_pages=4, max_num_seqs=1, max_model_len=32)
    with pytest.raises(kvjax.KVJaxError, match="hidden size"):
        engine.add_request(Request(embeds=embeds[0, :, :8]))
    with pytest.raises(kvjax.KVJaxError, match="one embedding per prompt token"):
        engine.add_request(Request(prompt=[1, 2, 3], embeds=embeds[0]))
    assert engine.add_request(Request(embeds=embeds[0, :lengths[0]])) == 0  # prompt ids are optional


def test_a_press_with_image_protection_keeps_the_image_as_on_the_dense_cache(vlm):
    """protect_image=True: the press spends its budget on the text only, as kvjax.compress does."""
    from kvjax.compression.presses import get_press

    model, _, _, lengths, _, image_len = vlm
    press = get_press("knorm", compression_ratio=0.25)
    engine = Engine(model, page_size=8, num_pages=16, max_num_seqs=2, max_model_len=MAX_LEN, prefill_batch_size=2,
                    decoding_batch_size=2, eos_ids=(), check_invariants=True)
    kept = engine.generate(requests(vlm, compression=press, protect_image=True))
    dropped = engine.generate(requests(vlm, compression=press))
    assert [r.token_ids for r in kept] == reference(vlm, press, protect_image=True).tolist()
    assert [r.token_ids for r in dropped] == reference(vlm, press).tolist()
    assert [r.token_ids for r in kept] != [r.token_ids for r in dropped]  # the protection changed what was kept
