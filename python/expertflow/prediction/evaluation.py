"""How well a predictor knows the routing: per-layer recall and precision of its top-k (and
top-1.5k, top-2k) for single tokens and for decode batches (the union over the batch).

A trace without token ids is scored by what of the predictor needs none (the history
predictor's routing terms; a combined predictor's parts that read no ids), and the result's
``notes`` say what was left out. Batch sizes above the trace's number of sequences have no
figures (``None``): such a batch would hold every sequence, the figures of a smaller batch.
"""

from __future__ import annotations

import math
import time

import numpy as np

from expertflow.prediction._checks import checked_int, checked_rate
from expertflow.prediction.base import Predictor, multi_hot
from expertflow.traces.format import Trace

__all__ = [
    "decode_groups",
    "evaluate_predictor",
    "evaluate_scores",
    "format_evaluation",
    "predictor_for_trace",
    "topk_recall_precision",
]


def topk_recall_precision(
    scores: np.ndarray, expert_ids: np.ndarray, groups: list[np.ndarray], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: recall and precision of the predicted set against the needed set, where for
    every group of token rows (one token, or the tokens of a batch step) the needed set is the
    union of their routed experts and the predicted set the union of each token's ``count``
    best-scored experts. Returns two ``[L]`` arrays."""
    layers, experts = scores.shape[1], scores.shape[2]
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :count]
    predicted = multi_hot(top, experts).astype(bool)  # [T, L, E]
    needed = multi_hot(expert_ids, experts).astype(bool)
    hit = np.zeros(layers)
    need = np.zeros(layers)
    pred = np.zeros(layers)
    for rows in groups:
        p = predicted[rows].any(axis=0)
        n = needed[rows].any(axis=0)
        hit += (p & n).sum(axis=-1)
        need += n.sum(axis=-1)
        pred += p.sum(axis=-1)
    return hit / np.maximum(need, 1), hit / np.maximum(pred, 1)


def decode_groups(trace: Trace, batch_size: int) -> list[np.ndarray]:
    """Token rows that need experts together when ``batch_size`` sequences decode side by side,
    one token each per step: sequences are batched in order, step j takes their j-th tokens."""
    sequences = trace.sequence_rows()
    groups = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        for j in range(max(len(s) for s in batch)):
            groups.append(np.asarray([s[j] for s in batch if j < len(s)]))
    return groups


def predictor_for_trace(predictor: Predictor, trace: Trace) -> tuple[Predictor, list[str]]:
    """The predictor to score ``trace`` with and notes on what it lacks: ``predictor`` itself
    and no notes on a trace with token ids; on one without, what of it runs from routing
    alone (:meth:`Predictor.without_token_ids`) and one note saying what is left out. Raises
    ValueError when nothing of it runs without token ids, or for a trace of another model."""
    predictor.check_shape(trace)  # the more basic mismatch first
    if trace.token_ids is None:
        usable, lost = predictor.without_token_ids()
        if usable is None:
            raise ValueError(
                f"the trace has no token_ids and {'; '.join(lost)}: nothing of "
                f"{predictor.label} scores from routing alone (the history predictor does; "
                "or record the trace with token ids)"
            )
        return usable, [f"the trace has no token_ids: {'; '.join(lost)}"]
    return predictor, []


def evaluate_predictor(
    predictor: Predictor, trace: Trace, batch_sizes=(1, 4, 16), multiples=(1.0, 1.5, 2.0)
) -> dict:
    """Scores ``trace`` with the predictor (each token before its routing is seen; see
    :func:`predictor_for_trace` for a trace without token ids) and returns recall/precision
    per layer for every batch size and top-(multiple x k)."""
    predictor, notes = predictor_for_trace(predictor, trace)
    started = time.perf_counter()
    scores = predictor.predict_trace(trace)
    seconds = time.perf_counter() - started
    result = evaluate_scores(scores, trace, batch_sizes, multiples)
    result["predict_ms_per_token"] = 1e3 * seconds / max(1, trace.num_tokens)
    result["notes"] = notes + result["notes"]
    return result


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def evaluate_scores(
    scores: np.ndarray, trace: Trace, batch_sizes=(1, 4, 16), multiples=(1.0, 1.5, 2.0)
) -> dict:
    """Recall/precision per layer of given ``[T, L, E]`` scores (see evaluate_predictor).
    A batch size above the number of sequences gets rows whose figures are None and whose
    ``not_applicable`` says why."""
    _check_evaluation(scores, trace, batch_sizes, multiples)
    sequences = len(trace.sequence_rows())
    result = {
        "tokens": trace.num_tokens,
        "sequences": sequences,
        "top_k": trace.top_k,
        "notes": [],
        "results": [],
    }
    for batch in batch_sizes:
        groups = decode_groups(trace, batch) if batch <= sequences else None
        for m in multiples:
            count = max(1, math.ceil(m * trace.top_k))
            row = {"batch_size": batch, "multiple": m, "count": count}
            if groups is None:
                row |= dict.fromkeys(("recall", "precision", "mean_recall", "mean_precision"))
                row["not_applicable"] = f"the trace has {_plural(sequences, 'sequence')}"
            else:
                recall, precision = topk_recall_precision(scores, trace.expert_ids, groups, count)
                row |= {
                    "recall": recall.tolist(),
                    "precision": precision.tolist(),
                    "mean_recall": float(recall.mean()),
                    "mean_precision": float(precision.mean()),
                }
            result["results"].append(row)
    result["scores"] = scores
    return result


def _check_evaluation(scores, trace: Trace, batch_sizes, multiples) -> None:
    """Refuses scores of another shape than the trace's ``[T, L, E]`` or with NaN (ranked
    last: silently never predicted), batch sizes that are not ints >= 1 and multiples that
    are not finite numbers > 0."""
    expected = (trace.num_tokens, trace.num_layers, trace.num_experts)
    shape = getattr(scores, "shape", None)
    if not isinstance(scores, np.ndarray) or shape != expected:
        raise ValueError(f"scores must be an array of shape {list(expected)}, got {shape}")
    if np.issubdtype(scores.dtype, np.inexact) and np.isnan(scores).any():
        raise ValueError("scores must not hold NaN (a NaN score ranks last)")
    for batch in batch_sizes:
        checked_int("batch_sizes", batch, 1)
    for m in multiples:
        checked_rate("multiples", m)


def format_evaluation(result: dict) -> str:
    """The text table of :func:`evaluate_predictor`'s result: one line per batch size and
    multiple (one per batch size where it does not apply), after any notes."""
    sequences = result.get("sequences")
    where = "" if sequences is None else f" in {_plural(sequences, 'sequence')}"
    lines = [
        f"{result['tokens']} tokens{where}, top-{result['top_k']}; predictor "
        f"{result['predict_ms_per_token']:.3f} ms per token (whole-trace scoring)",
        *(f"note: {note}" for note in result.get("notes", [])),
        "",
        "batch  predicted  mean recall  mean precision  recall per layer",
    ]
    shown_not_applicable = set()
    for r in result["results"]:
        if r.get("not_applicable"):
            if r["batch_size"] not in shown_not_applicable:
                shown_not_applicable.add(r["batch_size"])
                lines.append(f"{r['batch_size']:5d}  not applicable ({r['not_applicable']})")
            continue
        per_layer = " ".join(f"{v:.2f}" for v in r["recall"])
        lines.append(
            f"{r['batch_size']:5d}  top-{r['count']:<5d}  {r['mean_recall']:11.3f}  "
            f"{r['mean_precision']:14.3f}  {per_layer}"
        )
    return "\n".join(lines)
