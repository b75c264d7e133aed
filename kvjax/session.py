"""A chat conversation as a library object: `ChatSession` holds the model, the sampling and the
compression method, and answers one turn at a time (the chat CLI only parses flags and builds it).

    session = ChatSession.create(model, tokenizer, cfg, method=kvjax.presses.get_press("snapkv"))
    answer = session.ask("Hello, who are you?")

Each turn prefills the whole conversation into a fresh cache with ONE `prefill_and_compress`
(which records what the method reads), then decodes with `stream_from`: simple, and always
equal to what the model would see in one pass.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import numpy as np

from kvjax.cache import KVCache
from kvjax.compression import prefill_and_compress, steps_of
from kvjax.compression.ccm import CCMCompressor
from kvjax.compression.presses import Press
from kvjax.errors import KVJaxError
from kvjax.prompts import bucket, encode_chat, eos_ids_of
from kvjax.sampling import GREEDY, Sampling
from kvjax.steps import SplitModel, split, stream_from
from kvjax.vision import image_prefix_len, prompter_for

PROTECT = ("none", "image", "question", "both")


@dataclasses.dataclass
class TurnStats:
    """What the last turn measured (seconds, tokens, bytes)."""

    num_prompt: int
    num_generated: int = 0
    prefill_s: float = 0.0  # prefill and compression, until the logits are ready
    first_token_s: float = 0.0  # turn start -> first token sampled
    decode_s: float = 0.0  # first token -> last token
    kv_bytes_before: int = 0  # the prompt's K/V in the model's dtype
    kv_bytes_after: int = 0  # after the method (equal to before without one)
    kv_len: int = 0  # slots the prompt holds after the method
    notes: list[str] = dataclasses.field(default_factory=list)  # warnings for the user (answer cut, ...)


@dataclasses.dataclass
class ChatSession:
    model: SplitModel  # the language model (a VLM's LM for image chat)
    tokenizer: Any
    cfg: Any  # the LM's ModelConfig
    prompter: Any = None  # kvjax.vision prompter (VLMs), else None
    pixels: Any = None  # the conversation's image as the prompter's tower input (first user turn)
    sampling: Sampling = GREEDY
    seed: int = 0
    method: Any = None  # anything kvjax.compress takes (CCM, press, Int8KV, a tuple of them) or None
    max_tokens: int = 2048  # KV cache capacity: prompt + answer
    max_new_tokens: int = 128
    protect: str = "none"  # kept outside a press's budget: none | image | question | both
    image_len: int = 0  # image prefix of the cache; 0 = from the prompt
    rope_positions: str | None = None  # None: the method's own convention
    cache_dtype: Any = None
    messages: list = dataclasses.field(default_factory=list)
    last: TurnStats | None = None
    _compiled: set = dataclasses.field(default_factory=set)

    def __post_init__(self):
        if self.protect not in PROTECT:
            raise KVJaxError(f"protect must be one of {', '.join(PROTECT)}, got {self.protect!r}")
        has_press = any(isinstance(s, Press) for s in steps_of(self.method))
        if self.protect != "none" and not has_press:
            raise KVJaxError(f"protecting the {self.protect} applies to presses: add --press NAME (e.g. --press "
                             "knorm) or drop --press-protect")
        self.eos_ids = eos_ids_of(self.cfg, self.tokenizer)

    @classmethod
    def create(cls, model, tokenizer, cfg, *, model_dir=None, image=None, system: str | None = None, **fields):
        """A session for a loaded model (`kvjax.load`'s triple); VLMs chat through their LM, with
        `image` (a path or PIL image) in the first user turn."""
        prompter = prompter_for(model, tokenizer, cfg, model_dir)
        if prompter is None and image is not None:
            raise KVJaxError(f"{model_dir or 'this model'} is a text-only model; an image needs a LLaVA or "
                             "MiniCPM-V directory (or try --demo llava)")
        pixels = None if image is None else prompter.pixels(image)
        lm = model if prompter is None else model.language_model
        messages = [{"role": "system", "content": system}] if system else []
        return cls(split(lm), tokenizer, cfg if prompter is None else cfg.text, prompter, pixels,
                   cache_dtype=lm.dtype, messages=messages, **fields)

    def encode(self, messages) -> tuple[list[int], np.ndarray]:
        """Conversation -> (prompt ids, image mask bool [T])."""
        if self.prompter is None:
            ids = encode_chat(self.tokenizer, messages)
            return ids, np.zeros(len(ids), bool)
        ids, mask = self.prompter.encode(messages, self.pixels)
        return list(ids), np.asarray(mask, bool)

    def ask(self, question: str, write: Callable[[str], Any] | None = None) -> str:
        """Answer one user turn; the answer streams to `write` (default: stdout) as it decodes."""
        write = write or sys.stdout.write  # looked up per call: stdout may have been replaced
        self.messages.append({"role": "user", "content": question})
        ids, mask = self.encode(self.messages)
        question_len = 0
        if self.protect in ("question", "both"):  # the latest message and the template's tail
            context, _ = self.encode(self.messages[:-1] + [{"role": "user", "content": ""}])
            question_len = tail_len(ids, context)
        text = self._answer(ids, mask, question_len, write)
        self.messages.append({"role": "assistant", "content": text})
        return text

    def warm_up(self, question: str) -> None:
        """Compile this turn's prompt shape once (e.g. before timing), leaving the conversation as it was."""
        ids, mask = self.encode(self.messages + [{"role": "user", "content": question}])
        if bucket(len(ids), smallest=64) not in self._compiled:
            self._answer(ids, mask, 0, lambda _: None, num_tokens=2)

    def _answer(self, ids, mask, question_len: int, write, num_tokens: int | None = None) -> str:
        num = len(ids)
        width = bucket(num, smallest=64)
        self._compiled.add(width)
        tokens, image_mask = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
        tokens[0, :num], image_mask[0, :num] = ids, mask
        pixels = [] if self.pixels is None else [self.pixels]
        embeds = None if self.prompter is None else self.prompter.embed(tokens, image_mask, pixels)
        image_len = self.image_len or int(image_prefix_len(image_mask)[0])
        cache = KVCache.for_model(self.cfg, 1, self.max_tokens, self.cache_dtype)
        stats = TurnStats(num_prompt=num, kv_bytes_before=cache.bytes_per_slot() * num)
        start = time.perf_counter()
        logits, cache = prefill_and_compress(
            self.model, cache, tokens, [num], embeds, method=self.method, image_len=[image_len],
            protect_image=self.protect in ("image", "both"),
            protect_last=[question_len] if self.protect in ("question", "both") else None,
            rope_positions=self.rope_positions)
        stats.kv_len, stats.kv_bytes_after = int(cache.kv_len[0]), int(cache.used_bytes()[0])  # syncs
        stats.prefill_s = time.perf_counter() - start
        ccm = next((step for step in steps_of(self.method) if isinstance(step, CCMCompressor)), None)
        if ccm is not None and stats.kv_len == num:
            cf, groups, kept = ccm.cfg.compression_factor, ccm.cfg.min_seq_len, ccm.cfg.keep_last
            tail = f"; the text's last {kept} are kept as they are" if kept else ""
            flags = ["--kv-compress-factor", "--kv-compress-min-seq-len", *(["--kv-compress-keep-last"] * bool(kept))]
            stats.notes.append(f"the compressor merged nothing: each span (image {image_len}, text {num - image_len} "
                               f"tokens{tail}) is shorter than min_seq_len = {groups} groups of {cf} tokens; lower "
                               f"{', '.join(flags[:-1])} or {flags[-1]}")
        if self.protect in ("image", "both") and image_len + question_len > stats.kv_len:
            stats.notes.append(f"the image ({image_len} tokens) exceeds the {stats.kv_len - question_len} context "
                               "tokens kept; part of it was dropped: lower --compression-ratio")
        generated, text = [], ""
        steps = stream_from(self.model, cache, logits, max_new_tokens=num_tokens or self.max_new_tokens,
                            sampling=self.sampling, eos_ids=self.eos_ids, seed=self.seed)
        first = None
        for token, is_new in steps:
            if not is_new[0]:
                break
            first = first or time.perf_counter()
            if int(token[0]) in self.eos_ids:
                break
            generated.append(int(token[0]))
            now = self.tokenizer.decode(generated, skip_special_tokens=True)
            write(now[len(text):])
            text = now
        end = time.perf_counter()
        stats.num_generated, stats.first_token_s = len(generated), (first or end) - start
        stats.decode_s = end - (first or end)
        # The last sampled token never enters the cache, hence the + 1.
        if len(generated) < self.max_new_tokens and stats.kv_len + len(generated) >= self.max_tokens + 1:
            stats.notes.append(f"answer cut: the KV cache is full ({self.max_tokens} tokens); raise --max-tokens")
        if num_tokens is None:
            self.last = stats
        return text


def tail_len(ids: list[int], context_ids: list[int]) -> int:
    """Prompt tokens after `ids` parts from `context_ids` (the conversation with the latest user message
    emptied): that message's text and the template's tail (end of turn, assistant prefix). Works for any
    template and image prompts (the image precedes the text); the role header stays in the context."""
    common = next((i for i, (a, b) in enumerate(zip(ids, context_ids)) if a != b), min(len(ids), len(context_ids)))
    return len(ids) - common


__all__ = ["ChatSession", "TurnStats", "tail_len", "PROTECT"]
