"""``GET /metrics`` of ``expertflow serve``: counters kept by the worker thread, written in
Prometheus' text exposition format (no client library: a dozen lines of text)."""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["Metrics"]

# Tokens per second are measured over this many recent seconds.
RATE_WINDOW = 10.0


class Metrics:
    """Written by the worker thread (plain ints and a deque: each update is one store),
    read by the HTTP thread; HTTP statuses are counted by the HTTP side under ``lock``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.started = time.time()
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.waiting = 0
        self.running = 0
        self.finished: dict[str, int] = {}  # finish reason -> requests
        self.http: dict[int, int] = {}  # status code -> responses
        self.cache: dict[str, int] = {}
        self.busy_seconds = 0.0
        self._rounds: deque[tuple[float, int]] = deque()  # (time it ended, tokens it made)
        self._counted = 0  # generated_tokens at the last round's end

    def record_round(self, seconds: float, engine) -> None:
        """After each round (worker thread): speed, occupancy and the cache's counters."""
        now = time.monotonic()
        self.busy_seconds += seconds
        self._rounds.append((now, self.generated_tokens - self._counted))
        self._counted = self.generated_tokens
        while self._rounds and self._rounds[0][0] < now - RATE_WINDOW:
            self._rounds.popleft()
        self.running = engine.running()
        if engine.cache is not None:
            self.cache = engine.cache.stats()

    def count_http(self, status: int) -> None:
        with self.lock:
            self.http[status] = self.http.get(status, 0) + 1

    def tokens_per_second(self) -> float:
        """Tokens generated over the last RATE_WINDOW seconds, per second (0 when idle)."""
        since = time.monotonic() - RATE_WINDOW
        return sum(tokens for t, tokens in list(self._rounds) if t >= since) / RATE_WINDOW

    def render(self, model: str) -> str:
        hits, misses = self.cache.get("hits", 0), self.cache.get("misses", 0)
        lines = []

        def metric(name, kind, help_text, samples):
            lines.append(f"# HELP expertflow_{name} {help_text}")
            lines.append(f"# TYPE expertflow_{name} {kind}")
            for labels, value in samples:
                inner = ",".join(f'{k}="{v}"' for k, v in {"model": model, **labels}.items())
                lines.append(f"expertflow_{name}{{{inner}}} {value}")

        metric("generation_tokens_total", "counter", "Tokens generated.",
               [({}, self.generated_tokens)])  # fmt: skip
        metric("prompt_tokens_total", "counter", "Prompt tokens admitted.",
               [({}, self.prompt_tokens)])  # fmt: skip
        metric("tokens_per_second", "gauge", f"Tokens generated per second over the last "
               f"{RATE_WINDOW:.0f} s.", [({}, round(self.tokens_per_second(), 3))])  # fmt: skip
        metric("queue_length", "gauge", "Requests waiting for a place in a batch.",
               [({}, self.waiting)])  # fmt: skip
        metric("running_requests", "gauge", "Requests decoding.", [({}, self.running)])
        metric("cache_hit_ratio", "gauge", "Expert cache hits over lookups since start.",
               [({}, round(hits / (hits + misses), 6) if hits + misses else 0.0)])  # fmt: skip
        metric("cache_bytes_copied_total", "counter", "Expert bytes copied to device slots.",
               [({}, self.cache.get("bytes_copied", 0))])  # fmt: skip
        for key in ("hits", "misses", "prefetches"):
            metric(f"cache_{key}_total", "counter", f"Expert cache {key}.",
                   [({}, self.cache.get(key, 0))])  # fmt: skip
        with self.lock:
            http = sorted(self.http.items())
        metric("requests_total", "counter", "HTTP responses to generation requests, by status.",
               [({"status": str(code)}, n) for code, n in http])  # fmt: skip
        metric("finished_requests_total", "counter", "Requests ended, by finish reason.",
               [({"reason": r}, n) for r, n in sorted(self.finished.items())])  # fmt: skip
        return "\n".join(lines) + "\n"
