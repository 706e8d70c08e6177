"""Streaming decode: a reply's tokens as they are made, and its text as it becomes final.

:func:`stream_reply` runs one request through an :class:`~expertflow.serving.engine.Engine`
in the calling thread, so its tokens are exactly those generate_batch gives it (greedy, or
sampled from its own seeded stream). :class:`TextStream` turns token ids into text pieces
that never change afterwards: a token that ends inside a multi-byte character waits for the
next, and text that may be the start of a stop string is held back until it is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from expertflow.serving.engine import Engine
from expertflow.serving.sampling import _Sampling

__all__ = ["Reply", "TextStream", "cpu_expert_runs", "stream_reply"]


class TextStream:
    """Incremental detokenization with stop strings.

    Each :meth:`push` decodes only the tokens since the last text it gave (plus the one
    before, so that tokenizers which drop a leading space at the start of a decode drop it
    from both sides of the difference) and returns the new final text.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] | list[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""  # all text so far (cut before a stop string once one is found)
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0  # token offsets: decoded window start, last text given
        self._shown = 0  # characters of self.text returned so far

    def push(self, token: int) -> str:
        """Adds a token; returns the text it makes final (often '', never after a stop)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = decode(self.ids[self._prefix :], skip_special_tokens=True)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""  # a character still incomplete, or a special token that shows nothing
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        return self._take(final=self.stopped)

    def finish(self) -> str:
        """The text still held back, once no token will come."""
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else len(self.text) - self._held()
        piece, self._shown = self.text[self._shown : end], max(self._shown, end)
        return piece

    def _held(self) -> int:
        """Characters at the end of the text that begin a stop string."""
        for n in range(min(len(self.text), max((len(s) for s in self.stop), default=0)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0


@dataclass
class Reply:
    """What :func:`stream_reply` made: ``tokens``, ``finish`` (``"stop"``, ``"length"``,
    ``"context"``, ``"cancelled"``), ``seconds``, ``cache`` (the cache's counters over the
    reply, for an offloaded model) and ``cpu_experts`` (experts computed on the CPU meanwhile,
    with ``cpu_experts="auto"`` or ``"always"``: the cache never sees those)."""

    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    seconds: float = 0.0
    cache: dict = field(default_factory=dict)
    cpu_experts: int = 0

    @property
    def tokens_per_second(self) -> float | None:
        return len(self.tokens) / self.seconds if self.seconds else None

    @property
    def hit_ratio(self) -> float | None:
        lookups = self.cache.get("hits", 0) + self.cache.get("misses", 0)
        return self.cache["hits"] / lookups if lookups else None


def cpu_expert_runs(model) -> int:
    """Experts an offloaded model has computed on the CPU so far (0 for any other)."""
    return sum(getattr(m, "cpu_expert_runs", 0) for m in model.modules())


def stream_reply(engine: Engine, ids: list[int], reply: Reply, *, max_new_tokens: int,
                 sampling: _Sampling | None = None,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[int]:  # fmt: skip
    """Yields the new tokens of prompt ``ids`` as they are made, filling ``reply``.

    ``cancelled`` is asked between decode steps: when it says True the request is taken out
    and ``reply.finish`` is ``"cancelled"``. A failing step raises its error.
    """
    made: list[tuple[int | None, str | None, Exception | None]] = []
    cache = engine.cache
    before = cache.stats() if cache is not None else {}
    cpu_before = cpu_expert_runs(engine.model)
    started = time.perf_counter()
    request = engine.add(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                         on_token=lambda *event: made.append(event))  # fmt: skip
    try:
        while reply.finish is None:
            if cancelled():
                engine.cancel(request)
                reply.finish = "cancelled"
                break
            engine.step()
            for token, finish, error in made:
                if error is not None:
                    raise error
                if token is not None:
                    reply.tokens.append(token)
                    yield token
                reply.finish = finish or reply.finish
            made.clear()
    finally:
        if reply.finish is None:  # the caller stopped reading: the request must not stay
            engine.cancel(request)
            reply.finish = "cancelled"
        reply.seconds = time.perf_counter() - started
        reply.cpu_experts = cpu_expert_runs(engine.model) - cpu_before
        if cache is not None:
            after = cache.stats()
            reply.cache = {k: after[k] - before.get(k, 0) for k in after}
