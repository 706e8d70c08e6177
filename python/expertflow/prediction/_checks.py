"""Argument checks the predictors share: each refusal is a ValueError naming the argument, what
was expected and what was given (numpy scalars count as the numbers they hold; a bool is not
a number here)."""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["check_token_ids", "checked_int", "checked_rate", "checked_weights"]


def checked_int(name: str, value, least: int) -> int:
    """``value`` as an int >= ``least``."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not is_int or value < least:
        raise ValueError(f"{name} must be >= {least} (an int), got {value!r}")
    return int(value)


def checked_rate(name: str, value) -> float:
    """``value`` as a finite float > 0 (a learning rate)."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if not is_real or not 0 < float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def checked_weights(owner: str, names: list[str], weights) -> list[float]:
    """Mixing weights as floats, each finite and >= 0 (a negative weight would rank the
    experts a part predicts last, NaN would make every score NaN)."""
    if not isinstance(weights, list | tuple | np.ndarray):
        raise ValueError(f"{owner}: weights must be a list of numbers, got {weights!r:.80}")
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(
            f"{owner}: expected {len(names)} weights ({', '.join(names)}), got {len(weights)}"
        )
    for name, w in zip(names, weights, strict=True):
        real = isinstance(w, numbers.Real) and not isinstance(w, bool | np.bool_)
        if not real or not 0 <= float(w) < math.inf:
            raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {w!r}")
    return [float(w) for w in weights]


def check_token_ids(ids, vocab: int | None = None, where: str = "token_ids") -> None:
    """Refuses token ids below 0 (and, with ``vocab``, at or above it), naming the first one
    out of range. ``ids``: an int array, or a sequence of ints (None entries are skipped:
    unknown ids)."""
    array = np.asarray(ids if isinstance(ids, np.ndarray) else [t for t in ids if t is not None])
    if array.size == 0:
        return
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{where} must be int token ids, got {array.dtype} values")
    bad = (array < 0) if vocab is None else (array < 0) | (array >= vocab)
    if bad.any():
        first = int(array.reshape(-1)[np.flatnonzero(bad.reshape(-1))[0]])
        expected = ">= 0" if vocab is None else f"in the predictor's vocabulary [0, {vocab})"
        raise ValueError(f"{where} must be token ids {expected}, got {first}")
