"""The predictor interface and what every kind shares: multi-hot routing and reuse horizons.

For a sequence, ``predict(token_ids)`` scores the routing of the *last* id in ``token_ids``
(the token about to be processed: at decode time it has just been sampled, so its id is known)
from the ids so far; ``observe(routing)`` then tells the predictor what the routers really
chose for it, so online predictors can learn. ``reset()`` starts a new sequence.
``predict_trace`` runs this protocol over a whole trace (each token predicted only from earlier
routing and ids up to its own) and is what evaluation and replay use.

A predictor that reads token ids says so (``needs_token_ids``); on a trace recorded without
them the others still run from routing alone (``without_token_ids`` says what is lost).
"""

from __future__ import annotations

import numpy as np

from expertflow.prediction._checks import check_token_ids, checked_int
from expertflow.traces.format import Trace

__all__ = ["REUSE_HORIZONS", "Predictor", "multi_hot", "uses_within"]

# Token distances the reuse head predicts a use within. Replayed on the demo model's held-out
# routing at 25% slots with true uses as scores (bench/bench_predictor.py's oracle rows), the
# next step alone left 1.45x Belady's bytes and adding these horizons 1.15x; in one-off
# replays, 2 tokens ahead alone gave 1.32x and 4 tokens 1.18x. Their mean ranks an expert by
# how soon it is needed, not just whether.
REUSE_HORIZONS = (1, 2, 4, 8, 16)


