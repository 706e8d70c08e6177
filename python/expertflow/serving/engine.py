"""Continuous batching for requests that arrive one at a time: the engine behind ``expertflow
chat``, ``generate`` and ``serve``.

:func:`~expertflow.serving.generation.generate_batch` knows all its prompts up front; an
:class:`Engine` is given them as they come and drives the same machinery
(:class:`~expertflow.serving.generation._Generator`: admission into free rows, prefill groups,
per-request KV rows, ``schedule="expertflow"`` regrouping, decode steps) one round at a time. A
request therefore gets exactly the tokens generate_batch, and decoding alone, give it, whatever
else runs. Each request has its own token limit and sampling options and is told every token
as it is made; it can be cancelled between rounds, its KV rows dropped.

One thread owns an engine: its routing tap keeps the routing of that thread's forward calls
only, and rounds must not overlap. :mod:`expertflow.serving.worker` feeds one from others.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from expertflow.serving.arguments import _check_counts, _check_predictor_arg, _check_schedule
from expertflow.serving.generation import (
    _check_predictor,
    _check_predictor_vocab,
    _Generator,
    _resolve_predictor,
)
from expertflow.serving.model_calls import _ModelCalls
from expertflow.serving.requests import _Outcomes, _Request
from expertflow.serving.routing_tap import _RoutingTap
from expertflow.serving.sampling import _eos_ids, _Sampling

__all__ = ["Engine", "OnToken"]

# on_token(token, finish, error): token is the new id (None when the request failed), finish
# None while it goes on, else "stop", "length", "context" or "error" (then error is set).
OnToken = Callable[[int | None, str | None, Exception | None], None]


class Engine:
    """Requests decoded in continuously refilled batches; used as a context manager by the
    thread that runs it (``with Engine(model, ...) as engine: ... engine.step()``).

    Args:
        model, batch_size, schedule, active_batches, regroup_every, prefill_padding,
        predictor, eos_token_id: as for :func:`~expertflow.serving.generation.generate_batch`
            (``active_batches`` is not capped here: requests keep coming).
    """

    def __init__(self, model: nn.Module, *, batch_size: int = 8, schedule: str = "fifo",
                 active_batches: int = 4, regroup_every: int = 1, prefill_padding: float = 0.25,
                 predictor=None, eos_token_id=None):  # fmt: skip
        _, batch_size, active_batches, regroup_every, prefill_padding = _check_counts(
            1, batch_size, active_batches, regroup_every, prefill_padding
        )
        _check_schedule(schedule, active_batches)
        _check_predictor_arg(predictor)
        self.model = model
        config = getattr(model, "config", None)
        self.context = getattr(config, "max_position_embeddings", None)
        self.vocab = getattr(config, "vocab_size", None)
        self.eos = _eos_ids(model, eos_token_id, self.vocab)
        state = getattr(model, "_expertflow", None)
        self._prefetcher = state.prefetcher if state is not None else None
        self._lock = state.lock if state is not None else contextlib.nullcontext()
        self.cache = state.cache if state is not None else None
        self._options = dict(batch_size=batch_size, schedule=schedule,
                             active_batches=active_batches, regroup_every=regroup_every,
                             prefill_padding=prefill_padding)  # fmt: skip
        self._predictor = _resolve_predictor(predictor, self._prefetcher)
        self._ids = itertools.count()
        self._tap: _RoutingTap | None = None
        self._run: _Generator | None = None

    def __enter__(self) -> Engine:
        tap = _RoutingTap(self.model).__enter__()
        try:
            _check_predictor(self._predictor, tap)
            if self._options["schedule"] == "expertflow":
                _check_predictor_vocab(self._predictor, self.vocab, [])
        except Exception:
            tap.__exit__(None, None, None)
            raise
        self._tap = tap
        self._outcomes = _Outcomes(1, self.eos, self.context)  # every request sets its limit
        calls = _ModelCalls(self.model, tap, _Sampling(), self._prefetcher)
        self._run = _Generator(calls, [], self._outcomes, predictor=self._predictor,
                               lock=self._lock, **self._options)  # fmt: skip
        return self

    def __exit__(self, *exc) -> None:
        if self._tap is not None:
            self._tap.__exit__(*exc)
        self._tap = self._run = None  # its requests are dropped with it
        if self._prefetcher is not None:
            self._prefetcher.reset()

    @property
    def stats(self) -> dict:
        """The generator's counters (``decode_tokens``, ``prefill_tokens``, ``regroups``, ...)."""
        return dict(self._running().stats)

    def busy(self) -> bool:
        """Whether a request waits or decodes."""
        return self._running().busy()

    def running(self) -> int:
        """Requests decoding in a batch."""
        return sum(len(rows) for rows in self._running().batches)

    def waiting(self) -> int:
        """Requests not yet admitted into a batch."""
        return len(self._running().waiting)

    def add(self, ids, *, max_new_tokens: int, on_token: OnToken,
            sampling: _Sampling | None = None) -> _Request:  # fmt: skip
        """Queues a request: ``ids`` the prompt's token ids, ``sampling`` its options (None:
        greedy; a sampled request's generator is seeded with ``sampling.seed``). It joins a
        batch at the next round; ``on_token`` is called for each token and at the end."""
        run = self._running()
        ids = self._checked_ids(ids)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int | np.integer):
            raise ValueError(f"Engine.add: max_new_tokens must be an int, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"Engine.add: max_new_tokens must be >= 1, got {max_new_tokens}")
        if sampling is not None and not isinstance(sampling, _Sampling):
            raise ValueError(f"Engine.add: sampling must be a _Sampling or None, got {sampling!r}")

        def notify(request: _Request, finish: str | None) -> None:
            error = self._outcomes.errors.pop(request.index, None) if finish else None
            if finish:
                self._outcomes.finish.pop(request.index, None)  # kept by nobody afterwards
            on_token(None if finish == "error" else request.generated[-1], finish, error)

        request = _Request(next(self._ids), ids, max_new_tokens=int(max_new_tokens),
                           sampling=sampling, notify=notify)  # fmt: skip
        run.waiting.append(request)
        return request

    def cancel(self, request: _Request) -> bool:
        """Takes a request out (between rounds); False if it had already finished."""
        return self._running().remove(request)

    def step(self) -> None:
        """One round: waiting requests admitted, then one decode step of every batch."""
        run = self._running()
        with torch.no_grad():
            run.round()
        # generate_batch averages the distinct experts of every step at its end; a server's
        # engine never ends, and that list would grow by one entry per step for ever.
        run._distinct.clear()

    def _running(self) -> _Generator:
        if self._run is None:
            raise RuntimeError("Engine: use it inside `with engine:` (in the thread running it)")
        return self._run

    def _checked_ids(self, ids) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if not isinstance(ids, list | tuple) or not ids:
            raise ValueError("Engine.add: ids must be a non-empty list of token ids")
        if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"Engine.add: ids must be int token ids, got {ids!r:.80}")
        ids = [int(t) for t in ids]
        if self.vocab is not None and not all(0 <= t < self.vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < self.vocab)
            raise ValueError(
                f"Engine.add: token id {bad} is outside the vocabulary [0, {self.vocab})"
            )
        if self.context is not None and len(ids) > self.context:
            raise ValueError(
                f"Engine.add: the prompt has {len(ids)} tokens, more than the model's context "
                f"of {self.context}"
            )
        return ids
