"""How well a predictor knows the routing: per-layer recall and precision of its top-k (and
top-1.5k, top-2k) for single tokens and for decode batches (the union over the batch)."""

from __future__ import annotations

import math
import time

import numpy as np

from expertflow.prediction import Predictor, topk_recall_precision
from expertflow.traces.format import Trace

__all__ = ["decode_groups", "evaluate_predictor", "evaluate_scores", "format_evaluation"]


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


def evaluate_predictor(
    predictor: Predictor, trace: Trace, batch_sizes=(1, 4, 16), multiples=(1.0, 1.5, 2.0)
) -> dict:
    """Scores ``trace`` with the predictor (each token before its routing is seen) and returns
    recall/precision per layer for every batch size and top-(multiple x k)."""
    started = time.perf_counter()
    scores = predictor.predict_trace(trace)
    seconds = time.perf_counter() - started
    result = evaluate_scores(scores, trace, batch_sizes, multiples)
    result["predict_ms_per_token"] = 1e3 * seconds / max(1, trace.num_tokens)
    return result


def evaluate_scores(
    scores: np.ndarray, trace: Trace, batch_sizes=(1, 4, 16), multiples=(1.0, 1.5, 2.0)
) -> dict:
    """Recall/precision per layer of given ``[T, L, E]`` scores (see evaluate_predictor)."""
    result = {"tokens": trace.num_tokens, "top_k": trace.top_k, "results": []}
    for batch in batch_sizes:
        groups = decode_groups(trace, batch)
        for m in multiples:
            count = max(1, math.ceil(m * trace.top_k))
            recall, precision = topk_recall_precision(scores, trace.expert_ids, groups, count)
            result["results"].append(
                {
                    "batch_size": batch,
                    "multiple": m,
                    "count": count,
                    "recall": recall.tolist(),
                    "precision": precision.tolist(),
                    "mean_recall": float(recall.mean()),
                    "mean_precision": float(precision.mean()),
                }
            )
    result["scores"] = scores
    return result


def format_evaluation(result: dict) -> str:
    lines = [
        f"{result['tokens']} tokens, top-{result['top_k']}; predictor "
        f"{result['predict_ms_per_token']:.3f} ms per token (whole-trace scoring)",
        "",
        "batch  predicted  mean recall  mean precision  recall per layer",
    ]
    for r in result["results"]:
        per_layer = " ".join(f"{v:.2f}" for v in r["recall"])
        lines.append(
            f"{r['batch_size']:5d}  top-{r['count']:<5d}  {r['mean_recall']:11.3f}  "
            f"{r['mean_precision']:14.3f}  {per_layer}"
        )
    return "\n".join(lines)
