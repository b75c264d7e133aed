"""`python -m kvjax.serve` as a user runs it (a child process), stopped with Ctrl-C (SIGINT) while
an answer streams: with --drain-s the answer completes; with --drain-s 0 it ends at once with a
last chunk whose finish_reason is "abort" (not a cut connection); either way the server logs what
it did and exits 0."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("drain_s, reason, logged", [("60", "length", "1 finished and 0 were aborted"),
                                                     ("0", "abort", "0 finished and 1 were aborted")])
def test_ctrl_c_drains_or_aborts_in_flight_answers_and_says_so(drain_s, reason, logged):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "kvjax.serve", "--demo", "llama", "--port", str(port),
                               "--drain-s", drain_s, "--max-model-len", "512", "--log-level", "warning"],
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(0.2)
        body = {"model": "demo-llama", "messages": [{"role": "user", "content": "Write without end."}],
                "max_tokens": 150, "temperature": 0, "stream": True}
        lines: list[str] = []

        def stream():
            with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=120) as r:
                lines.extend(r.iter_lines())

        client = threading.Thread(target=stream)
        client.start()
        while len([line for line in lines if line]) < 3:  # the answer is streaming
            time.sleep(0.01)
        server.send_signal(signal.SIGINT)
        client.join(120)
        assert server.wait(120) == 0
    finally:
        server.kill()
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert [line for line in lines if line][-1] == "data: [DONE]"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]] \
        == [reason]
    assert logged in server.stderr.read()
