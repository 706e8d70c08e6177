"""One error policy across the extension: argument errors are ValueError and index errors
IndexError, whichever layer (core, runtime, op) refuses them, each naming the argument."""

from __future__ import annotations

import pytest
import torch

from expertflow import _C


def policy(**kwargs):
    args = {"num_layers": 2, "num_experts": 4, "num_slots": 2, "top_k": 1, "budget": "global"}
    return _C.CachePolicy(**(args | kwargs))


def test_cache_policy_names_and_options_are_value_errors():
    with pytest.raises(ValueError, match="policy must be one of 'lru', .* got 'LRU'"):
        policy(policy="LRU")
    with pytest.raises(ValueError, match="budget must be 'per_layer' or 'global', got 'all'"):
        policy(budget="all")
    with pytest.raises(ValueError, match="CachePolicy: num_slots must be at least 2"):
        policy(num_slots=1, top_k=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_cache_policy_refuses_non_finite_scores(bad):
    cache = policy(policy="expertflow")
    with pytest.raises(ValueError, match="set_scores: scores must be finite, got .* for expert 2"):
        cache.set_scores(0, [0.5, 0.5, bad, 0.5])
    with pytest.raises(ValueError, match="set_scores: reuse must be finite, got .* for expert 0"):
        cache.set_scores(0, [0.5] * 4, [bad, 0.5, 0.5, 0.5])


def test_cache_policy_lengths_are_value_errors_and_indices_index_errors():
    cache = policy()
    with pytest.raises(ValueError, match="scores must have num_experts=4 entries, got 3"):
        cache.set_scores(0, [0.5] * 3)
    with pytest.raises(ValueError, match="reuse must have num_experts=4 entries, got 5"):
        cache.set_scores(0, [0.5] * 4, [0.5] * 5)
    with pytest.raises(IndexError, match=r"set_scores: layer must be in \[0, 2\), got 2"):
        cache.set_scores(2, [0.5] * 4)
    with pytest.raises(IndexError, match=r"acquire: expert must be in \[0, 4\), got 4"):
        cache.acquire(0, [4])
    with pytest.raises(IndexError, match="loaded: slot 7 has no copy in flight"):
        cache.loaded(7)
    with pytest.raises(ValueError, match="needs 3 more slots but only 2"):
        cache.acquire(0, [0, 1, 2])


def test_scheduler_paths_are_value_errors():
    with pytest.raises(ValueError, match="split_two_batches: paths must be a CPU int64 tensor"):
        _C.split_two_batches(torch.zeros(4, 1, dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="regroup_batches: paths must be a CPU int64 tensor"):
        _C.regroup_batches(torch.zeros(4, dtype=torch.int64), [0, 0, 1, 1], 2, 4)
