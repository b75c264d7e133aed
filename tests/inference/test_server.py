"""The OpenAI-compatible server, through the official `openai` client against a server started on a
free loopback port: answers equal the engine's (greedy), streaming equals non-streaming, per-request
compression is honoured and reported, bad requests get OpenAI-style errors while the server keeps
serving, a client that disconnects mid-stream frees its pages, and requests from many connections
share the engine's batches. One demo-Llama server (random weights) serves the module."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import re
import time

import httpx
import openai
import pytest

import kvjax
from kvjax import testing
from inference.engine import Engine
from inference.scheduler import Request
from inference.server import BackgroundServer, Service
from kvjax.compression.ccm import CompressorConfig, build_compressor
from kvjax.compression.presses import get_press
from kvjax.prompts import encode_chat

MODEL = "demo"
MAX_LEN, PAGE = 128, 8
ENGINE = dict(page_size=PAGE, max_num_seqs=8, max_model_len=MAX_LEN, prefill_batch_size=4, decoding_batch_size=8)


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer, cfg = kvjax.load(testing.ensure_demo_checkpoint(), dtype="float32")
    compressor = build_compressor(CompressorConfig.for_model(cfg, compression_factor=4, min_seq_len=2))
    return model, tokenizer, cfg, compressor


@pytest.fixture(scope="module")
def service(loaded):
    model, tokenizer, cfg, compressor = loaded
    return Service(model, tokenizer, cfg, name=MODEL, compressors={4: compressor}, **ENGINE)


@pytest.fixture(scope="module")
def server(service):
    with BackgroundServer(service) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(loaded, service):
    """What the engine alone answers (greedy) to chat messages, with an optional compression method."""
    model, tokenizer, _, _ = loaded
    engine = Engine(model, tokenizer=tokenizer, eos_ids=service.engine.scheduler.eos_ids, **ENGINE)

    def answer(messages, max_tokens, method=None):
        ids = encode_chat(tokenizer, messages)
        result, = engine.generate([Request(prompt=ids, max_new_tokens=max_tokens, compression=method)])
        return tokenizer.decode(result.token_ids, skip_special_tokens=True), result
    return answer


def chat(client, content, **options):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=options.pop("temperature", 0), **options)


def metric(server, name: str, labels: str = "") -> float:
    text = httpx.get(f"{server.url}/metrics").text
    match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_chat_equals_the_engine_and_streaming_equals_non_streaming(client, reference, loaded):
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    want, result = reference(messages, 24)
    answer = chat(client, "Hello, who are you?", max_tokens=24)
    assert answer.choices[0].message.content == want
    assert answer.choices[0].finish_reason == result.finish_reason
    assert answer.usage.prompt_tokens == len(encode_chat(loaded[1], messages))
    assert answer.usage.completion_tokens == len(result.token_ids)
    chunks = list(chat(client, "Hello, who are you?", max_tokens=24, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want
    assert chunks[-2].choices[0].finish_reason == result.finish_reason  # the finish chunk carries usage too
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(result.token_ids)


def test_completion_and_models(client, server, loaded):
    _, tokenizer, _, _ = loaded
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0)
    assert out.usage.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == out.choices[0].text
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_per_request_compression_is_honoured_and_reported(client, server, reference, loaded):
    _, _, _, compressor = loaded
    question = "Tell me a long story about the sea, the wind and the ships that sail on them at night."
    messages = [{"role": "user", "content": question}]
    saved_before = metric(server, "kvjax_kv_bytes_saved_total")
    ccm = chat(client, question, max_tokens=8, extra_body={"kv_compression": {"method": "ccm", "compression_factor": 4}})
    want, result = reference(messages, 8, compressor)
    assert ccm.choices[0].message.content == want
    kv = ccm.usage.model_extra["kv_compression"]
    assert kv["method"] == "ccm:4" and kv["prompt_kv_slots"] == result.compressed_len < ccm.usage.prompt_tokens
    press = chat(client, question, max_tokens=8, extra_body={"kv_compression": {"method": "snapkv", "ratio": 0.5,
                                                                        "options": {"window_size": 8}}})
    want, result = reference(messages, 8, get_press("snapkv", compression_ratio=0.5, window_size=8))
    assert press.choices[0].message.content == want
    assert press.usage.model_extra["kv_compression"]["prompt_kv_slots"] == result.compressed_len
    saved = metric(server, "kvjax_kv_bytes_saved_total") - saved_before
    assert saved == (2 * ccm.usage.prompt_tokens - kv["prompt_kv_slots"] - result.compressed_len) * \
        kv["prompt_kv_bytes"] // kv["prompt_kv_slots"]
    assert metric(server, "kvjax_compressed_requests_total", '{method="ccm:4"}') >= 1


def test_stop_strings_end_the_answer_before_them(client, reference):
    want, _ = reference([{"role": "user", "content": "Hello, who are you?"}], 24)
    stop = want[len(want) // 2:len(want) // 2 + 3]
    assert stop.strip(), "the reference answer is too short to cut"
    out = chat(client, "Hello, who are you?", max_tokens=24, stop=[stop])
    assert out.choices[0].message.content == want[:want.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(
        client, "Hello, who are you?", max_tokens=24, stop=stop, stream=True) if c.choices)
    assert streamed == want[:want.index(stop)]


def test_seeded_sampling_is_reproducible_under_concurrency(client):
    def sampled(seed):
        return chat(client, "Pick some words.", max_tokens=12, temperature=1.0, seed=seed).choices[0].message.content
    alone = sampled(7)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(sampled, [7, 8, 7, 9]))
    assert together[0] == together[2] == alone
    assert len({alone, together[1], together[3]}) > 1  # other seeds draw other tokens


def test_concurrent_clients_share_batches_and_each_gets_its_own_answer(client, service, reference):
    questions = [f"Question number {i}: what comes next?" for i in range(8)]
    wants = [reference([{"role": "user", "content": q}], 16)[0] for q in questions]
    service.engine.stats["max_running"] = 0
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda q: chat(client, q, max_tokens=16).choices[0].message.content, questions))
    assert got == wants
    assert service.engine.stats["max_running"] > 1  # one engine batched requests from several connections


def test_a_client_that_disconnects_mid_stream_is_aborted_and_frees_its_pages(server, service, reference,
                                                                             monkeypatch):
    messages = [{"role": "user", "content": "Write without end."}]
    want, result = reference(messages, MAX_LEN)
    assert len(result.token_ids) > 40, "the reference must run long enough to disconnect in the middle"
    handles, submit = [], service.live.submit
    monkeypatch.setattr(service.live, "submit", lambda *a: handles.append(submit(*a)) or handles[-1])
    step = service.engine.step  # slowed down, so the answer cannot end before the client leaves
    monkeypatch.setattr(service.engine, "step", lambda: (time.sleep(0.02), step())[1])
    aborted = metric(server, "kvjax_requests_total", '{status="abort"}')
    body = {"model": MODEL, "messages": messages, "max_tokens": MAX_LEN, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first chunk arrived: the sequence is running
    deadline = time.monotonic() + 30
    while service.live.num_in_flight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.live.num_in_flight == 0
    seq, = [h.seq for h in handles]
    assert seq.finish_reason == "abort" and len(seq.output) < len(result.token_ids)
    assert service.engine.allocator.num_free == service.engine.allocator.num_pages
    assert metric(server, "kvjax_requests_total", '{status="abort"}') == aborted + 1


def png_data_url(size=(32, 24), color=(200, 30, 30)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("body, status, param", [
    (dict(model="nope"), 404, "model"),
    (dict(temperature=-1), 400, "temperature"),
    (dict(n=2), 400, "n"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(messages=[{"role": "user", "content": "word " * 400}]), 413, "messages"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}]}]),
     400, "messages.0.content"),
    (dict(kv_compression={"method": "nosuchpress"}), 400, "kv_compression.method"),
    (dict(kv_compression={"method": "ccm", "compression_factor": 3}), 400, "kv_compression.compression_factor"),
    (dict(kv_compression={"method": "none", "quantize": "int8"}), 400, "kv_compression.quantize"),
    (dict(kv_compression={"method": "ccm", "protect_image": True}), 400, "kv_compression.protect_image"),
    (dict(messages=[]), 400, "messages"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, body, status, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}
    if "kv_compression" in request:  # kvjax's extension: the client sends it through extra_body
        request["extra_body"] = {"kv_compression": request.pop("kv_compression")}
    kind = {400: openai.BadRequestError, 404: openai.NotFoundError, 413: openai.APIStatusError}[status]
    with pytest.raises(kind) as caught:
        client.chat.completions.create(**request)
    assert caught.value.status_code == status
    error = caught.value.body
    assert error["param"] == param and error["message"] and error["type"]
    assert chat(client, "hi", max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_malformed_json_is_a_400_in_openai_form(server):
    response = httpx.post(f"{server.base_url}/chat/completions", content=b'{"model": "demo", "messages": [',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def vlm_server():
    model_dir = testing.ensure_demo_vlm("llava")
    model, tokenizer, cfg = kvjax.load(model_dir, dtype="float32")
    service = Service(model, tokenizer, cfg, name="llava", model_dir=model_dir, page_size=16, max_num_seqs=2,
                      max_model_len=256, prefill_batch_size=1, decoding_batch_size=2)
    with BackgroundServer(service) as running:
        yield running, (model, tokenizer, cfg, model_dir)


def test_an_image_request_on_a_vlm_equals_image_chat(vlm_server):
    from kvjax.session import ChatSession
    from kvjax.vision.images import image_from_bytes

    running, (model, tokenizer, cfg, model_dir) = vlm_server
    client = openai.OpenAI(base_url=running.base_url, api_key="unused", max_retries=0, timeout=120)
    url = png_data_url()
    content = [{"type": "text", "text": "What is in the picture?"}, {"type": "image_url", "image_url": {"url": url}}]
    out = client.chat.completions.create(model="llava", messages=[{"role": "user", "content": content}],
                                         max_tokens=8, temperature=0)
    image = image_from_bytes(base64.b64decode(url.split(",", 1)[1]))
    session = ChatSession.create(model, tokenizer, cfg, model_dir=model_dir, image=image, max_new_tokens=8,
                                 max_tokens=256)
    assert out.choices[0].message.content == session.ask("What is in the picture?", write=lambda _: None)
    assert out.usage.prompt_tokens > cfg.num_image_tokens  # the image's positions are in the prompt
    pressed = client.chat.completions.create(
        model="llava", messages=[{"role": "user", "content": content}], max_tokens=2, temperature=0,
        extra_body={"kv_compression": {"method": "knorm", "ratio": 0.25, "protect_image": True}})
    kv = pressed.usage.model_extra["kv_compression"]
    assert kv["method"] == "knorm:0.25+image" and cfg.num_image_tokens < kv["prompt_kv_slots"] < out.usage.prompt_tokens
    broken = [{"type": "text", "text": "?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="image"):
        client.chat.completions.create(model="llava", messages=[{"role": "user", "content": broken}], max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        client.chat.completions.create(model="llava", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}], max_tokens=2)


def test_serve_cli_refuses_bad_flags_with_exit_2(capsys, monkeypatch):
    from inference import server
    from kvjax.cli import serve

    def no_serving(*args):
        raise AssertionError("the server started despite a bad flag")

    monkeypatch.setattr(server, "uvicorn_server", no_serving)
    for flags, message in ((["--demo", "llama", "--kv-compress"], "trained compressor"),
                           (["--demo", "llama", "--press", "nosuchpress"], "unknown press")):
        assert serve.main([*flags, "--port", "0"]) == 2
        assert message in capsys.readouterr().err
