"""Turn a conversation into prompt token ids, with the model's own chat template when it has one,
and round lengths to the compile buckets."""

from __future__ import annotations

from kvjax.errors import KVJaxError


def encode_chat(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """messages: [{"role": "system"|"user"|"assistant", "content": str}, ...], ending with a user turn.

    With a chat template the rendered text already carries its special tokens (a template that
    wants BOS writes it), so it is tokenized without adding more. Without one, the turns are
    joined as plain text and the tokenizer adds its usual BOS.
    """
    if not messages or messages[-1]["role"] != "user":
        raise KVJaxError("a chat prompt must end with a user message")
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "\n\n".join(m["content"] for m in messages)
    return list(tokenizer(text)["input_ids"])


def eos_ids_of(cfg, tokenizer) -> tuple[int, ...]:
    """The tokens that end an answer: the config's EOS ids and the tokenizer's EOS token."""
    extra = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return tuple(sorted(set(cfg.eos_token_ids) | extra))


def bucket(n: int, limit: int | None = None, smallest: int = 1) -> int:
    """The smallest power of two >= max(n, smallest), capped at limit (when n fits under it): prompt
    lengths and batch sizes are rounded so few shapes compile."""
    size = max(smallest, 1 << max(int(n) - 1, 0).bit_length())
    return min(size, limit) if limit is not None and n <= limit else size
