"""Image chat glue for `kvjax.chat`: turns a conversation (plus an optional image, placed in the
first user turn) into prompt ids in the model's own format and input embeddings for prefill.

The chat loop itself stays the text loop: it runs the VLM's language model and passes
`embed(tokens)` as the prefill embeddings.
"""

from __future__ import annotations

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.multimodal import embed_prompt, expand_placeholder, image_prefix_len, render_llava


class VisionPrompter:
    """One image (or none) for a whole conversation with a LLaVA or MiniCPM-V model."""

    def __init__(self, model, tokenizer, cfg, model_dir, image=None):
        from kvjax.steps import split

        self.parts, self.tokenizer, self.cfg = split(model), tokenizer, cfg
        self.language_model = model.language_model
        self.family = type(cfg).__name__
        self.pixels = None if image is None else self._preprocess(image, model_dir)
        self.image_len = 0  # image prefix of the last prompt (see kvjax.multimodal)
        self._mask = None

    def _preprocess(self, image, model_dir):
        if self.family == "LlavaConfig":
            from kvjax.images import clip_pixel_values, load_clip_processor

            return clip_pixel_values([image], load_clip_processor(model_dir), self.cfg.vision.image_size)
        from kvjax.minicpmv_prompt import preprocess

        return preprocess(image, self.cfg)

    def encode(self, messages) -> list[int]:
        """Conversation -> prompt ids with the image placeholders expanded."""
        has_image = self.pixels is not None
        if self.family == "LlavaConfig":
            ids = self.tokenizer(render_llava(messages, has_image))["input_ids"]
            ids = expand_placeholder(ids, self.cfg.image_token_id, self.cfg.num_image_tokens, int(has_image))
            mask = [i == self.cfg.image_token_id for i in ids]
        else:
            from kvjax.minicpmv_prompt import chat_ids

            ids, mask = chat_ids(self.tokenizer, self.cfg, messages, self.pixels)
        self._mask = np.asarray(mask, bool)
        self.image_len = int(image_prefix_len(self._mask[None])[0])
        return list(ids)

    def embed(self, tokens: np.ndarray):
        """tokens int32 [1, T] (the last `encode`d ids, right-padded) -> embeds [1, T, H]."""
        if self._mask is None:
            raise KVJaxError("VisionPrompter.embed called before encode")
        mask = np.zeros(tokens.shape, bool)
        mask[0, :len(self._mask)] = self._mask
        vision = None
        if self.pixels is not None:
            vision = self.pixels if self.family == "LlavaConfig" else self.pixels.inputs
        return embed_prompt(self.parts, tokens, mask, vision)


def vision_prompter(model, tokenizer, cfg, model_dir, image=None) -> VisionPrompter | None:
    """A prompter for VLMs (configs with a `.text` LM config); None for text LMs."""
    if not hasattr(cfg, "text"):
        if image is not None:
            raise KVJaxError(f"{model_dir} holds a text-only model; --image needs a LLaVA or MiniCPM-V "
                             "directory (or try --demo llava)")
        return None
    return VisionPrompter(model, tokenizer, cfg, model_dir, image)
