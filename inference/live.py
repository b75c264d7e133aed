"""The live engine: one thread keeps stepping an `Engine` while requests come and go, so requests
from many callers (the HTTP server's handlers) share its batches (continuous batching).

    live = LiveEngine(engine)
    handle = live.submit(Request(prompt="Hello", max_new_tokens=32), on_event=print)  # from any thread
    handle.abort()                      # e.g. the client went away: its pages are freed at once
    live.shutdown(drain_s=10.0)         # finish what runs for up to 10 s, abort the rest

`submit` validates in the caller's thread (a bad request raises KVJaxError and never reaches the
loop). Everything that touches the engine runs on the loop thread: submissions and aborts are
commands it runs between steps. `on_event` is called on the loop thread with each step's new tokens
and, last, with the request's `Result` (finish_reason "stop" | "length" | "abort" | "error").
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import traceback
from typing import Callable

from inference.engine import Engine, Result, refused
from inference.scheduler import Phase, Request, Sequence
from kvjax.errors import KVJaxError

log = logging.getLogger("kvjax.live")


class EngineClosed(KVJaxError):
    """The engine is shutting down (or stopped after a failure) and takes no new requests."""


@dataclasses.dataclass
class Event:
    tokens: list[int]  # tokens produced since the last event
    result: Result | None = None  # set on a request's last event


@dataclasses.dataclass(eq=False)
class Handle:
    """A submitted request, as its caller sees it."""

    live: "LiveEngine"
    on_event: Callable[[Event], None]
    seq: Sequence | None = None  # set once the loop has queued it
    sent: int = 0  # tokens already passed to on_event
    done: bool = False

    def abort(self) -> None:
        """Stop the request (no-op once it has finished); its last event says "abort"."""
        self.live._command(lambda: self.live._abort(self))


class LiveEngine:
    """idle_wait_s: how long the loop sleeps when there is no work (a submission wakes it)."""

    def __init__(self, engine: Engine, *, idle_wait_s: float = 0.5):
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._handles: list[Handle] = []  # queued or running, in submission order
        self._closing = False
        self._drain_until: float | None = None
        self.failure: str | None = None  # why the loop stopped, if it failed
        self._thread = threading.Thread(target=self._run, name="kvjax-engine", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.failure is None

    @property
    def num_in_flight(self) -> int:
        return len(self._handles)

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Validate `request` here (KVJaxError if it is bad) and queue it on the loop."""
        if self._closing or not self.is_alive:
            raise EngineClosed(self.failure or "the engine is shutting down; retry on another server")
        prompt_ids = self.engine.validate(request)
        handle = Handle(self, on_event)

        def add():
            if self._closing or self.failure:
                handle.done = True
                return on_event(Event([], refused(self.failure or "the engine is shutting down; retry on another server")))
            handle.seq = self.engine.enqueue(request, prompt_ids)
            self._handles.append(handle)

        self._command(add)
        return handle

    def shutdown(self, drain_s: float = 0.0) -> dict[str, int]:
        """Take no new requests; let running ones finish for up to drain_s seconds, then abort the
        rest. Returns {"finished": n, "aborted": m} of the requests in flight when it was called."""
        if not self._thread.is_alive():  # already shut down (or failed)
            return {"finished": 0, "aborted": 0}
        in_flight = list(self._handles)
        clock = self.engine.clock

        def close():
            self._closing = True
            self._drain_until = clock() + drain_s

        self._command(close)
        self._thread.join()
        aborted = sum(h.seq is not None and h.seq.finish_reason == "abort" for h in in_flight)
        return {"finished": len(in_flight) - aborted, "aborted": aborted}

    def _command(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        self._wake.set()

    def _abort(self, handle: Handle) -> None:
        if handle.done or handle.seq is None:
            return
        self.engine.abort(handle.seq.request_id)
        self._emit()

    def _run(self) -> None:
        try:
            while True:
                while not self._commands.empty():
                    self._commands.get()()
                if self._closing and (not self.engine.scheduler.has_work or self.engine.clock() >= self._drain_until):
                    for handle in list(self._handles):
                        self.engine.abort(handle.seq.request_id)
                    self._emit()
                    return
                if not self.engine.scheduler.has_work:
                    self._wake.wait(self.idle_wait_s)
                    self._wake.clear()
                    continue
                self.engine.step()
                self._emit()
        except Exception as e:  # a device or program failure: every caller hears of it, none hangs
            self.failure = f"the engine failed: {type(e).__name__}: {e}"
            log.error("%s\n%s", self.failure, traceback.format_exc())
            self._closing = True
            for handle in self._handles:
                handle.done = True
                handle.on_event(Event([], refused(self.failure)))
            self._handles = []
            while not self._commands.empty():  # submissions that raced the failure
                self._commands.get()()

    def _emit(self) -> None:
        """Pass each in-flight request its new tokens; finished ones get their Result and leave."""
        live = []
        for handle in self._handles:
            seq = handle.seq
            new = seq.output[handle.sent:]
            handle.sent += len(new)
            if seq.phase is Phase.FINISHED:
                handle.done = True
                handle.on_event(Event(new, self.engine.result_of(seq)))
            else:
                live.append(handle)
                if new:
                    handle.on_event(Event(new))
        self._handles = live
        self.engine.finished.clear()  # the handles hold what a live engine's callers need
