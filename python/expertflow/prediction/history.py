"""The history predictor: what a token id chose before, what the previous token chose, and
each layer's expert frequencies. Needs no training, and no token ids (it then scores from
routing alone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expertflow.prediction._checks import check_token_ids, checked_weights
from expertflow.prediction.base import Predictor, multi_hot
from expertflow.traces.format import Trace

__all__ = ["HistoryPredictor"]


class HistoryPredictor(Predictor):
    """Score = ``w_token`` x (what this token id chose before, an average over its past
    occurrences) + ``w_previous`` x (the previous token's choice) + ``w_frequency`` x (each
    layer's expert frequencies). Learns online as it observes; ``fit`` warm-starts it.

    Where token ids are unknown (None in a history, or a trace without ``token_ids``) the
    first term is left out: the previous token's routing and the frequencies need no ids."""

    kind = "history"
    needs_token_ids = False

    def __init__(
        self, num_layers, num_experts, top_k, *, w_token=1.0, w_previous=0.6, w_frequency=0.2
    ):
        super().__init__(num_layers, num_experts, top_k)
        self.weights = tuple(
            checked_weights(
                "HistoryPredictor",
                ["w_token", "w_previous", "w_frequency"],
                [w_token, w_previous, w_frequency],
            )
        )
        self._token_sum: dict[int, np.ndarray] = {}
        self._token_count: dict[int, int] = {}
        self._frequency = np.zeros((num_layers, num_experts), np.float64)
        self.reset()

    def without_token_ids(self) -> tuple[Predictor, list[str]]:
        return self, [
            "the history predictor scores from the previous token's routing and each layer's "
            "expert frequencies only (its per-token-id part needs token ids)"
        ]

    def fit(self, traces: list[Trace]) -> HistoryPredictor:
        """Adds the routing of every token of ``traces`` to the tables (to the frequencies
        only for a trace without ``token_ids``)."""
        for trace in traces:
            self.check_trace(trace)
            hot = multi_hot(trace.expert_ids, self.num_experts)
            self._frequency += hot.sum(axis=0)
            if trace.token_ids is None:
                continue
            for token in np.unique(trace.token_ids):
                rows = hot[trace.token_ids == token]
                t = int(token)
                self._token_sum[t] = self._token_sum.get(t, 0) + rows.sum(axis=0)
                self._token_count[t] = self._token_count.get(t, 0) + len(rows)
        return self

    def predict_step(self, histories, previous) -> np.ndarray:
        w_token, w_previous, w_frequency = self.weights
        check_token_ids([ids[-1] for ids in histories])  # the ids this predictor reads
        total = self._frequency.sum(axis=1, keepdims=True)
        base = w_frequency * (self._frequency / np.maximum(total, 1)) * self.top_k
        scores = np.repeat(base[None].astype(np.float32), len(histories), axis=0)
        if previous is not None:
            scores += w_previous * multi_hot(np.asarray(previous), self.num_experts)
        for b, ids in enumerate(histories):
            if ids[-1] is None:
                continue
            token = int(ids[-1])
            if token in self._token_sum:
                scores[b] += w_token * self._token_sum[token] / self._token_count[token]
        return scores

    def learn(self, token_ids, routing) -> None:
        check_token_ids(token_ids)  # a negative id would be learnt as a token of its own
        routing = self.checked_routing(routing, len(token_ids))
        hot = multi_hot(routing, self.num_experts)
        self._frequency += hot.sum(axis=0)
        for token, h in zip(token_ids, hot, strict=True):
            if token is None:
                continue
            t = int(token)
            self._token_sum[t] = self._token_sum.get(t, 0) + h
            self._token_count[t] = self._token_count.get(t, 0) + 1

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tokens = np.asarray(sorted(self._token_sum), dtype=np.int64)
        np.savez_compressed(
            out / "history.npz",
            tokens=tokens,
            sums=np.stack([self._token_sum[int(t)] for t in tokens])
            if len(tokens)
            else np.zeros((0, self.num_layers, self.num_experts), np.float32),
            counts=np.asarray([self._token_count[int(t)] for t in tokens], dtype=np.int64),
            frequency=self._frequency,
        )
        meta = self._meta() | {"weights": list(self.weights)}
        (out / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, path: Path, meta: dict) -> HistoryPredictor:
        w = meta["weights"]
        p = cls(
            meta["num_layers"],
            meta["num_experts"],
            meta["top_k"],
            w_token=w[0],
            w_previous=w[1],
            w_frequency=w[2],
        )
        with np.load(path / "history.npz") as data:
            for t, s, c in zip(data["tokens"], data["sums"], data["counts"], strict=True):
                p._token_sum[int(t)] = s.astype(np.float32)
                p._token_count[int(t)] = int(c)
            p._frequency = data["frequency"].astype(np.float64)
        return p
