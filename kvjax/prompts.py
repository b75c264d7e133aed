"""Turn a conversation into prompt token ids, with the model's own chat template when it has one."""

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


def bucket_len(n: int, minimum: int = 64) -> int:
    """Round a prompt length up to a power of two (>= minimum) so few prefill shapes compile."""
    size = minimum
    while size < n:
        size *= 2
    return size
