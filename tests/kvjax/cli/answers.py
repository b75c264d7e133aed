"""What a chat turn must print, computed with the library directly (not through ChatSession):
the chat tests compare the session's (or the CLI's) answer with it, so a flag the session drops
changes the answer and shows."""

from __future__ import annotations

import numpy as np

import kvjax
from kvjax.prompts import bucket
from kvjax.vision import image_prefix_len


def prompt_arrays(session, messages):
    """The session's prompt for `messages` (its own encoding and image embedding: the prompt format
    is not what these tests check) -> (tokens int32 [1, T], length, embeds or None, image_len)."""
    ids, mask = session.encode(messages)
    tokens, image_mask = np.zeros((1, bucket(len(ids), smallest=64)), np.int32), np.zeros((1, 1), bool)
    tokens[0, :len(ids)] = ids
    embeds = None
    if session.prompter is not None:
        image_mask = np.zeros(tokens.shape, bool)
        image_mask[0, :len(ids)] = mask
        embeds = session.prompter.embed(tokens, image_mask, [session.pixels])
    return tokens, len(ids), embeds, int(image_prefix_len(image_mask)[0])


def reference_answer(session, messages, *, max_new_tokens: int, method=None, sampling=None, seed=None,
                     **options) -> tuple[str, int]:
    """-> (answer text, kv_len after the method) for the session's model (and its sampling and
    seed unless given): `kvjax.generate` without a method, else `kvjax.prefill_and_compress(method,
    **options)` (e.g. protect_image, rope_positions) then `kvjax.generate_from`; cut at the first
    EOS and decoded as chat decodes (skip_special_tokens)."""
    tokens, length, embeds, image_len = prompt_arrays(session, messages)
    cache = kvjax.KVCache.for_model(session.cfg, 1, session.max_tokens, session.cache_dtype)
    decoding = dict(max_new_tokens=max_new_tokens, sampling=session.sampling if sampling is None else sampling,
                    eos_ids=session.eos_ids, seed=session.seed if seed is None else seed)
    if method is None and not options:
        out = kvjax.generate(session.model, cache, tokens, [length], embeds, **decoding)
        kv_len = length
    else:
        logits, cache = kvjax.prefill_and_compress(session.model, cache, tokens, [length], embeds, method=method,
                                                   image_len=[image_len], **options)
        kv_len = int(cache.kv_len[0])
        out = kvjax.generate_from(session.model, cache, logits, **decoding)
    generated = [int(t) for t in out.tokens[0, :int(out.num_generated[0])]]
    stop = next((i for i, t in enumerate(generated) if t in session.eos_ids), len(generated))
    return session.tokenizer.decode(generated[:stop], skip_special_tokens=True), kv_len
