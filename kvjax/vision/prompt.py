"""Multimodal prompts: token ids with image placeholders, merged embeddings, and `image_len`.

A batch of conversations (each with zero or one image) becomes one `MultimodalPrompt`, ready for
one prefill of the VLM's language model::

    prompter = kvjax.vision.prompter_for(vlm, tokenizer, cfg, model_dir)
    prompt = prompter.build(conversations, [prompter.pixels(path) for path in image_paths])
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
from kvjax.prompts import bucket
from kvjax.steps import split


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


def pack(rows: Sequence[Sequence[int]], masks: Sequence[Sequence[bool]], pad_id: int,
         length: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pad rows -> tokens int32 [B, T], lengths int32 [B], image_mask bool [B, T].

    T = `length` or bucket(longest row, smallest=64), so few prompt shapes compile.
    """
    longest = max(len(r) for r in rows)
    length = bucket(longest, smallest=64) if length is None else length
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


class Prompter:
    """One VLM family's prompt format, used alike by chat, training, evaluation and the engine:
    images -> tower inputs, a conversation -> ids with the image placeholders expanded and the mask
    of the positions image features fill, and prompts -> LM input embeddings. Subclasses (one per
    family) implement pixels, encode, image_mask and vision_inputs."""

    def __init__(self, model, tokenizer, cfg, model_dir=None):
        self.parts, self.tokenizer, self.cfg, self.model_dir = split(model), tokenizer, cfg, model_dir

    def pixels(self, image):
        """A path or PIL image -> this family's tower input for that one image."""
        raise NotImplementedError

    def encode(self, messages, pixels=None) -> tuple[list[int], np.ndarray]:
        """Conversation (+ one image for its first user turn) -> (ids, image_mask bool [T])."""
        raise NotImplementedError

    def image_mask(self, ids) -> np.ndarray:
        """Prompt ids -> bool [T], True where an image feature replaces the token embedding."""
        raise NotImplementedError

    def vision_inputs(self, pixels: Sequence):
        """The tower inputs of several images (in prompt order) as `embed_multimodal` takes them."""
        raise NotImplementedError

    def embed(self, tokens, image_mask, pixels: Sequence = ()):
        """tokens int32 [B, T], image_mask bool [B, T], the batch's images in order -> embeds [B, T, H]."""
        return embed_prompt(self.parts, tokens, image_mask, self.vision_inputs(pixels) if len(pixels) else None)

    def build(self, conversations: Sequence, images: Sequence, *, length: int | None = None) -> MultimodalPrompt:
        """A batch of prompts in one array: per row a question string or message list, and its
        image's `pixels(...)` or None (text only)."""
        check_one_image_entry_each(conversations, images)
        rows, masks = zip(*(self.encode(as_conversation(c), p) for c, p in zip(conversations, images)))
        pad_id = self.cfg.text.pad_token_id if self.cfg.text.pad_token_id is not None else 0
        tokens, lengths, image_mask = pack(rows, masks, pad_id, length)
        embeds = self.embed(tokens, image_mask, [p for p in images if p is not None])
        return MultimodalPrompt(tokens=tokens, lengths=lengths, image_len=image_prefix_len(image_mask),
                                image_mask=image_mask, embeds=embeds)
