"""The generation loop of ``expertflow serve``: one worker thread owns the model and an
:class:`~expertflow.serving.engine.Engine`; the HTTP side hands it requests and cancellations
through a queue and gets each request's tokens back on its own asyncio queue.

One thread, because an engine's rounds must not overlap and its routing tap keeps only its
own thread's routing; and because continuous batching needs every request in one place: a
request joins the running batches at the next round and leaves when it ends, so concurrent
requests share decode steps instead of taking turns at the model.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field

from expertflow.serving.engine import Engine
from expertflow.serving.metrics import Metrics

__all__ = ["QueueFull", "Stopping", "Ticket", "Worker"]


class QueueFull(Exception):
    """More requests wait for a place in a batch than ``max_queue`` allows."""


class Stopping(Exception):
    """The server is shutting down and takes no new request."""


@dataclass(eq=False)
class Ticket:
    """A request as the HTTP side holds it: ``events`` receives ``(token, finish, error)``
    tuples (see :data:`~expertflow.serving.engine.OnToken`; finish ``"cancelled"`` too)."""

    loop: asyncio.AbstractEventLoop
    prompt_tokens: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    request: object = None  # the engine's, once the worker took it
    done: bool = False  # set by the worker thread once the last event is sent
    completion_tokens: int = 0  # counted by the HTTP side as it reads the events


class Worker:
    """Runs ``engine`` on a thread. ``max_queue``: requests that may wait beyond the
    ``batch_size x active_batches`` that decode at once; more are refused (:class:`QueueFull`)."""

    def __init__(self, engine: Engine, *, capacity: int, max_queue: int):
        self.engine, self.capacity, self.max_queue = engine, capacity, max_queue
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards in_flight and stopping
        self._in_flight = 0
        self._stopping = False
        self._live: dict[int, Ticket] = {}  # worker thread only: the engine's requests
        self._outbox: list[tuple[Ticket, tuple]] = []  # events of this round, sent at its end
        self._ready = threading.Event()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="expertflow-engine", daemon=True)

    def start(self) -> None:
        """Starts the thread; raises what entering the engine raised, if anything."""
        self._thread.start()
        self._ready.wait()
        if self._failed is not None:
            raise self._failed

    def submit(self, ids: list[int], max_new_tokens: int, sampling) -> Ticket:
        """Queues a request (from the event loop's thread); raises QueueFull or Stopping."""
        with self._lock:
            if self._stopping:
                raise Stopping
            if self._in_flight - self.capacity >= self.max_queue:
                raise QueueFull
            self._in_flight += 1
            self.metrics.waiting = max(0, self._in_flight - self.capacity)
        ticket = Ticket(asyncio.get_running_loop(), len(ids))
        self._inbox.put(("add", ticket, ids, max_new_tokens, sampling))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Takes a request out at the next round boundary (a no-op once it has ended)."""
        if not ticket.done:
            self._inbox.put(("cancel", ticket))
            self._wake.set()

    def stop_accepting(self) -> None:
        with self._lock:
            self._stopping = True

    def stop(self, timeout: float | None = None) -> None:
        """Cancels what is still running, then ends the thread."""
        self.stop_accepting()
        self._inbox.put(("stop",))
        self._wake.set()
        self._thread.join(timeout)

    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    def _run(self) -> None:
        try:
            self.engine.__enter__()
        except BaseException as exc:  # noqa: BLE001  (handed to start())
            self._failed = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._drain():
                self._flush()
                if self.engine.busy():
                    self._step()
                    self._flush()
                else:
                    self._wake.wait()
                    self._wake.clear()
        finally:
            for ticket in list(self._live.values()):
                self.engine.cancel(ticket.request)
                self._send(ticket, None, "cancelled", None)
            self._flush()
            self.engine.__exit__(None, None, None)

    def _drain(self) -> bool:
        """Takes in what the HTTP side sent; False once told to stop."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if message[0] == "stop":
                return False
            if message[0] == "add":
                self._add(*message[1:])
            elif message[1].request is not None and self.engine.cancel(message[1].request):
                self._send(message[1], None, "cancelled", None)

    def _add(self, ticket: Ticket, ids, max_new_tokens: int, sampling) -> None:
        def on_token(token, finish, error):
            self._send(ticket, token, finish, error)

        try:
            ticket.request = self.engine.add(
                ids, max_new_tokens=max_new_tokens, sampling=sampling, on_token=on_token
            )
        except ValueError as exc:  # checked by the server first: not expected
            self._send(ticket, None, "error", exc)
            return
        self._live[ticket.request.index] = ticket
        self.metrics.prompt_tokens += len(ids)

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            self.engine.step()
        except Exception as exc:  # noqa: BLE001  (a bug must fail its requests, not the server)
            for ticket in list(self._live.values()):
                self.engine.cancel(ticket.request)
                self._send(ticket, None, "error", exc)
        self.metrics.record_round(time.perf_counter() - started, self.engine)

    def _send(self, ticket: Ticket, token, finish, error) -> None:
        if ticket.done:
            return
        if token is not None:
            self.metrics.generated_tokens += 1
        if finish is not None:
            ticket.done = True
            if ticket.request is not None:
                self._live.pop(ticket.request.index, None)
            self.metrics.finished[finish] = self.metrics.finished.get(finish, 0) + 1
            with self._lock:
                self._in_flight -= 1
                self.metrics.waiting = max(0, self._in_flight - self.capacity)
        self._outbox.append((ticket, (token, finish, error)))

    def _flush(self) -> None:
        """Hands the round's events to the event loop in one call per loop: one wake-up of
        the loop per round, not per token (16 streams made 16 wake-ups a step)."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, event in self._outbox:
            by_loop.setdefault(ticket.loop, []).append((ticket, event))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # the event loop has closed (shutdown): nobody reads them
                pass


def _deliver(events: list[tuple[Ticket, tuple]]) -> None:
    for ticket, event in events:
        ticket.events.put_nowait(event)
