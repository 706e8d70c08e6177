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
