"""generate_batch's arguments checked before any work: each refusal is a ValueError naming the
argument, what was expected and what was given. Numpy scalars count as the Python numbers
they hold; a bool is not a number here (``batch_size=True`` is a mistake, not 1)."""

from __future__ import annotations

import math
import numbers
import os

import numpy as np

__all__ = ["SCHEDULES", "_check_counts", "_check_predictor_arg", "_check_schedule", "_int_arg"]

SCHEDULES = ("fifo", "expertflow")


def _int_arg(name: str, value, least: int, most: int | None = None, optional=False) -> int:
    """``value`` as an int in ``[least, most]`` (no upper bound when ``most`` is None);
    ``optional``: the message says None is allowed too (the caller handles it)."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not is_int or value < least or (most is not None and value > most):
        expected = f">= {least}" if most is None else f"in [{least}, {most}]"
        expected = f"None or an int {expected}" if optional else f"an int {expected}"
        raise ValueError(f"generate_batch: {name} must be {expected}, got {value!r}")
    return int(value)


def _real_arg(name: str, value, expected: str, ok) -> float:
    """``value`` as a float, refused unless it is a real number (not a bool) and ``ok(it)``."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)
    if not is_real or not ok(float(value)):
        raise ValueError(f"generate_batch: {name} must be {expected}, got {value!r}")
    return float(value)


def _check_counts(max_new_tokens, batch_size, active_batches, regroup_every, prefill_padding):
    """The counts as ints and ``prefill_padding`` as a float, each refused if out of range."""
    counts = (
        _int_arg("max_new_tokens", max_new_tokens, 1),
        _int_arg("batch_size", batch_size, 1),
        _int_arg("active_batches", active_batches, 1),
        _int_arg("regroup_every", regroup_every, 1),
    )
    padding = _real_arg(
        "prefill_padding", prefill_padding, "a finite number >= 0", lambda p: 0 <= p < math.inf
    )
    return (*counts, padding)


def _check_schedule(schedule, active_batches: int) -> None:
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise ValueError(f"generate_batch: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "expertflow" and active_batches < 2:
        raise ValueError(
            "generate_batch: schedule='expertflow' regroups batches and needs "
            f"active_batches >= 2, got {active_batches}"
        )


def _check_predictor_arg(predictor) -> None:
    """A Predictor, a folder (str or path) holding one, or None; anything else would fail
    deep in loading (``predictor=42``: a TypeError from ``Path``)."""
    from expertflow.prediction import Predictor

    if predictor is None or isinstance(predictor, Predictor | str | os.PathLike):
        return
    raise ValueError(
        "generate_batch: predictor must be a Predictor, a predictor folder (str or path) or "
        f"None, got {type(predictor).__name__} {predictor!r:.80}"
    )
