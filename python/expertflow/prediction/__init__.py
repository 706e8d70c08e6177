"""Routing prediction: which experts each token will need, before its layers run.

``Predictor`` (the interface: scores per step, online learning, whole-trace scores) and its
kinds: ``HistoryPredictor`` (per-layer transition counts), ``PathPredictor`` (a small causal
transformer over token ids and earlier routing, with a reuse head; ``prediction.path``),
``CombinedPredictor`` (a weighted mix). ``load_predictor`` reads any saved one;
``prediction.evaluation`` measures recall on recorded traces.
"""

from expertflow.prediction.predictor import (
    REUSE_HORIZONS,
    CombinedPredictor,
    HistoryPredictor,
    PathPredictor,
    Predictor,
    load_predictor,
    multi_hot,
    topk_recall_precision,
    uses_within,
)

__all__ = [
    "REUSE_HORIZONS",
    "CombinedPredictor",
    "HistoryPredictor",
    "PathPredictor",
    "Predictor",
    "load_predictor",
    "multi_hot",
    "topk_recall_precision",
    "uses_within",
]
