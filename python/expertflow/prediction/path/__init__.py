"""The path predictor: ``net`` (the torch network), ``training`` (its two training loops),
``decoding`` (decode steps on cached keys/values, native or torch) and ``predictor`` (the
:class:`PathPredictor` tying them together, with saving and loading)."""

from expertflow.prediction.path.predictor import PathPredictor

__all__ = ["PathPredictor"]
