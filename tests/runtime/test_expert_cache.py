"""The native expert cache end to end with real tensors: bytes, ordering, pinning, threads."""

from __future__ import annotations

import threading

import pytest
import torch

from expertflow import ExpertCache


def make_experts(layers=3, experts=6, gen=None):
    """Two tensors per expert, of two dtypes, layer 1 larger (slots fit the largest)."""
    gen = gen or torch.Generator().manual_seed(0)
    out = []
    for layer in range(layers):
        hidden = 8 if layer != 1 else 24
        out.append(
            [
                [
                    torch.randn(hidden, 4, generator=gen),
                    torch.randn(7, generator=gen).to(torch.bfloat16),
                ]
                for _ in range(experts)
            ]
        )
    return out


def assert_holds(cache, slot, layer, expected):
    cache.wait(slot)
    got = cache.views(slot, layer)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g.cpu().view(torch.uint8), e.view(torch.uint8))  # same bytes


def test_store_layout_and_budget(device):
    experts = make_experts()
    cache = ExpertCache(experts, device=device, slots=6, top_k=2, budget="per_layer")
    assert cache.num_slots == 6
    assert cache.slot_bytes % 256 == 0 and cache.slot_bytes >= 24 * 4 * 4
    assert cache.host_pinned == (device == "cuda")
    for layer in range(3):
        for e in range(6):
            for h, t in zip(cache.host_expert(layer, e), experts[layer][e], strict=True):
                assert torch.equal(h, t)
                assert h.data_ptr() % 256 == 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "lrfu", "expertflow", "belady"])
@pytest.mark.parametrize("budget", ["per_layer", "global"])
def test_random_steps_every_slot_holds_the_requested_bytes(device, policy, budget):
    experts = make_experts()
    host_before = [[[t.clone() for t in e] for e in layer] for layer in experts]
    cache = ExpertCache(experts, device=device, slots=6, top_k=2, budget=budget, policy=policy)
    gen = torch.Generator().manual_seed(1)
    for step in range(40):
        if policy == "expertflow" and step % 3 == 0:
            cache.plan(torch.rand(3, 6, generator=gen), per_layer=2)
        for layer in range(3):
            wanted = torch.randperm(6, generator=gen)[:2].tolist()
            slots, order = cache.acquire(layer, wanted)
            assert sorted(order) == [0, 1] and len(set(slots)) == 2
            for i in order:
                assert_holds(cache, slots[i], layer, experts[layer][wanted[i]])
            cache.release(layer)
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 40 * 3 * 2
    assert stats["bytes_copied"] > 0
    # Eviction never copies back: the host store is unchanged.
    for layer in range(3):
        for e in range(6):
            for h, before in zip(cache.host_expert(layer, e), host_before[layer][e], strict=True):
                assert torch.equal(h, before)


def test_hits_come_first_in_ready_order(device):
    cache = ExpertCache(
        make_experts(), device=device, slots=3, top_k=2, budget="global", policy="lru"
    )
    slots, _ = cache.acquire(0, [4])
    cache.wait(slots[0])
    cache.release(0)
    cache.synchronize()
    slots, order = cache.acquire(0, [1, 4])  # 1 misses, 4 is resident
    assert order == [1, 0]
    cache.release(0)


def test_cached_says_what_is_held_and_pins_and_copies_nothing(device):
    cache = ExpertCache(make_experts(), device=device, slots=6, top_k=2, policy="expertflow")
    assert cache.cached(1, [0, 3]) == [False, False]
    slots, _ = cache.acquire(1, [3])
    assert cache.cached(1, [0, 3]) == [False, True]  # loading or resident: held
    cache.release(1)
    scores = torch.zeros(3, 6)
    scores[2, 5] = 1.0
    cache.plan(scores, per_layer=1)  # a prefetch in flight counts as held
    assert cache.cached(2, [5, 4]) == [True, False]
    before = cache.stats()
    assert cache.cached(0, [1, 2]) == [False, False]
    assert cache.stats() == before  # no request counted, no copy issued
    with pytest.raises(ValueError, match="cached: experts must be distinct"):
        cache.cached(0, [1, 1])
    with pytest.raises(IndexError):
        cache.cached(7, [1])
    cache.synchronize()


