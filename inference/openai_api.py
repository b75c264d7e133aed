"""The OpenAI wire format the server speaks: request bodies (pydantic), errors, and response /
chunk builders. kvjax's own extension is `kv_compression` in a body (the openai client sends it
through `extra_body`) and in `usage` of the answer.

    "kv_compression": {"method": "ccm", "compression_factor": 5}
    "kv_compression": {"method": "snapkv", "ratio": 0.5, "options": {"window_size": 16}}
    "kv_compression": {"method": "none"}              # opt out of the server's default
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An error answered as OpenAI's JSON: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class KVCompression(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str = "none"  # "none" | "ccm" | a press name (kvjax.presses.list_presses())
    ratio: float | None = None  # a press's compression_ratio (fraction of prompt tokens dropped)
    compression_factor: int | None = None  # ccm: which of the server's compressors
    options: dict[str, Any] = Field(default_factory=dict)  # press hyper-parameters (kvpress names)
    protect_image: bool = False  # a press keeps a VLM prompt's image outside its budget
    quantize: Literal["none", "int8"] | None = None  # must match the server's pages (--kv-quantize)


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationBody(BaseModel):
    """What chat and text completions share. Fields OpenAI defines that kvjax does not implement
    are accepted only at their neutral values (a non-neutral one is a 400, never silently ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension; 0 = off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    kv_compression: KVCompression | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: Any = None
    best_of: int | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something kvjax does not do, or None."""
        if self.n != 1:
            return "n"
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                return name
        if self.logprobs not in (None, False, 0):
            return "logprobs"
        if self.best_of not in (None, 1):
            return "best_of"
        return None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


class CompletionBody(GenerationBody):
    prompt: str | list[int]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> str | None:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        return super().unsupported()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt: int, num_generated: int, kv: dict | None) -> dict:
    out = {"prompt_tokens": num_prompt, "completion_tokens": num_generated, "total_tokens": num_prompt + num_generated}
    if kv is not None:
        out["kv_compression"] = kv
    return out


OBJECTS = {("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk",
           ("text", False): "text_completion", ("text", True): "text_completion"}


def choice(kind: str, text: str, finish_reason: str | None, *, streaming: bool, first: bool = False) -> dict:
    """One choice of a chat ("chat") or text ("text") answer, whole or as a streamed chunk's delta."""
    if kind == "text":
        body = {"text": text}
    elif streaming:
        body = {"delta": {**({"role": "assistant"} if first else {}), **({"content": text} if text or first else {})}}
    else:
        body = {"message": {"role": "assistant", "content": text}}
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}


def envelope(kind: str, rid: str, model: str, choices: list[dict], usage_: dict | None = None, *,
             streaming: bool) -> dict:
    out = {"id": rid, "object": OBJECTS[kind, streaming], "created": int(time.time()), "model": model,
           "choices": choices}
    if usage_ is not None:
        out["usage"] = usage_
    return out
