"""Routing prediction: which experts each token will need, before its layers run.

``Predictor`` (the interface: scores per step, online learning, whole-trace scores;
``prediction.base``) and its kinds: ``HistoryPredictor`` (per-layer transition counts;
``prediction.history``), ``PathPredictor`` (a small causal transformer over token ids and
earlier routing, with a reuse head; ``prediction.path``), ``CombinedPredictor`` (a weighted
mix; ``prediction.combined``). ``load_predictor`` reads any saved one (``prediction.io``);
``prediction.evaluation`` measures recall on recorded traces.
"""

from expertflow.prediction.base import REUSE_HORIZONS, Predictor, multi_hot, uses_within
from expertflow.prediction.combined import CombinedPredictor
from expertflow.prediction.evaluation import topk_recall_precision
from expertflow.prediction.history import HistoryPredictor
from expertflow.prediction.io import load_predictor
from expertflow.prediction.path import PathPredictor

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
