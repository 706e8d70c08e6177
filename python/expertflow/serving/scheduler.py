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


def paths_from_scores(scores: np.ndarray, top_k: int) -> np.ndarray:
    """Predicted paths: bool ``[N, L, E]``, each request's ``top_k`` best experts per layer."""
    scores = np.asarray(scores)
    if scores.ndim != 3:
        raise ValueError(f"scores must be [requests, layers, experts], got {scores.shape}")
    if not 1 <= top_k <= scores.shape[2]:
        raise ValueError(f"top_k must be in [1, {scores.shape[2]}], got {top_k}")
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
    if not 0 <= first_size <= packed.shape[0]:
        raise ValueError(f"first_size must be in [0, {packed.shape[0]}], got {first_size}")
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
    groups = [int(g) for g in groups]
    if len(groups) != packed.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries for {packed.shape[0]} requests")
    if packed.shape[0] == 0:
        return []
    new, _, _ = _C.regroup_batches(packed, groups, int(num_groups), int(max_passes))
    return list(new)