def test_prefetched_experts_are_hits(device):
    experts = make_experts()
    cache = ExpertCache(experts, device=device, slots=6, top_k=2, policy="expertflow")
    scores = torch.zeros(3, 6)
    scores[2, 3] = scores[2, 5] = 1.0
    cache.plan(scores, per_layer=2)
    slots, order = cache.acquire(2, [5, 3])
    for i in order:
        assert_holds(cache, slots[i], 2, experts[2][[5, 3][i]])
    cache.release(2)
    stats = cache.stats()
    assert stats["misses"] == 0 and stats["prefetch_hits"] == 2 and stats["prefetches"] == 2


def test_a_late_plan_skips_the_layers_it_is_too_late_for(device):
    cache = ExpertCache(make_experts(), device=device, slots=6, top_k=2, policy="expertflow")
    cache.plan(torch.ones(3, 6), per_layer=2, first_layer=1)
    cache.synchronize()
    assert cache.stats()["prefetches"] == 4  # layers 1 and 2 only
    cache.acquire(0, [0])
    cache.release(0)
    assert cache.stats()["misses"] == 1
    cache.plan(torch.ones(3, 6), per_layer=2, first_layer=3)  # past the last layer: nothing
    assert cache.stats()["prefetches"] == 4
    with pytest.raises(ValueError, match=r"first_layer must be in \[0, 3\], got 4"):
        cache.plan(torch.ones(3, 6), per_layer=2, first_layer=4)


def test_min_score_prefetches_only_confident_experts_and_the_rest_still_rank_evictions(device):
    cache = ExpertCache(make_experts(), device=device, slots=9, top_k=2, policy="expertflow")
    scores = torch.zeros(3, 6)
    scores[0, :3] = torch.tensor([0.9, 0.2, 0.4])
    cache.plan(scores, per_layer=3, min_score=0.5)
    cache.synchronize()
    assert cache.stats()["prefetches"] == 1  # expert 0 only
    for experts in ([0, 2], [0, 1]):  # expert 2 is now the least recently used
        cache.acquire(0, experts)
        cache.release(0)
        cache.synchronize()  # a copy still in flight could not be evicted
    assert cache.stats()["prefetch_hits"] == 1 and cache.stats()["misses"] == 2
    cache.acquire(0, [3])  # full layer: evicts the lowest score (1), not the LRU (2)
    cache.release(0)
    misses = cache.stats()["misses"]
    cache.acquire(0, [2])
    cache.release(0)
    assert cache.stats()["misses"] == misses
    cache.acquire(0, [1])
    cache.release(0)
    assert cache.stats()["misses"] == misses + 1
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="min_score must be a finite number >= 0"):
            cache.plan(scores, per_layer=1, min_score=bad)


@pytest.mark.parametrize("with_reuse", [True, False])
def test_reuse_scores_take_over_when_a_layer_is_released(device, with_reuse):
    # Layer 0's pool holds 3. Experts 0, 1, 2 are scored 0.9, 0.8, 0.7 for this step; by the
    # reuse head, 0 is not needed after it (0.0). Once layer 0 has run, expert 3 evicts 0 with
    # reuse scores, and the lowest step score (2) without.
    cache = ExpertCache(make_experts(), device=device, slots=9, top_k=2, policy="expertflow")
    scores, reuse = torch.zeros(3, 6), torch.full((3, 6), 0.5)
    scores[0, :3] = torch.tensor([0.9, 0.8, 0.7])
    reuse[0, 0] = 0.0
    cache.plan(scores, per_layer=0, reuse_scores=reuse if with_reuse else None)
    for experts in ([0, 1], [2], [3]):
        cache.acquire(0, experts)
        cache.release(0)
        cache.synchronize()
    misses = cache.stats()["misses"]
    cache.acquire(0, [1])
    cache.release(0)
    cache.acquire(0, [0 if with_reuse else 2])  # the one evicted
    cache.release(0)
    assert cache.stats()["misses"] == misses + 1
    with pytest.raises(ValueError, match=r"reuse_scores must be \[num_layers=3, num_experts=6\]"):
        cache.plan(scores, per_layer=0, reuse_scores=torch.zeros(3, 5))


