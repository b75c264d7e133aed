"""The VLM side of training: image records -> prompt ids in the model's own format, and a batch's
context embeddings (vision tower + merge), computed outside the gradient (the backbone is frozen).

One family-neutral path: LLaVA and MiniCPM-V differ only in how a prompt is rendered and which
positions the image features fill (kvjax.multimodal, kvjax.minicpmv_prompt). `image_len` (the
image prefix, see kvjax.multimodal) feeds the decoupled compressor's image/text split.
"""

from __future__ import annotations

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.images import ImageError
from kvjax.multimodal import embed_prompt, expand_placeholder, image_prefix_len, render_llava


class ImageContexts:
    """Encodes and embeds the contexts of one LLaVA or MiniCPM-V model."""

    def __init__(self, model, tokenizer, cfg, model_dir):
        from kvjax.steps import split  # noqa: PLC0415

        self.parts, self.tokenizer, self.cfg = split(model), tokenizer, cfg
        self.is_llava = type(cfg).__name__ == "LlavaConfig"
        if self.is_llava:
            from kvjax.images import load_clip_processor  # noqa: PLC0415

            self.processor = load_clip_processor(model_dir)

    def pixels(self, path, source: str):
        """One image file -> the tower's input (LLaVA: [3, S, S]; MiniCPM-V: a MiniCPMVImage)."""
        try:
            if self.is_llava:
                from kvjax.images import clip_pixel_values  # noqa: PLC0415

                return clip_pixel_values([path], self.processor, self.cfg.vision.image_size)[0]
            from kvjax.minicpmv_prompt import preprocess  # noqa: PLC0415

            return preprocess(path, self.cfg)
        except ImageError as e:
            raise KVJaxError(f"{source}: {e}") from None

    def prompt(self, question: str, image, source: str) -> tuple[list[int], int]:
        """First user turn (+ image path or None) -> (ids with placeholders expanded, image_len)."""
        messages = [{"role": "user", "content": question}]
        if self.is_llava:
            if image is not None:
                self.pixels(image, source)  # unreadable files fail here, naming the entry
            ids = self.tokenizer(render_llava(messages, image is not None))["input_ids"]
            ids = expand_placeholder(ids, self.cfg.image_token_id, self.cfg.num_image_tokens, int(image is not None))
        else:
            from kvjax.minicpmv_prompt import chat_ids  # noqa: PLC0415

            pixels = None if image is None else self.pixels(image, source)
            ids, _ = chat_ids(self.tokenizer, self.cfg, messages, pixels)
        ids = list(ids)
        return ids, int(image_prefix_len(self.image_mask(ids)[None])[0])

    def image_mask(self, ids) -> np.ndarray:
        """Prompt ids -> bool [T], True where an image feature replaces the token embedding."""
        ids = np.asarray(ids)
        if self.is_llava:
            return ids == self.cfg.image_token_id
        from kvjax.minicpmv_prompt import image_bounds  # noqa: PLC0415

        mask = np.zeros(len(ids), bool)
        for start, end in image_bounds(ids, self.tokenizer):
            mask[start:end] = True
        return mask

    def embed(self, context: np.ndarray, examples):
        """context int32 [B, Tc] (collated; rows past len(examples) are padding) -> embeds [B, Tc, H]."""
        mask = np.zeros(context.shape, bool)
        images = []
        for row, ex in enumerate(examples):
            if ex.image is not None:
                mask[row, :len(ex.prompt) - 1] = self.image_mask(ex.prompt)[:-1]  # the context is prompt[:-1]
                images.append(self.pixels(ex.image, str(ex.image)))
        if not images:
            vision = None
        elif self.is_llava:
            vision = np.stack(images)
        else:
            from kvjax.minicpmv_prompt import vision_inputs  # noqa: PLC0415

            vision = vision_inputs(images, self.cfg)
        return embed_prompt(self.parts, context, mask, vision)


def image_contexts(model, tokenizer, cfg, model_dir, has_images: bool) -> ImageContexts | None:
    """An ImageContexts for VLMs (configs with `.text`); None for text LMs, which refuse image data."""
    if not hasattr(cfg, "text"):
        if has_images:
            raise KVJaxError(f"the data has images but {model_dir} holds a text-only model; train on a LLaVA or "
                             "MiniCPM-V directory (or --demo llava)")
        return None
    return ImageContexts(model, tokenizer, cfg, model_dir)
