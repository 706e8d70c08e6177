"""Reading a saved predictor: a folder with ``predictor.json`` (its ``kind`` and shapes) and the
kind's own files, written by each kind's ``save``."""

from __future__ import annotations

import json
from pathlib import Path

from expertflow.prediction.base import Predictor
from expertflow.prediction.combined import CombinedPredictor
from expertflow.prediction.history import HistoryPredictor
from expertflow.prediction.path import PathPredictor

__all__ = ["load_predictor"]

_KINDS = {"history": HistoryPredictor, "path": PathPredictor, "combined": CombinedPredictor}


def load_predictor(path: str | Path) -> Predictor:
    """The predictor saved in the folder ``path`` (any kind)."""
    path = Path(path)
    meta_file = path / "predictor.json"
    if not meta_file.is_file():
        raise ValueError(f"predictor: {path} has no predictor.json")
    meta = json.loads(meta_file.read_text())
    if meta.get("kind") not in _KINDS:
        raise ValueError(f"predictor: unknown kind {meta.get('kind')!r} in {meta_file}")
    return _KINDS[meta["kind"]]._load(path, meta)
