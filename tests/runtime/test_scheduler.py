"""The token scheduler's Python face: bit packing, sizes, and a split that beats FIFO."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from expertflow.scheduler import distinct_pairs, paths_from_scores, split_two_batches


def clustered_paths(rng, n, layers=6, experts=16, k=2, domains=4):
    scores = rng.random((n, layers, experts))
    domain = rng.integers(0, domains, n)
    for r in range(n):  # each domain prefers its own quarter of the experts
        lo = domain[r] * experts // domains
        scores[r, :, lo : lo + experts // domains] += 1.0
    return paths_from_scores(scores, k), domain


def test_split_recovers_domains_and_beats_fifo():
    rng = np.random.default_rng(0)
    paths, domain = clustered_paths(rng, 32, domains=2)
    first, second = split_two_batches(paths, 16)
    assert sorted(first + second) == list(range(32)) and len(first) == 16
    fifo = distinct_pairs(paths, range(16)) + distinct_pairs(paths, range(16, 32))
    ours = distinct_pairs(paths, first) + distinct_pairs(paths, second)
    assert ours < 0.85 * fifo
    assert len(set(domain[first])) == 1 or len(set(domain[second])) == 1


def test_matches_brute_force_on_a_small_case_with_many_layers():
    # > 64 pairs per path: the bit packing spans several words.
    rng = np.random.default_rng(3)
    paths, _ = clustered_paths(rng, 8, layers=9, experts=16, domains=2)
    first, second = split_two_batches(paths, 4)
    best = min(
        distinct_pairs(paths, a) + distinct_pairs(paths, set(range(8)) - set(a))
        for a in itertools.combinations(range(8), 4)
    )
    assert distinct_pairs(paths, first) + distinct_pairs(paths, second) <= best + 1


def test_bad_input():
    paths = np.zeros((4, 2, 3), dtype=bool)
    with pytest.raises(ValueError, match="first_size must be in"):
        split_two_batches(paths, 5)
    with pytest.raises(ValueError, match="bool array"):
        split_two_batches(paths.astype(np.int8), 2)
    with pytest.raises(ValueError, match="top_k must be in"):
        paths_from_scores(np.zeros((2, 2, 3)), 4)
    assert split_two_batches(np.zeros((0, 2, 3), dtype=bool), 0) == ([], [])
