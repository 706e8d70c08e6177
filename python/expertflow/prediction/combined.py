"""A weighted mix of predictors, e.g. the path predictor plus the history predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from expertflow.prediction._checks import checked_weights
from expertflow.prediction.base import Predictor
from expertflow.traces.format import Trace

__all__ = ["CombinedPredictor"]


def _mean_or_none(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    present = [a for a in arrays if a is not None]
    return sum(present) / len(present) if present else None


class CombinedPredictor(Predictor):
    """A weighted sum of predictors' scores, e.g. the path predictor (what this token's ids
    say) plus the history predictor (what this sequence did a token ago)."""

    kind = "combined"

    def __init__(self, parts: list[Predictor], weights: list[float]):
        parts = list(parts) if isinstance(parts, list | tuple) else parts
        if not isinstance(parts, list) or not parts:
            raise ValueError(
                f"CombinedPredictor: parts must be a non-empty list, got {parts!r:.80}"
            )
        for i, part in enumerate(parts):
            if not isinstance(part, Predictor):
                raise ValueError(
                    f"CombinedPredictor: parts[{i}] must be a Predictor, got {type(part).__name__}"
                )
        weights = checked_weights(
            "CombinedPredictor", [f"weights[{i}]" for i in range(len(parts))], weights
        )
        first = parts[0]
        super().__init__(first.num_layers, first.num_experts, first.top_k)
        for p in parts[1:]:
            if (p.num_layers, p.num_experts) != (first.num_layers, first.num_experts):
                raise ValueError(
                    f"CombinedPredictor: parts disagree on shape: {first.num_layers}x"
                    f"{first.num_experts} and {p.num_layers}x{p.num_experts}"
                )
        self.parts, self.weights = parts, weights

    @property
    def needs_token_ids(self) -> bool:
        return any(p.needs_token_ids for p in self.parts)

    def without_token_ids(self) -> tuple[Predictor | None, list[str]]:
        """The parts that run without token ids, with their weights (None if no part does);
        the notes name each part left out and what the others lose."""
        kept, weights, notes = [], [], []
        for i, (part, weight) in enumerate(zip(self.parts, self.weights, strict=True)):
            usable, why = part.without_token_ids()
            if usable is None:
                notes += [f"part {i} ({part.kind}) left out: {'; '.join(why)}"]
                continue
            kept.append(usable)
            weights.append(weight)
            notes += why
        if not kept:
            return None, notes
        if len(kept) == len(self.parts) and all(
            k is p for k, p in zip(kept, self.parts, strict=True)
        ):
            return self, notes
        return CombinedPredictor(kept, weights), notes

    def predict_step(self, histories, previous) -> np.ndarray:
        return sum(
            w * p.predict_step(histories, previous)
            for p, w in zip(self.parts, self.weights, strict=True)
        )

    def predict_step_with_reuse(self, histories, previous):
        """The weighted sum of the parts' scores, and the mean reuse scores of the parts that
        have a reuse head (None if none has)."""
        outs = [p.predict_step_with_reuse(histories, previous) for p in self.parts]
        scores = sum(w * s for (s, _), w in zip(outs, self.weights, strict=True))
        return scores, _mean_or_none([r for _, r in outs])

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        return _mean_or_none([p.reuse_trace(trace) for p in self.parts])

    def learn(self, token_ids, routing) -> None:
        for p in self.parts:
            p.learn(token_ids, routing)

    def predict_trace(self, trace: Trace) -> np.ndarray:
        # The parts never see each other's state, so each may use its own (batched) scoring.
        return sum(
            w * p.predict_trace(trace) for p, w in zip(self.parts, self.weights, strict=True)
        )

    def save(self, out: str | Path) -> None:
        out = Path(out)
        for i, p in enumerate(self.parts):
            p.save(out / f"part{i}")
        meta = self._meta() | {"weights": self.weights, "parts": len(self.parts)}
        (out / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, path: Path, meta: dict) -> CombinedPredictor:
        # Imported here: io dispatches on every kind, this one included.
        from expertflow.prediction.io import load_predictor

        parts = [load_predictor(path / f"part{i}") for i in range(meta["parts"])]
        return cls(parts, meta["weights"])
