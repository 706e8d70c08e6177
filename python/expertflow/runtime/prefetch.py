"""Predictive prefetching inside an offloaded model.

* **Path prediction**: the predictor scores every (layer, expert) at the start of each decode
  step, before layer 0 runs, and ``ExpertCache.plan`` copies the predicted experts in layer
  order while the early layers compute.
* **Gate lookahead** (as mixtral-offloading does): when layer l's experts are about to run,
  layer l+1's router is applied to layer l's hidden states; the experts it picks are prefetched
  and its probabilities become layer l+1's eviction scores. Near-exact, but one layer ahead.

The routers' real choices are fed back to the predictor (online learning) and to the cache (a
prefetch the router did not use becomes the first to be evicted: real-time correction).

With ``background=True`` the path prediction runs on a worker thread while the step's first
layers compute (off the critical path); its plan then starts at the first layer whose experts
have not run yet, and the step waits for it, if still running, only before its last layer.

Threads: an offloaded model's forward calls run one at a time (``OffloadState.lock``), so the
per-call state here is never shared by two calls. The rows a decode step continues are followed
per thread (each thread's ``generate`` is its own sequence), and a single-position call counts
as their next step only if its KV cache holds exactly the positions followed so far; any other
call starts a new sequence. Histories of different sequences never mix.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from expertflow.prediction import Predictor
from expertflow.runtime.routing import RoutedCall, hook_routed_calls

__all__ = ["PredictivePrefetcher"]


class _Followed(threading.local):
    """The rows one thread's forward calls follow (each thread sees its own attributes).

    Attributes:
        histories: each row's token ids so far, padding left out; None: nothing followed.
        previous: ``[B, L, K]`` the routing of the rows' last token, once a call finished.
        positions: the positions (padding included) the rows' KV cache holds after the last
            call: the next decode step's cache must hold exactly these.
        driven: what :meth:`PredictivePrefetcher.drive` declared for the next call, if any.
    """

    histories: list[list[int]] | None = None
    previous: np.ndarray | None = None
    positions: int = 0
    driven: tuple | None = None


def _past_length(kwargs: dict) -> int | None:
    """Positions the call's KV cache holds before it runs (0 without one), or None when the
    cache is of a kind this cannot read."""
    past = kwargs.get("past_key_values")
    if past is None:
        return 0
    if hasattr(past, "get_seq_length"):
        return int(past.get_seq_length())
    if isinstance(past, tuple | list) and past and isinstance(past[0], tuple | list) and past[0]:
        return int(past[0][0].shape[-2])  # legacy tuples: [B, heads, S, dim] keys per layer
    return None


class PredictivePrefetcher:
    """Hooks on the model's forward and on each offloaded experts module.

    Prompts (forward calls over more than one position) are not planned: they need most
    experts anyway. Each single-position call (a decode step) is planned from the token ids of
    every batch row so far. ``seconds`` and ``steps`` measure the predictor's cost on the
    critical path; ``background_seconds`` its time on the worker thread (``background=True``).
    """

    def __init__(
        self,
        model: nn.Module,
        cache,
        predictor: Predictor | None,
        modules,
        top_k: int,
        pool_size: int,
        routers: list[nn.Module] | None = None,
        background: bool = False,
        min_score: float = 0.0,
    ):
        layers, experts = len(modules), modules[0].num_experts
        if predictor is None and routers is None:
            raise ValueError("PredictivePrefetcher needs a predictor, routers (lookahead) or both")
        if predictor is not None and (predictor.num_layers, predictor.num_experts) != (
            layers,
            experts,
        ):
            raise ValueError(
                f"predictor is for {predictor.num_layers} layers x {predictor.num_experts} "
                f"experts, the model has {layers} MoE layers x {experts} experts"
            )
        self.cache, self.predictor, self.routers = cache, predictor, routers
        self.top_k, self.pool_size, self.num_layers = top_k, pool_size, layers
        self.min_score = min_score
        self._followed = _Followed()
        self._routing: list[torch.Tensor | None] = [None] * layers
        self._step_ids: list[list[int]] | None = None
        self._keep: list[bool] = []  # per flattened row: a real token, not padding
        self._decoding = False
        self.seconds = 0.0  # predictor time
        self.steps = 0
        self.background_seconds = 0.0
        self._layer = -1  # the layer whose experts run now (read by the worker thread)
        self._job: Future | None = None
        self._worker = (
            # One intra-op thread there: the worker must not take the forward's cores.
            ThreadPoolExecutor(
                1, "expertflow-predictor", initializer=torch.set_num_threads, initargs=(1,)
            )  # fmt: skip
            if background and predictor is not None
            else None
        )
        self.lookahead_seconds = 0.0
        self.lookahead_prefetches = 0
        self._handles = [model.register_forward_pre_hook(self._on_forward, with_kwargs=True)]
        self._handles += hook_routed_calls(modules, self._on_layer)

    def drive(
        self,
        histories,
        previous: np.ndarray | None,
        scores: np.ndarray | None = None,
        reuse: np.ndarray | None = None,
    ):
        """Declares the next forward call a decode step over these rows.

        For drivers that decode several batches in turn (:func:`expertflow.generate_batch`): the
        rows change between calls, so the prefetcher cannot follow them itself. ``histories``
        are each row's ids so far (last = the token about to run), ``previous`` ``[B, L, K]``
        their preceding routing; ``scores`` ``[B, L, E]`` (and the predictor's ``reuse``
        scores), if the driver already predicted them, are planned as they are. It applies to
        the calling thread's next call only.
        """
        self._followed.driven = (histories, previous, scores, reuse)

    def reset(self) -> None:
        """Forgets the rows the calling thread followed so far: its next call is a prompt."""
        followed = self._followed
        followed.histories, followed.previous, followed.driven = None, None, None
        followed.positions = 0

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._worker is not None:
            self._wait_for_plan()
            self._worker.shutdown()
            self._worker = None

    def _wait_for_plan(self) -> None:
        """Waits for the worker's plan of this step (re-raising its error, if any)."""
        if self._job is not None:
            job, self._job = self._job, None
            started = time.perf_counter()
            try:
                job.result()
            finally:
                self.seconds += time.perf_counter() - started

    def _on_forward(self, module, args, kwargs) -> None:
        self._wait_for_plan()  # a forward that raised may have left one behind
        self._layer = -1
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._routing = [None] * self.num_layers
        followed = self._followed
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            self._step_ids = None  # inputs_embeds: nothing to predict from
            followed.histories = None  # and the rows followed are no longer continued
            return
        rows = ids.tolist()
        self._decoding = False
        if followed.driven is not None:
            histories, previous, scores, reuse = followed.driven
            followed.driven, followed.histories = None, None
            self._begin_decode(rows)
            self._plan(histories, previous, scores, reuse)
            return
        past = _past_length(kwargs)
        if not self._continues(followed, tuple(ids.shape), past):
            self._follow_prompt(followed, rows, kwargs.get("attention_mask"))
            followed.positions = (past or 0) + ids.shape[1]
            return
        for history, row in zip(followed.histories, rows, strict=True):
            history.append(row[-1])
        followed.positions += 1
        self._begin_decode(rows)
        self._plan(followed.histories, followed.previous, None)

    @staticmethod
    def _continues(followed: _Followed, shape: tuple[int, int], past: int | None) -> bool:
        """Whether a call over ids of ``shape`` ``(B, width)`` whose KV cache holds ``past``
        positions (None: unknown) is the next decode step of the rows followed: one position
        per row, as many rows, and a cache holding exactly the positions followed (another
        sequence's step, with a cache of its own, starts a new sequence)."""
        if followed.histories is None or shape[1] != 1 or shape[0] != len(followed.histories):
            return False
        return past is None or past == followed.positions

    def _follow_prompt(self, followed: _Followed, rows: list[list[int]], mask) -> None:
        """Starts following the rows of a prompt (padding, where ``mask`` is 0, left out)."""
        shape = (len(rows), len(rows[0]) if rows else 0)
        keep = (
            mask.bool().tolist()
            if isinstance(mask, torch.Tensor) and tuple(mask.shape) == shape
            else [[True] * len(r) for r in rows]
        )
        followed.histories = [
            [t for t, k in zip(r, km, strict=True) if k] or r[-1:]
            for r, km in zip(rows, keep, strict=True)
        ]
        followed.previous = None
        self._step_ids, self._keep = rows, [k for km in keep for k in km]

    def _begin_decode(self, rows: list[list[int]]) -> None:
        self._step_ids, self._keep = rows, [True] * len(rows)
        self._decoding = True
        self.steps += 1

    def _plan(self, histories, previous, scores=None, reuse=None) -> None:
        """Plans the step: the given scores (and reuse scores), else the predictor's."""
        if self.predictor is None:
            return
        started = time.perf_counter()
        per_layer = min(self.pool_size, self.top_k * len(histories))
        if scores is None and self._worker is not None:
            # The rows' histories are not touched until the step ends, when the job is done.
            self._job = self._worker.submit(self._predict_and_plan, histories, previous, per_layer)
        else:
            if scores is None:
                scores, reuse = self.predictor.predict_step_with_reuse(histories, previous)
            self._send_plan(scores, reuse, per_layer, 0)
        self.seconds += time.perf_counter() - started

    def _send_plan(
        self, scores: np.ndarray, reuse: np.ndarray | None, per_layer: int, first_layer: int
    ) -> None:
        """Scores ``[B, L, E]`` (and reuse scores, if any) -> the cache's plan: each expert at
        its best over the batch's rows."""
        best = torch.from_numpy(np.ascontiguousarray(scores.max(axis=0)))
        if reuse is not None:
            reuse = torch.from_numpy(np.ascontiguousarray(reuse.max(axis=0)))
        self.cache.plan(best, per_layer, first_layer, self.min_score, reuse)

    def _predict_and_plan(self, histories, previous, per_layer: int) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            scores, reuse = self.predictor.predict_step_with_reuse(histories, previous)
        self._send_plan(scores, reuse, per_layer, min(self._layer + 1, self.num_layers))
        self.background_seconds += time.perf_counter() - started

    def _on_layer(self, layer: int, call: RoutedCall) -> None:
        if self._step_ids is None:
            return
        self._layer = layer
        self._routing[layer] = call.top_k_index.detach().cpu()
        if self.routers is not None and self._decoding and layer + 1 < self.num_layers:
            self._look_ahead(layer + 1, call.hidden_states)
        if layer == self.num_layers - 1 and all(r is not None for r in self._routing):
            self._finish_step()

    @torch.no_grad()
    def _look_ahead(self, layer: int, hidden: torch.Tensor) -> None:
        started = time.perf_counter()
        logits, _, index = self.routers[layer](hidden.reshape(-1, hidden.shape[-1]))
        scores = torch.softmax(logits.float(), dim=-1).amax(dim=0)
        experts = sorted(set(index.flatten().tolist()))
        self.lookahead_prefetches += self.cache.prefetch(layer, experts, scores)
        self.lookahead_seconds += time.perf_counter() - started

    def _finish_step(self) -> None:
        self._wait_for_plan()  # before the rows' histories change and before learning
        rows = self._step_ids
        batch, width = len(rows), len(rows[0])
        routing = torch.stack(self._routing, dim=1).view(batch, width, self.num_layers, -1)
        routing = routing.numpy()
        self._followed.previous = routing[:, -1]
        flat_ids = [t for r in rows for t in r]
        flat = routing.reshape(batch * width, self.num_layers, -1)
        real = np.flatnonzero(self._keep)
        if self.predictor is not None:
            self.predictor.learn([flat_ids[i] for i in real], flat[real])
        self._step_ids = None