def test_a_pool_full_of_copies_in_flight_waits_for_one_not_for_all(device):
    # Experts large enough (32 MiB) that two queued prefetches are still copying when the
    # acquire comes: it must wait for the oldest copy only, then evict it.
    gen = torch.Generator().manual_seed(1)
    experts = [[[torch.randint(0, 255, (32 << 20,), dtype=torch.uint8, generator=gen)]
                for _ in range(3)] for _ in range(2)]  # fmt: skip
    cache = ExpertCache(experts, device=device, slots=2, top_k=1, budget="global")
    scores = torch.zeros(2, 3)
    scores[0, :2] = 1.0
    cache.plan(scores, per_layer=2)
    slots, _ = cache.acquire(1, [2])
    assert_holds(cache, slots[0], 1, experts[1][2])
    cache.release(1)
    stats = cache.stats()
    assert stats["full_pool_waits"] == 1  # one copy landed, not every copy in flight
    # The 32 MiB urgent copy was still running when compute asked for it.
    assert stats["late_waits"] == 1
    if torch.device(device).type == "cpu":  # the host blocked (CUDA: the stream waits)
        assert stats["wait_seconds"] > 0


def test_pinned_experts_survive_other_layers(device):
    experts = make_experts()
    cache = ExpertCache(experts, device=device, slots=2, top_k=2, budget="global")
    slots, _ = cache.acquire(0, [0, 1])  # fills the pool, pinned
    with pytest.raises(ValueError, match="can be freed"):
        cache.acquire(1, [2])
    for s, e in zip(slots, [0, 1], strict=True):
        assert_holds(cache, s, 0, experts[0][e])
    cache.release(0)
    cache.acquire(1, [2])
    cache.release(1)


def test_threads_share_one_cache(device):
    experts = make_experts(layers=4)
    cache = ExpertCache(experts, device=device, slots=8, top_k=2, budget="per_layer")
    errors = []

    def worker(layer):
        gen = torch.Generator().manual_seed(layer)
        try:
            for _ in range(50):
                wanted = torch.randperm(6, generator=gen)[:2].tolist()
                slots, order = cache.acquire(layer, wanted)
                for i in order:
                    assert_holds(cache, slots[i], layer, experts[layer][wanted[i]])
                cache.release(layer)
        except Exception as exc:  # reported below, with the thread's layer
            errors.append((layer, exc))

    threads = [threading.Thread(target=worker, args=(layer,)) for layer in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_bad_input():
    experts = make_experts()
    with pytest.raises(ValueError, match="num_slots must be at least 6"):
        ExpertCache(experts, slots=5, top_k=2)
    with pytest.raises(ValueError, match="budget must be one of"):
        ExpertCache(experts, slots=6, top_k=2, budget="some")
    with pytest.raises(TypeError, match=r"experts\[0\]\[1\]\[0\] must be a torch.Tensor"):
        ExpertCache([[[torch.zeros(2)], ["x"]]], slots=1, top_k=1)
    ragged = make_experts()
    ragged[2][4][0] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="layer 2 expert 4 tensor 0"):
        ExpertCache(ragged, slots=6, top_k=2)
    cache = ExpertCache(experts, slots=6, top_k=2)
    with pytest.raises(IndexError, match=r"expert must be in \[0, 6\), got 6"):
        cache.acquire(0, [6])
    with pytest.raises(IndexError, match=r"layer must be in \[0, 3\), got 3"):
        cache.acquire(3, [0])
    with pytest.raises(IndexError, match="slot must be in"):
        cache.wait(99)
    with pytest.raises(ValueError, match=r"layer_scores must be \[num_layers=3, num_experts=6\]"):
        cache.plan(torch.zeros(3, 5), per_layer=1)
    with pytest.raises(IndexError, match=r"ExpertCache.views: layer must be in \[0, 3\), got 3"):
        cache.views(0, 3)
    with pytest.raises(IndexError, match=r"ExpertCache.release: layer must be in \[0, 3\), got -1"):
        cache.release(-1)
    with pytest.raises(IndexError, match=r"HostExpertStore: expert must be in \[0, 6\), got 6"):
        cache.host_expert(0, 6)
    with pytest.raises(ValueError, match=r"ExpertCache.prefetch: scores must be \[num_experts=6\]"):
        cache.prefetch(0, [1], torch.zeros(5))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_are_refused_naming_the_argument(bad):
    cache = ExpertCache(make_experts(), slots=6, top_k=2, policy="expertflow")
    scores = torch.full((3, 6), 0.5)
    scores[2, 1] = bad
    given = "nan" if bad != bad else ("inf" if bad > 0 else "-inf")
    with pytest.raises(
        ValueError, match=rf"plan: layer_scores must be finite, got {given} at \[2, 1\]"
    ):
        cache.plan(scores, per_layer=2)
    with pytest.raises(
        ValueError, match=rf"plan: reuse_scores must be finite, got {given} at \[2, 1\]"
    ):
        cache.plan(torch.full((3, 6), 0.5), per_layer=2, reuse_scores=scores)
    with pytest.raises(ValueError, match=rf"prefetch: scores must be finite, got {given} at \[1\]"):
        cache.prefetch(2, [0], scores[2])
    stats = cache.stats()
    assert stats["prefetches"] == 0 and stats["bytes_copied"] == 0  # refused before any change


