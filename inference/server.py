"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) over the live engine.

    service = Service(model, tokenizer, cfg, name="my-model")   # kvjax.load's triple
    uvicorn_server(service, build_app(service), "127.0.0.1", 8000).run()   # what `python -m kvjax.serve` does

Endpoints: POST /v1/chat/completions (text, and for a VLM `image_url` parts as data: URLs),
POST /v1/completions, GET /v1/models, /health, /metrics (Prometheus). Every request, from every
HTTP connection, goes to the one `LiveEngine`, so they share its batches. Streaming is SSE; a client
that goes away mid-answer has its sequence aborted and its pages freed. Errors are OpenAI's JSON
with 400 (bad body or parameter), 404 (unknown model), 413 (prompt longer than the context) or
503 (shutting down). Per-request compression: see `inference.openai_api`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import threading
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from inference.engine import Engine
from inference.live import EngineClosed, LiveEngine
from inference.metrics import ServerMetrics
from inference.openai_api import (APIError, ChatBody, CompletionBody, GenerationBody, KVCompression, choice,
                                  envelope, new_id, usage)
from inference.scheduler import Request
from inference.text_stream import TextStream
from kvjax.compression.presses import press_with_ratio
from kvjax.errors import KVJaxError, PromptTooLong
from kvjax.prompts import encode_chat, eos_ids_of
from kvjax.sampling import Sampling
from kvjax.vision import image_prefix_len, prompter_for
from kvjax.vision.images import image_from_bytes
from kvjax.vision.prompt import pack

log = logging.getLogger("kvjax.serve")
DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is still there
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass(frozen=True)
class Prompt:
    ids: list[int]
    embeds: Any = None  # float32 [T, H] for a prompt with an image
    image_len: int = 0


class Service:
    """A loaded model behind a live engine, and what the endpoints need: its name, its
    compressors (CCM, by factor), the default compression, and the metrics.

    compressors: {factor: CCMCompressor} that "ccm" requests may use; default_compression: applied
    to requests that bring no `kv_compression`; kv_quantize: "int8" keeps the engine's pages int8
    (every request then is); engine_options: Engine's sizing keywords."""

    def __init__(self, model, tokenizer, cfg, *, name: str, model_dir=None, compressors: dict | None = None,
                 default_compression: KVCompression | None = None, kv_quantize: str = "none",
                 drain_s: float = 30.0, **engine_options):
        self.name, self.tokenizer, self.drain_s = name, tokenizer, drain_s
        self.prompter = prompter_for(model, tokenizer, cfg, model_dir)
        self.text_cfg = cfg if self.prompter is None else cfg.text
        self.engine = Engine(model, tokenizer=tokenizer, eos_ids=eos_ids_of(self.text_cfg, tokenizer),
                             kv_cache_dtype="int8" if kv_quantize == "int8" else None, **engine_options)
        self.compressors, self.kv_quantize = dict(compressors or {}), kv_quantize
        self.default_compression = default_compression or KVCompression()
        self.resolve(self.default_compression)  # a bad default fails at startup, not on every request
        self.bytes_per_slot = self.engine.runner.cache.page_bytes() // self.engine.allocator.page_size
        self.live = LiveEngine(self.engine)
        self.metrics = ServerMetrics(self.engine, self.live)
        self.created = int(time.time())

    @property
    def max_model_len(self) -> int:
        return self.engine.scheduler.capacity

    # -- compression -------------------------------------------------------------------------------

    def resolve(self, spec: KVCompression) -> tuple[Any, str]:
        """A request's kv_compression -> (the engine's compression method or None, its label)."""
        param = "kv_compression"
        quantize = spec.quantize or self.kv_quantize
        if quantize != self.kv_quantize:
            fix = "start it with --kv-quantize int8" if quantize == "int8" else "drop quantize from the request"
            raise APIError(400, f"this server keeps its KV pages {'int8' if self.kv_quantize == 'int8' else 'unquantized'}"
                           f" for every request; {fix}", param=f"{param}.quantize")
        suffix = "+int8" if quantize == "int8" else ""
        if spec.protect_image and spec.method in ("none", "ccm"):
            raise APIError(400, "protect_image applies to presses (CCM compresses the image with its own MLPs)",
                           param=f"{param}.protect_image")
        if spec.method == "none":
            return None, "none" + suffix
        if spec.method == "ccm":
            if not self.compressors:
                raise APIError(400, "this server has no CCM compressor: start it with --kv-compress-ckpt DIR (the "
                               "shipped default model brings its own)", param=f"{param}.method")
            if spec.ratio is not None or spec.options:
                raise APIError(400, "ccm takes compression_factor, not ratio or options", param=param)
            factor = spec.compression_factor or (5 if 5 in self.compressors else max(self.compressors))
            if factor not in self.compressors:
                have = ", ".join(map(str, sorted(self.compressors)))
                raise APIError(400, f"no CCM compressor for compression_factor {factor}; this server has {have}",
                               param=f"{param}.compression_factor")
            return self.compressors[factor], f"ccm:{factor}{suffix}"
        try:
            press = press_with_ratio(spec.method, spec.ratio, spec.options)
        except KVJaxError as e:
            raise APIError(400, str(e), param=f"{param}.method") from None
        ratio = getattr(press, "compression_ratio", None)
        protect = "+image" if spec.protect_image else ""
        return press, f"{spec.method}{'' if ratio is None else f':{ratio:g}'}{protect}{suffix}"

    # -- prompts -----------------------------------------------------------------------------------

    def chat_prompt(self, body: ChatBody) -> Prompt:
        """Messages -> prompt ids with the model's chat template (and, for a VLM, its image)."""
        messages, image = [], None
        for index, message in enumerate(body.messages):
            role = "system" if message.role == "developer" else message.role
            texts = []
            for part in [message.content] if not isinstance(message.content, list) else message.content:
                if part is None or isinstance(part, str):
                    texts.append(part or "")
                elif part.type == "text":
                    texts.append(part.text or "")
                else:
                    param = f"messages.{index}.content"
                    if self.prompter is None:
                        raise APIError(400, f"{self.name} is a text-only model; image_url parts need a LLaVA or "
                                       "MiniCPM-V model", param=param)
                    if image is not None:
                        raise APIError(400, "one image per request (in the first user message)", param=param)
                    if role != "user" or any(m["role"] == "user" for m in messages):
                        raise APIError(400, "the image must be in the first user message", param=param)
                    if part.image_url is None:
                        raise APIError(400, "an image_url part needs image_url.url", param=param)
                    image = decode_data_url(part.image_url.url, param)
            messages.append({"role": role, "content": "\n".join(texts)})
        try:
            if self.prompter is None:
                return Prompt(encode_chat(self.tokenizer, messages))
            pixels = None if image is None else self.prompter.pixels(image)
            ids, mask = self.prompter.encode(messages, pixels)
            if pixels is None:
                return Prompt(list(ids))
            self.engine.scheduler.check_fits(len(ids))  # before the vision tower runs
        except PromptTooLong as e:
            raise too_long(e) from None
        except KVJaxError as e:
            raise APIError(400, str(e), param="messages") from None
        tokens, _, image_mask = pack([ids], [mask], pad_id=0)
        embeds = np.asarray(self.prompter.embed(tokens, image_mask, [pixels]), np.float32)[0, :len(ids)]
        return Prompt(list(ids), embeds, int(image_prefix_len(image_mask)[0]))

    def completion_prompt(self, body: CompletionBody) -> Prompt:
        if isinstance(body.prompt, str):
            return Prompt(list(self.tokenizer(body.prompt)["input_ids"]))
        vocab = self.text_cfg.vocab_size
        if any(not 0 <= t < vocab for t in body.prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return Prompt(list(body.prompt))

    # -- generation --------------------------------------------------------------------------------

    def start(self, body: GenerationBody, prompt: Prompt, max_tokens: int | None) -> "Generation":
        """Check the body's sampling and compression and submit the request to the live engine."""
        received = time.perf_counter()
        field = body.unsupported()
        if field is not None:
            raise APIError(400, f"{field} is not supported by kvjax (leave it at its default)", param=field)
        try:
            sampling = Sampling(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p)
        except KVJaxError as e:
            raise APIError(400, str(e), param="temperature") from None
        if max_tokens is not None and max_tokens <= 0:
            raise APIError(400, f"max_tokens must be > 0, got {max_tokens}", param="max_tokens")
        spec = body.kv_compression or self.default_compression
        method, label = self.resolve(spec)
        budget = max(self.max_model_len - len(prompt.ids), 1)  # a longer answer ends with "length"
        request = Request(prompt=prompt.ids, embeds=prompt.embeds, image_len=prompt.image_len,
                          max_new_tokens=min(max_tokens or budget, budget), sampling=sampling, compression=method,
                          protect_image=spec.protect_image, seed=body.seed)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            handle = self.live.submit(request, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except EngineClosed as e:
            raise APIError(503, str(e), kind="service_unavailable", code="shutting_down") from None
        except PromptTooLong as e:
            raise too_long(e) from None
        except KVJaxError as e:
            raise APIError(400, str(e)) from None
        self.metrics.prompt_tokens.inc(len(prompt.ids))
        return Generation(self, handle, events, TextStream(self.tokenizer, body.stops), received, label,
                          len(prompt.ids))


@dataclasses.dataclass
class Generation:
    """One request in flight: its engine events become text pieces, then a finish reason and usage."""

    service: Service
    handle: Any
    events: asyncio.Queue
    text: TextStream
    received: float
    label: str
    num_prompt: int
    first_token: float | None = None
    result: Any = None
    stop_hit: bool = False
    abandoned: bool = False

    async def pieces(self, http_request: HTTPRequest | None = None):
        """Yield (new text, None) while decoding and (last text, finish_reason) at the end.
        http_request: polled for a disconnect (non-streaming answers; a stream learns it by
        being cancelled)."""
        while True:
            try:
                event = await asyncio.wait_for(self.events.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                if http_request is not None and await http_request.is_disconnected():
                    self.handle.abort()
                continue
            if event.tokens and self.first_token is None:
                self.first_token = time.perf_counter()
            piece = self.text.feed(event.tokens)
            if self.text.stopped and not self.stop_hit:  # a stop string: no more tokens are needed
                self.stop_hit = True
                self.handle.abort()
            if event.result is not None:
                self.result = event.result
                yield piece + self.text.finish(), self._finish()
                return
            if piece:
                yield piece, None

    def _finish(self) -> str:
        result, metrics = self.result, self.service.metrics
        if result.finish_reason == "error":
            metrics.requests.labels("error").inc()
            raise APIError(503 if self.service.live.failure is None else 500, result.error or "the engine failed",
                           kind="server_error")
        reason = "stop" if self.stop_hit else result.finish_reason
        metrics.requests.labels(reason).inc()
        num = len(result.token_ids)
        metrics.generation_tokens.inc(num)
        if self.first_token is not None:
            metrics.ttft.observe(self.first_token - self.received)
            if num > 1:
                metrics.tpot.observe((time.perf_counter() - self.first_token) / (num - 1))
        metrics.compressed.labels(self.label).inc()
        if result.compressed_len is not None:
            metrics.kv_bytes_saved.inc((self.num_prompt - result.compressed_len) * self.service.bytes_per_slot)
        return reason

    def usage(self) -> dict:
        slots = self.num_prompt if self.result.compressed_len is None else self.result.compressed_len
        bps = self.service.bytes_per_slot
        kv = {"method": self.label, "prompt_kv_slots": slots, "prompt_kv_bytes": slots * bps,
              "kv_bytes_saved": (self.num_prompt - slots) * bps}
        return usage(self.num_prompt, len(self.result.token_ids), kv)

    def close(self) -> None:
        """The caller is gone (or done): abort what still runs."""
        if self.result is None and not self.abandoned:
            self.abandoned = True  # nobody waits for its last event: count it here
            self.handle.abort()
            self.service.metrics.requests.labels("abort").inc()


def too_long(error: PromptTooLong) -> APIError:
    return APIError(413, str(error), param="messages", code="context_length_exceeded")


def decode_data_url(url: str, param: str):
    """A data: URL (data:image/png;base64,...) -> PIL image; the server fetches nothing remote."""
    if not url.startswith("data:"):
        raise APIError(400, "image_url must be a data: URL (data:image/png;base64,...); the server does not fetch "
                       "remote images", param=param)
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, "image_url data: URL must be base64 (data:image/png;base64,...)", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "image_url data: URL holds invalid base64", param=param) from None
    try:
        return image_from_bytes(data, "the image_url image")
    except KVJaxError as e:
        raise APIError(400, str(e), param=param) from None


def build_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.live.shutdown, 0.0)  # a no-op after DrainingServer's drain

    app = FastAPI(title="kvjax", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def api_error(_, error: APIError):
        if error.status in (400, 404, 413):
            service.metrics.requests.labels("rejected").inc()
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, error: RequestValidationError):
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (f"the body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})"
                   if first.get("type") == "json_invalid" else f"{loc or 'body'}: {first['msg']}")
        return await api_error(None, APIError(400, message, param=loc or None))

    def check_model(name: str) -> None:
        if name != service.name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves `{service.name}`",
                           param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        if not service.live.is_alive:
            return JSONResponse({"status": "failed", "error": service.live.failure}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": service.name, "object": "model", "created": service.created,
                                            "owned_by": "kvjax", "max_model_len": service.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http_request: HTTPRequest):
        check_model(body.model)
        prompt = await run_in_threadpool(service.chat_prompt, body)
        return await answer(service.start(body, prompt, body.max_completion_tokens or body.max_tokens), body,
                            "chat", "chatcmpl", http_request)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http_request: HTTPRequest):
        check_model(body.model)
        generation = service.start(body, service.completion_prompt(body), body.max_tokens or COMPLETION_MAX_TOKENS)
        return await answer(generation, body, "text", "cmpl", http_request)

    async def answer(generation: Generation, body: GenerationBody, kind: str, prefix: str, http_request):
        rid = new_id(prefix)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return EventSourceResponse(stream(generation, kind, rid, include_usage))
        try:
            text, reason = "", None
            async for piece, reason in generation.pieces(http_request):
                text += piece
        finally:
            generation.close()
        return envelope(kind, rid, service.name, [choice(kind, text, reason, streaming=False)], generation.usage(),
                        streaming=False)

    async def stream(generation: Generation, kind: str, rid: str, include_usage: bool):
        def sse(obj) -> bytes:
            return format_sse_event(data_str=json.dumps(obj))

        try:
            first = True
            async for piece, reason in generation.pieces():
                if piece or first:
                    yield sse(envelope(kind, rid, service.name, [choice(kind, piece, None, streaming=True, first=first)],
                                       streaming=True))
                    first = False
                if reason is not None:
                    final = [choice(kind, "", reason, streaming=True)]
                    yield sse(envelope(kind, rid, service.name, final, generation.usage(), streaming=True))
                    if include_usage:  # OpenAI's usage chunk: no choices
                        yield sse(envelope(kind, rid, service.name, [], generation.usage(), streaming=True))
            yield format_sse_event(data_str="[DONE]")
        except APIError as error:  # the engine failed mid-answer: an OpenAI-style error event
            yield sse(error.body())
        finally:
            generation.close()

    return app


