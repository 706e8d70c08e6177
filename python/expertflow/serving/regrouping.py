"""The token scheduler's side of batched generation: the requests' predicted paths, and the
order in which the regrouped batches take their turns."""

from __future__ import annotations

from contextlib import AbstractContextManager

import numpy as np

from expertflow.prediction import Predictor, multi_hot
from expertflow.serving.requests import _Request
from expertflow.serving.scheduler import paths_from_scores


def _predicted_paths(
    requests: list[_Request],
    predictor: Predictor | None,
    num_experts: int,
    lock: AbstractContextManager,
) -> np.ndarray:
    """Predicted paths ``[N, L, E]`` (bool) of each request's next step: the predictor's top-k,
    or without one the experts the request's previous token chose (routing repeats often).

    The predictor's scores (and reuse scores) are kept on the requests: the prefetcher plans
    the request's step with them. ``lock`` is held around the prediction: an offloaded model's
    predictor is shared with its prefetcher, which other threads' forward calls drive."""
    previous = np.stack([r.previous for r in requests])
    if predictor is None:
        return multi_hot(previous, num_experts).astype(bool)
    with lock:
        scores, reuse = predictor.predict_step_with_reuse([r.ids for r in requests], previous)
    for i, request in enumerate(requests):
        request.scores, request.reuse = scores[i], None if reuse is None else reuse[i]
    return paths_from_scores(scores, previous.shape[-1])


def _turn_order(
    paths: np.ndarray, groups: list[int], batches: list[int], last: np.ndarray | None
) -> list[int]:
    """The batches' turns in a round: each batch after the one whose predicted experts it
    shares most with, starting from the batch that ran last (experts ``last`` ``[L, E]``), so
    that the slots one batch filled serve the next.

    Args:
        paths: bool ``[N, L, E]``, each request's predicted path.
        groups: ``[N]``, each request's group, an index into ``batches``.
        batches: the batch index of each group.
        last: the experts the last decode step ran, or None before any.
    """
    unions = {batches[k]: paths[np.asarray(groups) == k].any(axis=0) for k in range(len(batches))}
    previous, order = last, []
    while unions:
        best = max(
            unions, key=lambda b: -1 if previous is None else int((unions[b] & previous).sum())
        )
        order.append(best)
        previous = unions.pop(best)
    return order