def multi_hot(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[..., K]`` expert ids (-1 = none) -> ``[..., E]`` float32 0/1."""
    out = np.zeros((*expert_ids.shape[:-1], num_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(expert_ids < 0, num_experts, expert_ids), 1.0, axis=-1)
    return out[..., :num_experts]


def uses_within(hot: np.ndarray, horizons) -> np.ndarray:
    """``hot [T, K]`` (one sequence's multi-hot routing, uint8) -> ``[T, len(horizons), K]``:
    whether each output is used within each horizon of tokens after the row's token."""
    out = np.zeros((len(hot), len(horizons), hot.shape[1]), np.uint8)
    within = np.zeros_like(hot)
    distance = 0
    for h, horizon in enumerate(horizons):
        while distance < horizon:
            distance += 1
            if distance < len(hot):
                np.maximum(within[:-distance], hot[distance:], out=within[:-distance])
        out[:, h] = within
    return out


class Predictor:
    """Base class: shapes, the sequence protocol, and saving."""

    kind = "base"
    # Whether scoring reads token ids (a trace without them is then refused). True unless a
    # kind says otherwise: a subclass written before traces could lack ids may read them.
    needs_token_ids = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers = checked_int("num_layers", num_layers, 1)
        self.num_experts = checked_int("num_experts", num_experts, 1)
        self.top_k = checked_int("top_k", top_k, 1)

    def check_shape(self, trace: Trace) -> None:
        """Refuses a trace of another model (layers/experts mismatch), naming both shapes."""
        mine = (self.num_layers, self.num_experts)
        theirs = (trace.num_layers, trace.num_experts)
        if mine != theirs:
            raise ValueError(
                f"predictor is for {mine[0]} layers x {mine[1]} experts, the trace has "
                f"{theirs[0]} layers x {theirs[1]} experts"
            )

    def check_trace(self, trace: Trace) -> None:
        """Refuses a trace of another model (:meth:`check_shape`), a trace with negative token
        ids, and a trace without token ids if this predictor reads them."""
        self.check_shape(trace)
        if trace.token_ids is not None:
            check_token_ids(trace.token_ids, where="trace token_ids")
        if self.needs_token_ids and trace.token_ids is None:
            raise ValueError(
                f"{self.label} reads token ids: this trace has no token_ids "
                "(record it with `expertflow trace`; the history predictor works without)"
            )

    def checked_routing(self, routing, rows: int) -> np.ndarray:
        """``routing`` as an int array ``[rows, L, K]`` of expert ids in ``[-1, E)``, refused
        otherwise (an id past E would be learnt into another layer's scores or fail deep in
        numpy)."""
        routing = np.asarray(routing)
        if (
            routing.ndim != 3
            or routing.shape[:2] != (rows, self.num_layers)
            or not np.issubdtype(routing.dtype, np.integer)
        ):
            raise ValueError(
                f"routing must be int expert ids [{rows}, {self.num_layers}, K] (one row per "
                f"token id), got {routing.dtype} {list(routing.shape)}"
            )
        if routing.size and (routing.min() < -1 or routing.max() >= self.num_experts):
            raise ValueError(
                f"routing must hold expert ids in [-1, {self.num_experts}), got values in "
                f"[{routing.min()}, {routing.max()}]"
            )
        return routing

    def without_token_ids(self) -> tuple[Predictor | None, list[str]]:
        """What of this predictor runs on a trace without token ids, and what that loses
        (one sentence each): ``(self, [])`` when ids are not read, ``(None, [why])`` when
        nothing runs without them."""
        if self.needs_token_ids:
            return None, [f"{self.label} reads token ids"]
        return self, []

    @property
    def label(self) -> str:
        """How messages name this predictor: its kind, or its class for a kind of its own."""
        if self.kind == Predictor.kind:
            return type(self).__name__
        return f"the {self.kind} predictor"

    def predict_step(self, histories, previous: np.ndarray | None) -> np.ndarray:
        """One decode step of a batch: ``histories[b]`` are row b's token ids so far (its last
        id is the token about to run; None where ids are unknown, for a predictor that does
        not need them), ``previous`` ``[B, L, K]`` the routing of each row's preceding token
        (None at a sequence's first token). Returns ``[B, L, E]`` scores."""
        raise NotImplementedError

    def predict_step_with_reuse(
        self, histories, previous: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_step`'s scores and ``[B, L, E]`` reuse scores: each (layer,
        expert)'s predicted demand in the tokens after this step (the mean over
        :data:`REUSE_HORIZONS` of the probability of a use within that many tokens), or None
        for a predictor without a reuse head."""
        return self.predict_step(histories, previous), None

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        """``[T, L, E]`` reuse scores over a trace (as :meth:`predict_trace`), or None."""
        return None

    def learn(self, token_ids, routing: np.ndarray) -> None:
        """Online learning: ``routing [B, L, K]`` is what the routers chose for ``token_ids``
        (an id may be None where unknown)."""

    def reset(self) -> None:
        """Starts a new (single) sequence for :meth:`predict` / :meth:`observe`."""
        self._previous = None
        self._last = None

    def predict(self, token_ids) -> np.ndarray:
        """``[L, E]`` scores for the last of ``token_ids``, in a single-sequence session."""
        if isinstance(token_ids, str | bytes) or not len(token_ids):
            raise ValueError(
                f"token_ids must be a non-empty list of token ids, got {token_ids!r:.80}"
            )
        last = token_ids[-1]
        self._last = None if last is None else int(last)
        previous = None if getattr(self, "_previous", None) is None else self._previous[None]
        return self.predict_step([list(token_ids)], previous)[0]

    def observe(self, routing: np.ndarray) -> None:
        """The routers' real choice ``[L, K]`` for the token just predicted."""
        routing = np.asarray(routing)
        self.learn([self._last], routing[None])
        self._previous = routing

    def predict_trace(self, trace: Trace) -> np.ndarray:
        """``[T, L, E]`` scores, each token predicted before its own routing is observed. On a
        trace without token ids (for a predictor that does not need them) every id is None."""
        self.check_trace(trace)
        scores = np.zeros((trace.num_tokens, self.num_layers, self.num_experts), np.float32)
        for rows in trace.sequence_rows():
            self.reset()
            if trace.token_ids is None:
                ids = [None] * len(rows)
            else:
                ids = trace.token_ids[rows].tolist()
            for i, row in enumerate(rows):
                scores[row] = self.predict(ids[: i + 1])
                self.observe(trace.expert_ids[row])
        return scores

    def _meta(self) -> dict:
        return {
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }
