"""Batched generation: many requests decoded in turns of batches, optionally regrouped.

:func:`generate_batch` keeps ``active_batches`` batches of up to ``batch_size`` requests and
lets them take one decode step each in turn (continuous batching: a finished request leaves its
batch and the next waiting one is prefilled into its place; prompts of equal length are
prefilled together, unpadded). Every request owns its rows of its batch's KV cache: rows of
different lengths are left-padded with zeros and masked, and each row gets its own positions,
so a request decodes exactly as it would alone.

With ``schedule="expertflow"`` (ExpertFlow's token scheduler), before every round (one decode
step of each active batch) the requests of the active batches are regrouped, keeping the batch
sizes, so that the batches need as few distinct (layer, expert) pairs as possible by their
predicted routing paths: every pair of batches is re-split with the native two-batch split
(:func:`~expertflow.serving.scheduler.regroup`). Their KV rows move with them. With two active
batches this is ExpertFlow's re-split of two consecutive batches; more active batches give the
scheduler more requests to match (measured in ``bench/bench_generate_batch.py``). The round
then runs each batch after the one it shares most predicted experts with, starting from the
batch that ran last, so that the slots one batch filled serve the next."""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from expertflow.prediction import Predictor, multi_hot
from expertflow.serving.arguments import _check_counts, _check_predictor_arg, _check_schedule
from expertflow.serving.kv_rows import _exchange_rows, _regroup_moves, _Rows
from expertflow.serving.model_calls import _ModelCalls
from expertflow.serving.regrouping import _predicted_paths, _turn_order
from expertflow.serving.requests import _Outcomes, _prefill_groups, _prompt_ids, _Request
from expertflow.serving.routing_tap import _RoutingTap
from expertflow.serving.sampling import _eos_ids, _Sampling
from expertflow.serving.scheduler import regroup

__all__ = ["BatchGeneration", "generate_batch"]


@dataclass
class BatchGeneration:
    """What :func:`generate_batch` returns.

    ``sequences[i]``: the new tokens of request i (ending with the EOS token if it stopped
    there). ``finish_reasons[i]``: ``"stop"`` (EOS), ``"length"`` (max_new_tokens),
    ``"context"`` (the model's context is full) or ``"error"`` (then ``errors[i]`` holds the
    exception and ``sequences[i]`` the tokens made before it). ``stats``: see
    :func:`generate_batch`.
    """

    sequences: list[list[int]]
    finish_reasons: list[str]
    errors: dict[int, Exception] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


class _Generator:
    """One generate_batch call: admits waiting requests into batches, runs rounds of decode
    steps (regrouping the batches first with ``schedule="expertflow"``) and keeps the stats."""

    def __init__(self, calls: _ModelCalls, requests: list[_Request], outcomes: _Outcomes, *,
                 batch_size, schedule, active_batches, regroup_every, prefill_padding, predictor,
                 lock):  # fmt: skip
        self.calls, self.outcomes = calls, outcomes
        self.batch_size, self.schedule, self.predictor = batch_size, schedule, predictor
        self.regroup_every, self.prefill_padding = regroup_every, prefill_padding
        self.lock = lock  # held around predictions (the offloaded model's, or a null context)
        self.num_experts = calls.tap.num_experts
        self.waiting = deque(requests)
        self.batches = [_Rows.concat([]) for _ in range(active_batches)]
        self.stats = {
            "prefill_seconds": 0.0,
            "prefill_tokens": 0,  # positions run by prefill calls, padding included
            "decode_seconds": 0.0,
            "schedule_seconds": 0.0,
            "decode_steps": 0,
            "decode_tokens": 0,
            "kv_rows_moved": 0,
            "regroups": 0,
        }
        self._distinct: list[float] = []  # per decode step: mean distinct experts per layer
        self._last_union: np.ndarray | None = None  # [L, E] experts of the last decode step
        self._rounds = 0

    def run(self) -> None:
        while self.busy():
            self.round()

    def busy(self) -> bool:
        """Whether a request waits or decodes."""
        return bool(self.waiting) or any(len(b) for b in self.batches)

    def round(self) -> None:
        """Admits waiting requests into free rows, regroups (``"expertflow"``), then gives
        every batch holding requests one decode step. A request added to ``waiting`` between
        rounds joins at the next one (continuous batching, :mod:`expertflow.serving.engine`)."""
        for batch in range(len(self.batches)):
            self._admit(batch)
        order = list(range(len(self.batches)))
        if self.schedule == "expertflow" and self._rounds % self.regroup_every == 0:
            order = self._regroup() or order
        self._rounds += 1
        live = [b for b in order if len(self.batches[b])]
        for i, batch in enumerate(live):
            # The last batch's follower already ran this round: its paths are gone.
            following = self.batches[live[i + 1]].requests if i + 1 < len(live) else []
            self.batches[batch] = self._step(self.batches[batch], following)

    def remove(self, request: _Request) -> bool:
        """Takes a request out, waiting or decoding (its KV rows dropped); False if it is in
        neither (it has already finished)."""
        for i, waiting in enumerate(self.waiting):
            if waiting is request:
                del self.waiting[i]
                return True
        for b, rows in enumerate(self.batches):
            if any(r is request for r in rows.requests):
                keep = [i for i, r in enumerate(rows.requests) if r is not request]
                self.batches[b] = rows.select(keep)
                return True
        return False

    def distinct_experts_per_layer(self) -> float | None:
        return float(np.mean(self._distinct)) if self._distinct else None

    def _admit(self, batch: int) -> None:
        """Fills the batch with waiting requests, prefilling their prompts together in groups
        of similar length (:func:`~expertflow.serving.requests._prefill_groups`)."""
        while len(self.batches[batch]) < self.batch_size and self.waiting:
            free = self.batch_size - len(self.batches[batch])
            admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            groups = _prefill_groups(admitted, self.prefill_padding)
            new = [self._prefill(group) for group in groups]
            self.batches[batch] = _Rows.concat([self.batches[batch], *new])

    def _prefill(self, requests: list[_Request]) -> _Rows:
        """Prefills the prompts together; returns the rows of those that go on. A failing group
        is retried one prompt at a time, so that only the prompts that fail alone fail."""
        started = time.perf_counter()
        self.stats["prefill_tokens"] += len(requests) * max(len(r.ids) for r in requests)
        try:
            tokens, paths, rows = self.calls.prefill(requests)
        except Exception as error:  # noqa: BLE001  (one request's failure must not stop the rest)
            self.stats["prefill_seconds"] += time.perf_counter() - started
            if len(requests) == 1:
                self.outcomes.fail(requests[0], error)
                return _Rows.concat([])
            return _Rows.concat([self._prefill([r]) for r in requests])
        self.stats["prefill_seconds"] += time.perf_counter() - started
        going_on = [
            i
            for i, (request, token, path) in enumerate(zip(requests, tokens, paths, strict=True))
            if self.outcomes.accept(request, token, path)
        ]
        return rows if len(going_on) == len(requests) else rows.select(going_on)

    def _step(self, rows: _Rows, following: list[_Request]) -> _Rows:
        """One decode step of a batch; returns the rows still going on. A failing step is
        retried one request at a time, so that only the requests that fail alone fail."""
        started = time.perf_counter()
        try:
            tokens, routing, rows = self.calls.decode(rows, following)
        except Exception as error:  # noqa: BLE001
            self.stats["decode_seconds"] += time.perf_counter() - started
            if len(rows) == 1:
                self.outcomes.fail(rows.requests[0], error)
                return _Rows.concat([])
            singles = [self._step(rows.select([r]), following) for r in range(len(rows))]
            return _Rows.concat(singles)
        self.stats["decode_seconds"] += time.perf_counter() - started
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(rows)
        self._distinct.append(
            float(np.mean([len(np.unique(routing[:, layer])) for layer in range(routing.shape[1])]))
        )
        if self.schedule == "expertflow":  # the next round's turn order starts from it
            self._last_union = multi_hot(routing, self.num_experts).any(axis=0) > 0
        going_on = [
            r
            for r, (request, token) in enumerate(zip(rows.requests, tokens, strict=True))
            if self.outcomes.accept(request, token, routing[r])
        ]
        return rows if len(going_on) == len(rows) else rows.select(going_on)

    def _regroup(self) -> list[int] | None:
        """Regroups the requests of all active batches by predicted paths (sizes kept);
        returns the round's turn order, or None with fewer than two active batches."""
        live = [b for b, rows in enumerate(self.batches) if len(rows)]
        if len(live) < 2:
            return None
        started = time.perf_counter()
        requests = [r for b in live for r in self.batches[b].requests]
        current = [k for k, b in enumerate(live) for _ in self.batches[b].requests]
        paths = _predicted_paths(requests, self.predictor, self.num_experts, self.lock)
        new = regroup(paths, current, len(live))
        moving = sum(1 for old, g in zip(current, new, strict=True) if old != g)
        if moving:
            moves = _regroup_moves([len(self.batches[b]) for b in live], current, new)
            _exchange_rows(self.batches, [(live[a], r, live[b], s) for a, r, b, s in moves])
            self.stats["kv_rows_moved"] += moving
            self.stats["regroups"] += 1
        order = _turn_order(paths, new, live, self._last_union)
        self.stats["schedule_seconds"] += time.perf_counter() - started
        return order


def generate_batch(
    model: nn.Module,
    prompts,
    *,
    max_new_tokens: int,
    batch_size: int,
    schedule: str = "fifo",
    active_batches: int = 4,
    regroup_every: int = 1,
    prefill_padding: float = 0.25,
    predictor: Predictor | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> BatchGeneration:
    """Generation for many requests, ``batch_size`` at a time: greedy, or sampled.

    Every request's tokens are those it would get decoded alone, whatever the batching and
    scheduling: greedy on the model's logits, or sampled from its own random stream.

    Args:
        model: a transformers causal LM, offloaded by :func:`expertflow.offload` or not.
        prompts: token ids per request (lists or 1-D tensors), in arrival order.
        max_new_tokens: at most this many new tokens per request.
        batch_size: requests per decode batch.
        schedule: ``"fifo"`` (batches keep their requests in arrival order) or
            ``"expertflow"`` (consecutive batches regrouped by predicted routing, see module).
        active_batches: batches decoding in turn; their requests' KV caches are all held.
            The scheduler regroups among all of them: more gives it more requests to match
            (4 by default; on the demo model at batch 16, 2 active batches cut distinct
            experts per step by about 10%, 4 by about 19%). At most
            ``ceil(len(prompts) / batch_size)`` are used: the others would stay empty.
        regroup_every: with ``"expertflow"``, regroup every this many rounds (1: each round,
            as ExpertFlow does). Requests' paths drift slowly, so a grouping stays good for a
            few rounds, and each regrouping costs KV row moves (README, "Batched generation").
        prefill_padding: prompts admitted together are prefilled in one forward call, the
            shorter ones left-padded, in groups of similar length whose padding adds at most
            this share of their real tokens (padded positions cost as much as real ones);
            0: only prompts of equal length share a call.
        predictor: predicts the routing paths the scheduler groups by; default: the offloaded
            model's predictor, or else each request's previous routing.
        eos_token_id: ends a request; default: the model's ``generation_config``.
        do_sample: sample instead of taking the most likely token; ``temperature`` divides the
            logits, ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose
            probability reaches p. Request i samples from a generator seeded ``seed + i``
            (each must be a seed torch takes, in ``[-2**63, 2**64)``).

    Returns:
        A :class:`BatchGeneration`. Its ``stats``: ``seconds``, ``tokens_per_second`` (all new
        tokens over all time), ``prefill_seconds``, ``prefill_tokens`` (positions prefilled,
        padding included), ``decode_seconds``, ``schedule_seconds``
        (predictions, splits and KV moves), ``decode_steps``, ``decode_tokens``,
        ``distinct_experts_per_layer`` (mean over decode steps of the distinct experts a step
        ran per MoE layer), ``kv_rows_moved``, ``regroups`` and, for an offloaded model, the
        cache's counters over the call (``hits``, ``misses``, ``prefetches``,
        ``bytes_copied``, ...). If every request fails, the first error is raised.

    Threads: calls from several threads on one model each get their own tokens. An offloaded
    model's forward calls take turns (``OffloadState.lock``), so the calls share its speed, and
    their ``stats["cache"]`` count every call the cache served meanwhile.
    """
    # Every argument is checked before any work (a bad one fails the call, not a request).
    max_new_tokens, batch_size, active_batches, regroup_every, prefill_padding = _check_counts(
        max_new_tokens, batch_size, active_batches, regroup_every, prefill_padding
    )
    sampling = _Sampling.checked(do_sample, temperature, top_k, top_p, seed)
    _check_schedule(schedule, active_batches)
    _check_predictor_arg(predictor)
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    vocab = getattr(config, "vocab_size", None)
    requests = [_Request(i, ids) for i, ids in enumerate(_prompt_ids(prompts, vocab, context))]
    sampling.check_seeds(len(requests))
    eos = _eos_ids(model, eos_token_id, vocab)
    # Batches past the first ceil(requests / batch_size) never hold a request (admission fills
    # the first ones), yet each round would visit them: active_batches=10**7 ran for minutes.
    active_batches = min(active_batches, -(-len(requests) // batch_size))
    state = getattr(model, "_expertflow", None)
    prefetcher = state.prefetcher if state is not None else None
    predictor = _resolve_predictor(predictor, prefetcher)
    outcomes = _Outcomes(max_new_tokens, eos, context)
    cache = state.cache if state is not None else None
    before = cache.stats() if cache is not None else None
    started = time.perf_counter()
    with torch.no_grad(), _RoutingTap(model) as tap:
        _check_predictor(predictor, tap)
        if schedule == "expertflow":  # the only schedule that runs the predictor here
            _check_predictor_vocab(predictor, vocab, requests)
        run = _Generator(
            _ModelCalls(model, tap, sampling, prefetcher),
            requests,
            outcomes,
            batch_size=batch_size,
            schedule=schedule,
            active_batches=active_batches,
            regroup_every=regroup_every,
            prefill_padding=prefill_padding,
            predictor=predictor,
            lock=state.lock if state is not None else contextlib.nullcontext(),
        )
        try:
            run.run()
        finally:
            if prefetcher is not None:
                prefetcher.reset()
    seconds = time.perf_counter() - started
    if len(outcomes.errors) == len(requests):
        raise outcomes.errors[min(outcomes.errors)]
    return BatchGeneration(
        sequences=[r.generated for r in requests],
        finish_reasons=[outcomes.finish[r.index] for r in requests],
        errors=outcomes.errors,
        stats=_run_stats(run, requests, seconds, cache, before),
    )


def _run_stats(run, requests, seconds: float, cache, before: dict | None) -> dict:
    """The run's figures: speed, the generator's counters, and what the cache did meanwhile."""
    generated = sum(len(r.generated) for r in requests)
    stats = {
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds else None,
        **run.stats,
        "distinct_experts_per_layer": run.distinct_experts_per_layer(),
    }
    if cache is not None:
        after = cache.stats()
        stats["cache"] = {k: after[k] - before[k] for k in after}
    return stats


def _resolve_predictor(predictor: Predictor | str | None, prefetcher) -> Predictor | None:
    """The predictor given (loaded, if a folder), else the offloaded model's, else None."""
    if predictor is None:
        return prefetcher.predictor if prefetcher is not None else None
    if isinstance(predictor, Predictor):
        return predictor
    from expertflow.prediction import load_predictor

    return load_predictor(predictor)


def _check_predictor(predictor: Predictor | None, tap: _RoutingTap) -> None:
    layers, experts = len(tap.modules), tap.num_experts
    if predictor is not None and (predictor.num_layers, predictor.num_experts) != (layers, experts):
        raise ValueError(
            f"generate_batch: predictor is for {predictor.num_layers} layers x "
            f"{predictor.num_experts} experts, the model has {layers} MoE layers x {experts} "
            "experts"
        )


def _check_predictor_vocab(predictor: Predictor | None, vocab, requests: list[_Request]) -> None:
    """Refuses a predictor (or a part of one) whose vocabulary is smaller than the model's:
    it fails on the first larger id, prompted or generated, after the prefill work (trained
    for another tokenizer?). Without the model's size, only the prompts are checked."""
    parts = [] if predictor is None else [predictor, *getattr(predictor, "parts", [])]
    sizes = [getattr(p, "hparams", {}).get("vocab_size") for p in parts]
    mine = min((v for v in sizes if isinstance(v, int)), default=None)
    if mine is None:
        return
    if isinstance(vocab, int) and vocab > mine:
        raise ValueError(
            f"generate_batch: predictor reads token ids in [0, {mine}), the model's vocabulary "
            f"has {vocab} (config.vocab_size): trained for another tokenizer?"
        )
    for request in requests:
        if max(request.ids) >= mine:
            raise ValueError(
                f"generate_batch: prompts[{request.index}] has token id {max(request.ids)}, "
                f"outside the predictor's vocabulary [0, {mine})"
            )
