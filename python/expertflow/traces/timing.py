"""The replay's timing model: one host-to-device copy link of fixed bandwidth moving one expert
at a time, and (optionally) a host CPU computing missed experts in place, one at a time, on its
own queue (see :mod:`expertflow.traces.replay`)."""

from __future__ import annotations

import collections

__all__ = ["Cpu", "Link"]


class Link:
    """One copy link: queued prefetches in order, urgent copies ahead of unstarted ones."""

    def __init__(self, seconds_per_copy: float):
        self.seconds_per_copy = seconds_per_copy
        self.busy_until = 0.0
        self.queue: collections.deque[tuple[int, float]] = collections.deque()
        self.done: dict[int, float] = {}  # slot -> arrival time of its latest copy

    def _start_next(self) -> None:
        slot, issued = self.queue.popleft()
        self.busy_until = max(self.busy_until, issued) + self.seconds_per_copy
        self.done[slot] = self.busy_until

    def prefetch(self, slot: int, now: float) -> None:
        self.done.pop(slot, None)
        self.queue.append((slot, now))

    def _start_under_way(self, now: float) -> None:
        while self.queue and max(self.busy_until, self.queue[0][1]) < now:
            self._start_next()  # prefetches already under way when the miss is found

    def backlog(self, now: float) -> float:
        """Seconds from ``now`` until an urgent copy issued now could start."""
        self._start_under_way(now)
        return max(self.busy_until, now) - now

    def urgent(self, slot: int, now: float) -> None:
        self._start_under_way(now)
        self.busy_until = max(self.busy_until, now) + self.seconds_per_copy
        self.done[slot] = self.busy_until

    def expected_arrival(self, slot: int, now: float, urgent_s: float) -> float:
        """When ``slot``'s copy would arrive if ``urgent_s`` seconds of urgent copies were
        issued at ``now`` (they go ahead of every prefetch not yet started), without changing
        anything."""
        self._start_under_way(now)
        if slot in self.done:
            return self.done[slot]
        t = max(self.busy_until, now) + urgent_s
        for queued, issued in self.queue:
            t = max(t, issued) + self.seconds_per_copy
            if queued == slot:
                return t
        return 0.0

    def arrival(self, slot: int) -> float:
        while slot not in self.done and self.queue:
            self._start_next()
        return self.done.get(slot, 0.0)


class Cpu:
    """The host computing missed experts where they lie, one after another, concurrently with
    the link: only the layer that needs an expert waits for it."""

    def __init__(self) -> None:
        self.busy_until = 0.0

    def backlog(self, now: float) -> float:
        """Seconds from ``now`` until an expert issued now could start."""
        return max(self.busy_until, now) - now

    def compute(self, seconds: float, now: float) -> float:
        """Queues one expert of ``seconds``; returns when its result is ready."""
        self.busy_until = max(self.busy_until, now) + seconds
        return self.busy_until
