"""routing_stats on traces whose answers are known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expertflow.cli import main
from expertflow.traces.format import Trace, save_trace
from expertflow.traces.stats import format_routing_stats, routing_stats


def make_trace(ids, seqs, sources=None, experts=8):
    meta = {"model": "t", "num_experts": experts, "top_k": ids.shape[2], "expert_bytes": 1}
    if sources is not None:
        meta["sequence_sources"] = sources
    return Trace(expert_ids=np.asarray(ids), sequence_ids=np.asarray(seqs), meta=meta)


def test_sticky_routing_reuses_everything_and_random_routing_does_not():
    rng = np.random.default_rng(0)
    seqs = np.repeat(np.arange(40), 50)
    # Each sequence keeps one pair of experts at every layer for all its tokens.
    pairs = np.stack([rng.choice(8, 2, replace=False) for _ in range(40)])
    sticky = np.repeat(pairs[:, None, None, :], 50, axis=1).reshape(-1, 1, 2).repeat(3, axis=1)
    stats = routing_stats(make_trace(sticky, seqs))
    assert stats["reuse"] == pytest.approx([1.0] * 3)
    assert all(b < 0.6 for b in stats["reuse_random_baseline"])

    noisy = np.stack([rng.choice(8, 2, replace=False) for _ in range(2000 * 3)]).reshape(2000, 3, 2)
    stats = routing_stats(make_trace(noisy, seqs))
    for reuse, base in zip(stats["reuse"], stats["reuse_random_baseline"], strict=True):
        assert reuse == pytest.approx(base, abs=0.05) and reuse == pytest.approx(0.25, abs=0.05)


def test_deterministic_layer_chain_is_predicted_exactly():
    rng = np.random.default_rng(1)
    first = rng.integers(0, 8, size=(1000, 1))
    ids = np.concatenate([first, (first + 3) % 8, (first * 5 + 1) % 8], axis=1)[:, :, None]
    stats = routing_stats(make_trace(ids, np.arange(1000) // 10))
    assert stats["cross_layer_recall"] == pytest.approx([1.0, 1.0])
    assert all(b < 0.3 for b in stats["cross_layer_popularity_baseline"])


def test_domains_with_disjoint_experts_diverge_fully_and_dead_experts_are_found():
    seqs = np.repeat(np.arange(20), 10)
    sources = ["a" if s % 2 else "b" for s in range(20)]
    ids = np.where(np.asarray(sources)[seqs] == "a", 0, 1)[:, None, None].repeat(2, axis=1)
    ids = np.concatenate([ids, ids + 2], axis=2)  # top-2: {0, 2} for a, {1, 3} for b
    stats = routing_stats(make_trace(ids, seqs, sources))
    assert stats["domains"] == ["a", "b"]
    assert stats["domain_divergence_bits"]["a|b"] == pytest.approx(1.0)
    assert stats["same_domain_divergence_mean"] == pytest.approx(0.0)
    assert stats["dead_experts"] == [[4, 5, 6, 7]] * 2
    assert stats["max_share"] == pytest.approx([0.25, 0.25])
    text = format_routing_stats(stats)
    assert "a|b" in text and "1.000" in text


def test_unrecorded_entries_are_ignored():
    ids = np.full((6, 2, 2), -1)
    ids[:, 0] = [[0, 1]] * 6
    stats = routing_stats(make_trace(ids, np.zeros(6, dtype=int)))
    assert stats["usage"][1] == [0.0] * 8
    assert stats["reuse"][0] == pytest.approx(1.0)


def test_a_single_sequence_has_no_cross_layer_figure_and_says_why(tmp_path, capsys):
    """Cross-layer affinity is fitted on half the sequences and scored on the other: with one
    sequence there is nothing to score. It is None (JSON null), printed as not applicable."""
    rng = np.random.default_rng(2)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(30 * 3)]).reshape(30, 3, 2)
    trace = make_trace(ids, np.zeros(30, dtype=int))
    stats = routing_stats(trace)
    assert stats["sequences"] == 1
    assert stats["cross_layer_recall"] == [None, None]
    assert stats["cross_layer_popularity_baseline"] == [None, None]
    assert all(r is not None for r in stats["reuse"])  # one sequence still has reuse
    json.dumps(stats, allow_nan=False)  # valid JSON: no NaN anywhere
    text = format_routing_stats(stats)
    assert "nan" not in text and text.count("not applicable (1 sequence)") == 2
    save_trace(trace, tmp_path / "one.npz")
    assert main(["routing-stats", "--trace", str(tmp_path / "one.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cross_layer_recall"] == [None, None]


def test_cross_layer_figures_need_two_sequences_not_an_odd_id():
    """Sequences split by the rank of their ids: ids 0 and 2 are two sequences, not one."""
    rng = np.random.default_rng(3)
    first = rng.integers(0, 8, size=(200, 1))
    ids = np.concatenate([first, (first + 3) % 8], axis=1)[:, :, None]
    stats = routing_stats(make_trace(ids, np.repeat([0, 2], 100)))
    assert stats["cross_layer_recall"] == pytest.approx([1.0])


def test_one_sequence_per_domain_prints_without_a_baseline():
    """Two domains of one sequence each: a divergence between them but no same-domain
    baseline (no halves); the text report crashed formatting None (found by issue 21's fuzz)."""
    ids = np.random.default_rng(0).integers(0, 8, (10, 2, 1))
    stats = routing_stats(make_trace(ids, np.repeat([0, 1], 5), sources=["a", "b"]))
    assert stats["domain_divergence_mean"] is not None
    assert stats["same_domain_divergence_mean"] is None
    assert "between halves of one domain: not applicable" in format_routing_stats(stats)


@pytest.mark.parametrize("seed", range(20))
def test_affinity_on_used_experts_equals_the_full_table(seed):
    """The cross-layer figures are computed on the experts a trace uses (plus top_k unused
    ones for ties) instead of an [E, E] table: the same numbers as the full table, on traces
    that leave most experts unused."""
    from expertflow.traces.stats import _affinity, _compact

    rng = np.random.default_rng(seed)
    experts, k = int(rng.integers(4, 300)), int(rng.integers(1, 4))
    pool = rng.choice(experts, size=min(experts, int(rng.integers(k, 12))), replace=False)
    ids = np.stack([rng.choice(pool, k, replace=False) for _ in range(60 * 3)]).reshape(60, 3, k)
    ids[rng.random(ids.shape) < 0.05] = -1
    seqs = rng.integers(0, 6, 60)
    full = _affinity(ids, experts, seqs)
    small = _affinity(*_compact(ids, experts, k), seqs)
    np.testing.assert_array_equal(np.asarray(small), np.asarray(full))


def test_huge_expert_count_is_computed_on_the_used_ones():
    """num_experts 65,536 on a small trace: the [E, E] affinity table alone was 32 GiB."""
    ids = np.random.default_rng(0).integers(0, 16, (50, 2, 2)) * 4000
    stats = routing_stats(make_trace(ids, np.repeat(np.arange(5), 10), experts=2**16))
    assert stats["experts"] == 2**16 and stats["cross_layer_recall"][0] is not None


def test_report_too_large_is_refused_before_building_it():
    """80 labels x 16 layers x 65,536 experts: 86M usage figures from a trace of 1,280 ids."""
    ids = np.zeros((80, 16, 1), dtype=np.int64)
    sources = [f"s{i}" for i in range(80)]
    with pytest.raises(ValueError, match=r"routing-stats would report .* more than"):
        routing_stats(make_trace(ids, np.arange(80), sources=sources, experts=2**16))