def uvicorn_server(service: Service, app: FastAPI, host: str, port: int, log_level: str = "warning", **config):
    """A uvicorn server whose shutdown first drains the engine: in-flight answers get up to
    service.drain_s seconds to finish, then are aborted (each client receives its last chunk with
    finish_reason "abort" rather than a cut connection), and the counts are logged."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            in_flight = service.live.num_in_flight
            if in_flight:
                log.warning("kvjax serve: shutting down; %d requests in flight get up to %g s to finish",
                            in_flight, service.drain_s)
            drain = asyncio.get_running_loop().run_in_executor(None, service.live.shutdown, service.drain_s)
            await super().shutdown(sockets)  # waits for the connections, which end once the engine has drained
            counts = await drain
            log.warning("kvjax serve: shut down; of the requests in flight, %d finished and %d were aborted",
                        counts["finished"], counts["aborted"])

    # Connections outlive the drain by a margin only if something hangs; log_config=None keeps the
    # process's logging (uvicorn's own binds handlers to whatever sys.stderr is now, e.g. a test's).
    return DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                         timeout_graceful_shutdown=service.drain_s + 10, **config))


class BackgroundServer:
    """Serve a Service with uvicorn on a loopback port (0: a free one) in a thread: tests, load tests.

        with BackgroundServer(service) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="none")
    """

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 0, startup_s: float = 60.0):
        self.server = uvicorn_server(service, build_app(service), host, port, log_config=None)
        self.host, self.startup_s = host, startup_s
        self.thread = threading.Thread(target=self.server.run, name="kvjax-uvicorn", daemon=True)

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.startup_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see its log above)")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
