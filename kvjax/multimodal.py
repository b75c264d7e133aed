"""Multimodal prompts: token ids with image placeholders, merged embeddings, and `image_len`.

A batch of conversations (each with zero or one image) becomes one `MultimodalPrompt`, ready for
one prefill of the VLM's language model::

    prompt = build_llava_prompts(vlm, tokenizer, conversations, pixel_values)
    logits, cache = kvjax.prefill(vlm.language_model, cache, prompt.tokens, prompt.lengths,
                                  embeds=prompt.embeds)
    cache = compress(cache, ..., image_len=prompt.image_len)

What counts as the image prefix (`image_len`): for each row, the number of prompt positions from
the start of the prompt through the LAST image-feature position (its index + 1), or 0 for a row
without an image. Text before the image is part of the prefix: for LLaVA the BOS and "USER: "
ahead of the 576 `<image>` positions; for MiniCPM-V the ChatML header and the
`<image_id>..</image_id><image>` markers, and with slicing the `</image>`, `<slice>`, `</slice>`
markers and newlines between feature blocks. The marker closing the last feature block
(MiniCPM-V's `</image>` or `</slice>`) and everything after it is text. This is the split
FastCache's evaluation harness makes (image span = everything up to the end of the image block).
Prefilled into an empty cache, row b's image prefix is cache slots [0, image_len[b]).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from kvjax.errors import KVJaxError
from kvjax.prompts import bucket_len


@dataclasses.dataclass(frozen=True)
class MultimodalPrompt:
    tokens: np.ndarray  # int32 [B, T], right-padded; image placeholders expanded
    lengths: np.ndarray  # int32 [B], real tokens per row
    image_len: np.ndarray  # int32 [B], image prefix per row (see the module docstring)
    image_mask: np.ndarray  # bool [B, T], True where an image feature replaces the token embedding
    embeds: Any  # jax.Array [B, T, H], the LM's input embeddings with image features scattered in


def image_prefix_len(image_mask: np.ndarray) -> np.ndarray:
    """bool [B, T] -> int32 [B]: index of each row's last True + 1 (0 for rows with none)."""
    mask = np.asarray(image_mask, bool)
    last = mask.shape[1] - np.argmax(mask[:, ::-1], axis=1)
    return np.where(mask.any(axis=1), last, 0).astype(np.int32)


def render_llava(messages: Sequence[dict], has_image: bool) -> str:
    """LLaVA-1.5's chat template (llava-hf chat_template.json), the image in the first user turn.

    User turn: "USER: " + "<image>\\n" (if any) + text + " "; assistant turn: "ASSISTANT: " + text
    + " "; a system message is written as is; generation prompt "ASSISTANT:". One user question
    with an image renders to "USER: <image>\\n{question} ASSISTANT:".
    """
    if not messages or messages[-1]["role"] != "user":
        raise KVJaxError("a chat prompt must end with a user message")
    parts, image_pending = [], has_image
    for message in messages:
        role = message["role"]
        if role != "system":
            parts.append(role.upper() + ": ")
        if role == "user" and image_pending:
            parts.append("<image>\n")
            image_pending = False
        parts.append(message["content"] + " ")
    return "".join(parts) + "ASSISTANT:"


def expand_placeholder(ids: Sequence[int], token_id: int, count: int, num_expected: int) -> list[int]:
    """Repeat each `token_id` in ids `count` times; ids must hold exactly num_expected of them."""
    found = sum(1 for i in ids if i == token_id)
    if found != num_expected:
        raise KVJaxError(f"the prompt holds {found} image placeholder token(s) (id {token_id}) but "
                         f"{num_expected} image(s) were given; the tokenizer must keep '<image>' as one token")
    out: list[int] = []
    for i in ids:
        out.extend([i] * count if i == token_id else [i])
    return out


def pack(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], pad_id: int,
         length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad rows -> tokens int32 [B, T], lengths int32 [B], image_mask bool [B, T].

    T = `length` or bucket_len(longest row), so few prompt shapes compile.
    """
    longest = max(len(r) for r in rows)
    length = bucket_len(longest) if length is None else length
    if longest > length:
        raise KVJaxError(f"a prompt has {longest} tokens but the padded length is {length}")
    tokens = np.full((len(rows), length), pad_id, np.int32)
    image_mask = np.zeros((len(rows), length), bool)
    for b, (row, mask) in enumerate(zip(rows, masks)):
        tokens[b, :len(row)] = row
        image_mask[b, :len(row)] = mask
    return tokens, np.array([len(r) for r in rows], np.int32), image_mask


@functools.partial(jax.jit, static_argnums=(0,))
def _embed(graphdef, state, tokens, image_mask, vision_inputs):
    return nnx.merge(graphdef, state).embed_multimodal(tokens, image_mask, vision_inputs)


def embed_prompt(model, tokens, image_mask, vision_inputs):
    """Run the VLM's jitted `embed_multimodal` (vision tower + merge) -> embeds [B, T, H]."""
    from kvjax.steps import split

    parts = split(model)
    return _embed(parts.graphdef, parts.state, tokens, image_mask, vision_inputs)


def as_conversation(item) -> list[dict]:
    """A question string or a message list -> a message list."""
    return [{"role": "user", "content": item}] if isinstance(item, str) else list(item)


def check_one_image_entry_each(conversations, images) -> None:
    """A batch of prompts needs one image entry (or None) per conversation."""
    if len(conversations) != len(images):
        raise KVJaxError(f"{len(conversations)} conversations but {len(images)} image entries; "
                         "give one (or None) per conversation")


def build_llava_prompts(model, tokenizer, conversations: Sequence, pixel_values: Sequence,
                        *, length: int | None = None) -> MultimodalPrompt:
    """A batch of LLaVA prompts in one array.

    model: LlavaModel (or kvjax.split of one); conversations: per row a question string or a
    message list; pixel_values: per row an array [3, S, S] (from kvjax.images) or None (text
    only). Each image fills `cfg.num_image_tokens` positions where its `<image>` was.
    """
    cfg = model.cfg
    check_one_image_entry_each(conversations, pixel_values)
    rows, masks = [], []
    for conv, pixels in zip(conversations, pixel_values):
        has_image = pixels is not None
        ids = tokenizer(render_llava(as_conversation(conv), has_image))["input_ids"]
        ids = expand_placeholder(ids, cfg.image_token_id, cfg.num_image_tokens, int(has_image))
        rows.append(ids)
        masks.append([i == cfg.image_token_id for i in ids])
    pad_id = cfg.text.pad_token_id if cfg.text.pad_token_id is not None else 0
    tokens, lengths, image_mask = pack(rows, masks, pad_id, length)
    images = [np.asarray(p, np.float32) for p in pixel_values if p is not None]
    stacked = np.stack(images) if images else None
    embeds = embed_prompt(model, tokens, image_mask, stacked)
    return MultimodalPrompt(tokens=tokens, lengths=lengths, image_len=image_prefix_len(image_mask),
                            image_mask=image_mask, embeds=embeds)
