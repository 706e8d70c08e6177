"""Reading a saved predictor: a folder with ``predictor.json`` (its ``kind`` and shapes) and the
kind's own files, written by each kind's ``save``.

A damaged or foreign folder is refused with a ValueError naming the file and what it lacks,
never a KeyError, a zip error or a predictor of absurd size."""

from __future__ import annotations

import json
import pickle
import zipfile
import zlib
from pathlib import Path

from expertflow.prediction.base import Predictor
from expertflow.prediction.combined import CombinedPredictor
from expertflow.prediction.history import HistoryPredictor
from expertflow.prediction.path import PathPredictor
from expertflow.traces.validation import MAX_EXPERTS, MAX_LAYER_EXPERTS

__all__ = ["load_predictor"]

_KINDS = {"history": HistoryPredictor, "path": PathPredictor, "combined": CombinedPredictor}
# Keys each kind's ``_load`` reads from predictor.json besides the shape.
_KIND_KEYS = {"history": ("weights",), "path": ("hparams",), "combined": ("weights", "parts")}
# What reading a damaged weight or table file raises (truncated zip, bad pickle stream, ...).
_UNREADABLE = (OSError, EOFError, zipfile.BadZipFile, zlib.error, pickle.UnpicklingError)


def _check_meta(meta: object, meta_file: Path) -> None:
    if not isinstance(meta, dict):
        raise ValueError(f"predictor: {meta_file} must hold a JSON object")
    if meta.get("kind") not in _KINDS:
        raise ValueError(
            f"predictor: unknown kind {meta.get('kind')!r} in {meta_file} "
            f"(expected one of {sorted(_KINDS)})"
        )
    limits = {"num_layers": None, "num_experts": MAX_EXPERTS, "top_k": None}
    for key, cap in limits.items():
        value = meta.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(
                f"predictor: {meta_file}: {key} must be an integer >= 1, got {value!r}"
            )
        if cap is not None and value > cap:
            raise ValueError(f"predictor: {meta_file}: {key} must be at most {cap}, got {value}")
    if meta["num_layers"] * meta["num_experts"] > MAX_LAYER_EXPERTS:
        raise ValueError(
            f"predictor: {meta_file}: num_layers x num_experts must be at most "
            f"{MAX_LAYER_EXPERTS}, got {meta['num_layers']} x {meta['num_experts']}"
        )
    for key in _KIND_KEYS[meta["kind"]]:
        if key not in meta:
            raise ValueError(f"predictor: {meta_file}: a {meta['kind']} predictor needs {key!r}")


def load_predictor(path: str | Path) -> Predictor:
    """The predictor saved in the folder ``path`` (any kind)."""
    path = Path(path)
    meta_file = path / "predictor.json"
    if not meta_file.is_file():
        raise ValueError(f"predictor: {path} has no predictor.json")
    try:
        meta = json.loads(meta_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"predictor: {meta_file} is not valid JSON ({exc})") from exc
    _check_meta(meta, meta_file)
    try:
        return _KINDS[meta["kind"]]._load(path, meta)
    except (*_UNREADABLE, KeyError) as exc:
        # KeyError: a table file without one of its arrays (the JSON keys are checked above).
        raise ValueError(f"predictor: {path}: a damaged or incomplete file ({exc!r})") from exc
