"""Images and VLM prompts: `images` turns files into pixels; one `Prompter` per VLM family builds
prompt ids, the image mask, `image_len` and the LM's input embeddings, for chat, training,
evaluation and the engine alike.

    prompter = kvjax.vision.prompter_for(model, tokenizer, cfg, model_dir)   # None for a text LM
    prompt = prompter.build(["What is in the image?"], [prompter.pixels("cat.png")])
    logits, cache = kvjax.prefill(model.language_model, cache, prompt.tokens, prompt.lengths,
                                  embeds=prompt.embeds)
"""

from __future__ import annotations

from kvjax.errors import KVJaxError
from kvjax.models.llava import LlavaConfig
from kvjax.models.minicpmv import MiniCPMVConfig
from kvjax.vision.llava import LlavaPrompter
from kvjax.vision.minicpmv import MiniCPMVPrompter
from kvjax.vision.prompt import MultimodalPrompt, Prompter, image_prefix_len

PROMPTERS = {LlavaConfig: LlavaPrompter, MiniCPMVConfig: MiniCPMVPrompter}


def prompter_for(model, tokenizer, cfg, model_dir=None) -> Prompter | None:
    """The prompter of a VLM's family, or None for a text LM."""
    cls = PROMPTERS.get(type(cfg))
    if cls is None:
        if hasattr(cfg, "text"):
            raise KVJaxError(f"no prompt format for {type(cfg).__name__}; kvjax knows "
                             f"{', '.join(c.__name__ for c in PROMPTERS)}")
        return None
    return cls(model, tokenizer, cfg, model_dir)


__all__ = ["prompter_for", "Prompter", "PROMPTERS", "MultimodalPrompt", "image_prefix_len", "LlavaPrompter",
           "MiniCPMVPrompter"]