def test_stats_are_one_consistent_snapshot_while_another_thread_plans():
    # Every prefetch copies one expert (all of a layer the same size): bytes_copied and the
    # policy's loads, read together, always agree, whatever the planning thread is doing.
    experts = [[[torch.randn(64)] for _ in range(6)] for _ in range(3)]
    cache = ExpertCache(experts, slots=6, top_k=2, budget="global", policy="lru")
    stop = threading.Event()

    def plan():
        gen = torch.Generator().manual_seed(3)
        while not stop.is_set():
            cache.plan(torch.rand(3, 6, generator=gen), per_layer=2)
            for layer in range(3):
                cache.acquire(layer, torch.randperm(6, generator=gen)[:2].tolist())
                cache.release(layer)

    planner = threading.Thread(target=plan)
    planner.start()
    try:
        for _ in range(300):
            s = cache.stats()
            assert s["bytes_copied"] == (s["misses"] + s["prefetches"]) * 256, s
    finally:
        stop.set()
        planner.join()


def test_duplicate_experts_are_refused_naming_them(device):
    # The policy gives duplicates one slot and counts one request: a caller passing the top-k
    # ids of several tokens unmerged would run an expert twice and misread its hit ratio.
    cache = ExpertCache(make_experts(), device=device, slots=6, top_k=2, policy="expertflow")
    with pytest.raises(
        ValueError,
        match=r"ExpertCache.acquire: experts must be distinct, got expert 3 at positions 0 and 2",
    ):
        cache.acquire(1, [3, 0, 3])
    with pytest.raises(
        ValueError,
        match=r"ExpertCache.prefetch: experts must be distinct, got expert 4 at positions 1 and 2",
    ):
        cache.prefetch(0, [1, 4, 4])
    with pytest.raises(
        IndexError, match=r"ExpertCache.prefetch: expert must be in \[0, 6\), got 6"
    ):
        cache.prefetch(0, [1, 6])
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] + stats["prefetches"] == 0  # refused before any change
    assert cache.prefetch(0, [1, 4]) == 2


def test_views_and_wait_refuse_slots_the_layer_does_not_hold(device):
    experts = make_experts()
    cache = ExpertCache(experts, device=device, slots=6, top_k=2, budget="global", policy="lru")
    with pytest.raises(IndexError, match="ExpertCache.wait: slot 0 is not held by any acquire"):
        cache.wait(0)  # never acquired
    slots, _ = cache.acquire(0, [2, 5])
    assert_holds(cache, slots[1], 0, experts[0][5])
    # Layer 1's tensors are larger: viewing layer 0's slot with its layout reads other bytes.
    with pytest.raises(
        IndexError, match=rf"ExpertCache.views: slot {slots[1]} is not held by layer 1"
    ):
        cache.views(slots[1], 1)
    free = next(s for s in range(6) if s not in slots)
    with pytest.raises(IndexError, match=rf"views: slot {free} is not held by layer 0"):
        cache.views(free, 0)
    cache.release(0)
    # Released: the slot may be refilled by another expert at any time.
    with pytest.raises(IndexError, match=rf"views: slot {slots[0]} is not held by layer 0"):
        cache.views(slots[0], 0)
    with pytest.raises(IndexError, match=rf"wait: slot {slots[0]} is not held by any acquire"):
        cache.wait(slots[0])
