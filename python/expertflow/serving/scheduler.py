"""Token scheduler: regroup the requests of two decode batches so each batch needs fewer experts.

When many requests decode together, a batch needs the union of its requests' experts at every
layer. Requests with similar predicted routing paths should share a batch. Given the predicted
paths of the requests of two consecutive batches, :func:`split_two_batches` re-splits them into
two batches of the same sizes with as few distinct (layer, expert) pairs in total as it can
find (native, ``csrc/core/scheduler.h``); :func:`regroup` does it for every pair of several
batches.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["distinct_pairs", "paths_from_scores", "regroup", "split_two_batches"]


def _int(name: str, value, least: int, most: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``[least, most]``: a bool or a float is refused, not truncated
    (``groups=[0.5, ...]`` silently put request 0 in batch 0)."""
    is_int = isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)
    if not is_int or value < least or (most is not None and value > most):
        expected = f">= {least}" if most is None else f"in [{least}, {most}]"
        raise ValueError(f"{name} {what}must be {expected} (an int), got {value!r}")
    return int(value)


def paths_from_scores(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Predicted paths: bool ``[N, L, E]``, each request's ``top_k`` best experts per layer."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [requests, layers, experts], got {scores.shape}")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == np.bool_):
        raise ValueError(f"scores must be numbers, got dtype {scores.dtype}")
    if np.issubdtype(scores.dtype, np.inexact) and np.isnan(scores).any():
        # argsort ranks NaN last: its experts would silently never be predicted.
        where = tuple(int(i) for i in np.argwhere(np.isnan(scores))[0])
        raise ValueError(f"scores must not be NaN, got NaN at [request, layer, expert] {where}")
    top_k = _int("top_k", top_k, 1, scores.shape[2])
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :top_k]
    paths = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(paths, top, True, axis=-1)
    return paths


def distinct_pairs(paths: np.ndarray, batch) -> int:
    """Distinct (layer, expert) pairs the requests ``batch`` need together."""
    return int(np.asarray(paths)[list(batch)].any(axis=0).sum())


def _packed(paths: np.ndarray) -> torch.Tensor:
    """Bool paths ``[N, L, E]`` as int64 bitsets ``[N, words]`` (the native layout)."""
    paths = np.asarray(paths)
    if paths.ndim != 3 or paths.dtype != np.bool_:
        raise ValueError(
            f"paths must be a bool array [requests, layers, experts], got "
            f"{paths.dtype} {list(paths.shape)}"
        )
    flat = paths.reshape(paths.shape[0], paths.shape[1] * paths.shape[2])
    bits = -(-max(flat.shape[1], 1) // 64) * 64
    padded = np.zeros((flat.shape[0], bits), dtype=bool)
    padded[:, : flat.shape[1]] = flat
    words = np.packbits(padded, axis=1, bitorder="little").view("<u8").astype(np.int64, copy=False)
    return torch.from_numpy(np.ascontiguousarray(words))


def split_two_batches(paths: np.ndarray, first_size: int) -> tuple[list[int], list[int]]:
    """Splits requests with bool paths ``[N, L, E]`` into batches of ``first_size`` and
    ``N - first_size`` requests (indices ascending), minimising the distinct pairs of both."""
    from expertflow import _C

    packed = _packed(paths)
    first_size = _int("first_size", first_size, 0, packed.shape[0])
    if packed.shape[0] == 0:
        return [], []
    first, second, _, _ = _C.split_two_batches(packed, int(first_size))
    return list(first), list(second)


def regroup(paths: np.ndarray, groups, num_groups: int, max_passes: int = 4) -> list[int]:
    """Regroups requests with bool paths ``[N, L, E]`` among ``num_groups`` batches of fixed
    sizes (request r is now in batch ``groups[r]``): every pair of batches is re-split where
    that lowers its distinct pairs, pass after pass (at most ``max_passes``). Returns the new
    batch of every request; a batch keeps the label of the old one it shares most with."""
    from expertflow import _C

    packed = _packed(paths)
    num_groups = _int("num_groups", num_groups, 1)
    max_passes = _int("max_passes", max_passes, 0)
    groups = [
        _int(f"groups[{r}]", g, 0, num_groups - 1, what="(a batch) is out of range: it ")
        for r, g in enumerate(groups)
    ]
    if len(groups) != packed.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {packed.shape[0]} requests")
    if packed.shape[0] == 0:
        return []
    # Only the batches holding requests take part: sizes are kept, so an empty batch stays
    # empty, and the native pass over every pair of batches took minutes for
    # num_groups=10**8 with 4 requests. Labels are compacted and mapped back.
    used = sorted(set(groups))
    label = {g: i for i, g in enumerate(used)}
    new, _, _ = _C.regroup_batches(packed, [label[g] for g in groups], len(used), max_passes)
    return [used[g] for g in new]
