"""The token scheduler's Python face: bit packing, sizes, and splits that beat FIFO."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from expertflow.serving.scheduler import (
    _packed,
    distinct_pairs,
    paths_from_scores,
    regroup,
    split_two_batches,
)


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


def total_pairs(paths, groups, num_groups):
    groups = np.asarray(groups)
    return sum(distinct_pairs(paths, np.flatnonzero(groups == g)) for g in range(num_groups))


@pytest.mark.parametrize("seed", range(5))
def test_regroup_keeps_sizes_and_beats_fifo_on_fresh_random_paths(seed):
    rng = np.random.default_rng(seed)
    num_groups, batch = 4, 8
    paths, domain = clustered_paths(rng, num_groups * batch, domains=4)
    fifo = [r // batch for r in range(num_groups * batch)]
    groups = regroup(paths, fifo, num_groups)
    assert np.bincount(groups, minlength=num_groups).tolist() == [batch] * num_groups
    assert total_pairs(paths, groups, num_groups) < 0.9 * total_pairs(paths, fifo, num_groups)
    assert regroup(paths, fifo, num_groups) == groups  # deterministic
    # Grouping requests by their (known) domain is what a perfect scheduler would find here.
    by_domain = total_pairs(paths, domain, 4) if np.bincount(domain).tolist() == [8] * 4 else None
    if by_domain is not None:
        assert total_pairs(paths, groups, num_groups) <= by_domain + 4


def test_regroup_bad_input():
    paths = np.zeros((4, 2, 3), dtype=bool)
    with pytest.raises(ValueError, match="groups has 3 entries for 4 requests"):
        regroup(paths, [0, 1, 0], 2)
    with pytest.raises(ValueError, match="out of range"):
        regroup(paths, [0, 1, 2, 0], 2)
    assert regroup(np.zeros((0, 2, 3), dtype=bool), [], 1) == []


def test_scores_and_top_k_are_checked():
    scores = np.zeros((2, 2, 3))
    scores[1, 0, 2] = np.nan  # argsort ranked it last: expert 2 silently never predicted
    with pytest.raises(ValueError, match=r"scores must not be NaN, got NaN at .* \(1, 0, 2\)"):
        paths_from_scores(scores, 1)
    for top_k in (True, 2.0, 0, 4):
        with pytest.raises(ValueError, match=rf"top_k must be in \[1, 3\] \(an int\), got {top_k}"):
            paths_from_scores(np.zeros((2, 2, 3)), top_k)
    with pytest.raises(ValueError, match="scores must be numbers, got dtype <U1"):
        paths_from_scores(np.full((1, 1, 1), "a"), 1)
    assert paths_from_scores(np.ones((1, 2, 3), np.float32), np.int64(3)).all()
    with pytest.raises(ValueError, match=r"first_size must be in \[0, 4\] \(an int\), got 1.5"):
        split_two_batches(np.zeros((4, 2, 3), dtype=bool), 1.5)


def test_regroup_refuses_labels_and_counts_that_are_not_ints():
    paths = np.zeros((4, 2, 3), dtype=bool)
    cases = [
        (([0.5, 1, 0, 1], 2), r"groups\[0\] \(a batch\) is out of range: it must be in \[0, 1\]"),
        (([0, 1, 0, -1], 2), r"groups\[3\] \(a batch\) is out of range.*got -1"),
        (([0, 1, 0, 1], 0), r"num_groups must be >= 1 \(an int\), got 0"),
        (([0, 1, 0, 1], True), r"num_groups must be >= 1 \(an int\), got True"),
        (([0, 1, 0, 1], 2, -1), r"max_passes must be >= 0 \(an int\), got -1"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            regroup(paths, *args)


def test_regroup_leaves_empty_batches_out_and_costs_nothing_for_them():
    from expertflow import _C

    rng = np.random.default_rng(7)
    paths, _ = clustered_paths(rng, 24, domains=4)
    groups = [(r % 4) * 3 for r in range(24)]  # batches 0, 3, 6, 9 of 12: the rest empty
    full, _, _ = _C.regroup_batches(_packed(paths), groups, 12, 4)
    assert regroup(paths, groups, 12) == list(full)  # as the native pass over every batch
    started = time.perf_counter()
    assert regroup(paths[:4], [0, 1, 0, 1], 10**8) == regroup(paths[:4], [0, 1, 0, 1], 2)
    assert time.perf_counter() - started < 5  # was: minutes
