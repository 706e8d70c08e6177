"""ExpertCache arguments: integer ids only (a float or bool is not truncated), a short
IndexError beyond int32 instead of pybind11's TypeError, slots capped at one per expert."""

from __future__ import annotations

import pytest
import torch

from expertflow import ExpertCache
from tests.runtime.test_expert_cache import assert_holds, make_experts


@pytest.mark.parametrize("huge", [2**31, 2**63, -(2**31) - 1])
def test_integers_beyond_int32_are_a_short_index_error_naming_the_argument(huge):
    # pybind11 raised a TypeError printing every argument (86,775 characters for the demo).
    cache = ExpertCache(make_experts(), slots=6, top_k=2)
    calls = {
        r"acquire: layer must be in \[0, 3\)": lambda: cache.acquire(huge, [0]),
        r"acquire: expert must be in \[0, 6\)": lambda: cache.acquire(0, [1, huge]),
        r"prefetch: expert must be in \[0, 6\)": lambda: cache.prefetch(0, [huge]),
        r"prefetch: layer must be in \[0, 3\)": lambda: cache.prefetch(huge, [0]),
        r"wait: slot must be in \[0, 6\)": lambda: cache.wait(huge),
        r"views: slot must be in \[0, 6\)": lambda: cache.views(huge, 0),
        r"views: layer must be in \[0, 3\)": lambda: cache.views(0, huge),
        r"release: layer must be in \[0, 3\)": lambda: cache.release(huge),
        r"host_expert: layer must be in \[0, 3\)": lambda: cache.host_expert(huge, 0),
        r"host_expert: expert must be in \[0, 6\)": lambda: cache.host_expert(0, huge),
        r"plan: first_layer must be in \[0, 3\]": lambda: cache.plan(
            torch.zeros(3, 6), per_layer=1, first_layer=huge
        ),
    }
    for message, call in calls.items():
        with pytest.raises(IndexError, match=rf"^ExpertCache.{message}, got {huge}$"):
            call()
    assert cache.stats()["misses"] == 0  # nothing was acquired


@pytest.mark.parametrize("bad", [2.7, True, "1", None])
def test_non_integer_ids_are_refused_not_truncated(bad):
    # int(2.7) == 2 and int(True) == 1 read another expert silently.
    cache = ExpertCache(make_experts(), slots=6, top_k=2)
    with pytest.raises(
        ValueError, match=r"^ExpertCache.acquire: expert must be an int in \[0, 6\)"
    ):
        cache.acquire(0, [0, bad])
    with pytest.raises(ValueError, match=r"^ExpertCache.release: layer must be an int in \[0, 3\)"):
        cache.release(bad)
    with pytest.raises(ValueError, match=r"^ExpertCache: top_k must be an int in \[1, 6\]"):
        ExpertCache(make_experts(), slots=6, top_k=bad)
    with pytest.raises(ValueError, match=r"^ExpertCache: slots must be a positive int, got "):
        ExpertCache(make_experts(), slots=bad, top_k=2)
    slots, _ = cache.acquire(0, [torch.tensor(1), 2])  # integer scalars of any kind are fine
    assert len(slots) == 2


@pytest.mark.parametrize("budget", ["per_layer", "global"])
@pytest.mark.parametrize("slots", [19, 10**6, 2**31, 2**70])
def test_slots_beyond_one_per_expert_are_not_allocated(slots, budget):
    experts = make_experts()  # 3 layers x 6 experts
    cache = ExpertCache(experts, slots=slots, top_k=2, budget=budget)
    assert cache.num_slots == 18
    for layer in range(3):  # everything fits: each expert loads once, whatever the order
        for e in [*range(6), *range(6)]:
            got, _ = cache.acquire(layer, [e])
            assert_holds(cache, got[0], layer, experts[layer][e])
            cache.release(layer)
    assert cache.stats()["misses"] == 18 and cache.stats()["evictions"] == 0
    with pytest.raises(ValueError, match=r"ExpertCache: slots must be a positive int, got -3"):
        ExpertCache(experts, slots=-3, top_k=2, budget=budget)
