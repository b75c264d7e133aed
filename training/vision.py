"""The VLM side of training: image records -> prompt ids in the model's own format, and a batch's
context embeddings (vision tower + merge), computed outside the gradient (the backbone is frozen).

The family's `kvjax.vision` prompter does the work, as in chat; this adds the record's name to
errors. `image_len` (the image prefix, see kvjax.vision.prompt) feeds the decoupled compressor's
image/text split.
"""

from __future__ import annotations

import numpy as np

from kvjax.errors import KVJaxError
from kvjax.vision import image_prefix_len, prompter_for
from kvjax.vision.images import ImageError


class ImageContexts:
    """Encodes and embeds the contexts of one LLaVA or MiniCPM-V model."""

    def __init__(self, prompter):
        self.prompter = prompter

    def pixels(self, path, source: str):
        try:
            return self.prompter.pixels(path)
        except ImageError as e:
            raise KVJaxError(f"{source}: {e}") from None

    def prompt(self, question: str, image, source: str) -> tuple[list[int], int]:
        """First user turn (+ image path or None) -> (ids with placeholders expanded, image_len)."""
        pixels = None if image is None else self.pixels(image, source)  # unreadable files fail here
        ids, mask = self.prompter.encode([{"role": "user", "content": question}], pixels)
        return list(ids), int(image_prefix_len(np.asarray(mask)[None])[0])

    def embed(self, context: np.ndarray, examples):
        """context int32 [B, Tc] (collated; rows past len(examples) are padding) -> embeds [B, Tc, H]."""
        mask = np.zeros(context.shape, bool)
        images = []
        for row, ex in enumerate(examples):
            if ex.image is not None:
                mask[row, :len(ex.prompt) - 1] = self.prompter.image_mask(ex.prompt)[:-1]  # context = prompt[:-1]
                images.append(self.pixels(ex.image, str(ex.image)))
        return self.prompter.embed(context, mask, images)


def image_contexts(model, tokenizer, cfg, model_dir, has_images: bool) -> ImageContexts | None:
    """An ImageContexts for VLMs; None for text LMs, which refuse image data."""
    prompter = prompter_for(model, tokenizer, cfg, model_dir)
    if prompter is None:
        if has_images:
            raise KVJaxError(f"the data has images but {model_dir} holds a text-only model; train on a LLaVA or "
                             "MiniCPM-V directory (or --demo llava)")
        return None
    return ImageContexts(prompter)
