"""LLaVA-1.5 prompts: its chat template, the `<image>` placeholder expanded to the tower's
feature count, CLIP pixels from the directory's image processor."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.vision.images import clip_pixel_values, load_clip_processor
from kvjax.vision.prompt import Prompter


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


class LlavaPrompter(Prompter):
    """pixels: float32 [3, S, S]; the image is one `<image>` expanded to cfg.num_image_tokens ids."""

    _processor = None

    def pixels(self, image):
        if self._processor is None:  # read once, from the model directory's preprocessor_config.json
            self._processor = load_clip_processor(self.model_dir)
        return clip_pixel_values([image], self._processor, self.cfg.vision.image_size)[0]

    def encode(self, messages, pixels=None) -> tuple[list[int], np.ndarray]:
        has_image = pixels is not None
        ids = self.tokenizer(render_llava(messages, has_image))["input_ids"]
        ids = expand_placeholder(ids, self.cfg.image_token_id, self.cfg.num_image_tokens, int(has_image))
        return ids, self.image_mask(ids)

    def image_mask(self, ids) -> np.ndarray:
        return np.asarray(ids) == self.cfg.image_token_id

    def vision_inputs(self, pixels: Sequence):
        return np.stack([np.asarray(p, np.float32) for p in pixels])
