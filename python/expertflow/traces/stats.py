"""How real a trace's routing is: expert usage, domain specialisation, temporal reuse, and
cross-layer affinity; each figure next to the baseline it has to beat.

* **usage**: per layer, the share of routings each expert takes (per source/domain and overall);
  ``dead`` experts take none, ``max_share`` is the busiest expert's share.
* **specialisation**: Jensen-Shannon divergence (bits, 0..1) between the usage of every pair of
  domains, averaged over layers; baseline: the divergence between two halves of the same domain's
  sequences (what sampling noise alone gives).
* **reuse**: the share of a token's experts at a layer that the previous token of its sequence
  also used there; baseline: the same with the previous token taken from a random position.
* **cross-layer affinity**: top-k recall at layer l+1 when predicting from the token's experts at
  layer l with a transition table fitted on half the sequences and scored on the other half;
  baseline: predicting layer l+1's most used experts.

A figure a trace cannot give (cross-layer affinity of a single sequence: nothing to score on;
reuse when no sequence has two tokens; a layer with no recorded routing) is None (``null`` in
JSON), and printed as "not applicable" with the reason.
"""

from __future__ import annotations

import numpy as np

from expertflow.traces.format import Trace

__all__ = ["format_routing_stats", "routing_stats"]


def _usage(ids: np.ndarray, experts: int) -> np.ndarray:
    """``[L, E]`` share of routings per expert for token rows ``ids [T, L, K]``."""
    layers = ids.shape[1]
    counts = np.zeros((layers, experts))
    for layer in range(layers):
        chosen = ids[:, layer].ravel()
        counts[layer] = np.bincount(chosen[chosen >= 0], minlength=experts)
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def _js_bits(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over layers of the Jensen-Shannon divergence of rows of p and q, in bits."""
    m = (p + q) / 2

    def kl(a, b):
        mask = a > 0
        return np.where(mask, a * np.log2(np.where(mask, a, 1) / np.where(b > 0, b, 1)), 0).sum(1)

    return float(np.mean((kl(p, m) + kl(q, m)) / 2))


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean share of the experts in rows of ``a [N, K]`` also present in rows of ``b [N, K]``."""
    if len(a) == 0:
        return float("nan")
    hits = (a[:, :, None] == b[:, None, :]).any(axis=2) & (a >= 0)
    return float(hits.sum() / max((a >= 0).sum(), 1))


def _affinity(ids: np.ndarray, experts: int, seqs: np.ndarray) -> tuple[list, list]:
    """Per layer pair (l, l+1): (recall of the transition-table prediction, of the popularity
    baseline), fitted on the even sequences (by rank of their ids), scored on the odd ones;
    NaN where there is nothing to fit or score."""
    rank = np.unique(seqs, return_inverse=True)[1].reshape(-1)
    fit = rank % 2 == 0
    score = ~fit
    k = ids.shape[2]
    table_recall, popular_recall = [], []
    for layer in range(ids.shape[1] - 1):
        src, dst = ids[:, layer], ids[:, layer + 1]
        table = np.zeros((experts, experts))
        for a in range(k):
            for b in range(k):
                ok = fit & (src[:, a] >= 0) & (dst[:, b] >= 0)
                np.add.at(table, (src[ok, a], dst[ok, b]), 1)
        valid = score & (src >= 0).all(1) & (dst >= 0).all(1)
        if not valid.any() or not fit.any():
            table_recall.append(float("nan"))
            popular_recall.append(float("nan"))
            continue
        scores = table[src[valid]].sum(axis=1)  # [N, E]: evidence from each of the k experts
        predicted = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        table_recall.append(_overlap(dst[valid], predicted))
        popular = np.argsort(-table.sum(axis=0), kind="stable")[:k]
        popular_recall.append(_overlap(dst[valid], np.broadcast_to(popular, (valid.sum(), k))))
    return table_recall, popular_recall


def _compact(ids: np.ndarray, experts: int, k: int) -> tuple[np.ndarray, int]:
    """``ids`` renumbered onto the experts they use plus the ``k`` lowest-numbered unused ones,
    in the same order, and how many that is. The affinity figures are unchanged (an unused
    expert only ever enters a top-k as one of the lowest-numbered zero scores), but their
    ``[E, E]`` tables shrink to what the trace holds: 32 GiB for 65,536 experts otherwise."""
    used = np.unique(ids[ids >= 0])
    spare = np.setdiff1d(np.arange(min(experts, len(used) + k)), used)[:k]
    keep = np.union1d(used, spare)
    return np.where(ids >= 0, np.searchsorted(keep, ids), -1), len(keep)


def _check_size(layers: int, experts: int, domains: int) -> None:
    """Refuses a report of more than ``_MAX_USAGE_ENTRIES`` usage figures (one per domain,
    layer and expert) before building it: a few labels in a small file could ask for GBs."""
    entries = (domains + 1) * layers * experts
    if entries > _MAX_USAGE_ENTRIES:
        raise ValueError(
            f"routing-stats would report {entries:,} usage figures ((domains {domains} + 1) x "
            f"layers {layers} x num_experts {experts}), more than {_MAX_USAGE_ENTRIES:,}: "
            "select fewer sources (meta.sequence_sources) or layers"
        )


# 2**26 float64 figures: 512 MiB of tables (and a JSON report of about 1 GB) at most.
_MAX_USAGE_ENTRIES = 2**26


def routing_stats(trace: Trace, seed: int = 0) -> dict:
    """The figures described in the module docstring, as a JSON-friendly dict."""
    ids = trace.expert_ids.astype(np.int64)
    experts = trace.num_experts
    seqs = (
        trace.sequence_ids.astype(np.int64)
        if trace.sequence_ids is not None
        else np.zeros(trace.num_tokens, dtype=np.int64)
    )
    sources = trace.meta.get("sequence_sources")
    labels = np.asarray([sources[s] for s in seqs]) if sources else np.full(trace.num_tokens, "all")
    domains = sorted(set(labels.tolist()))
    _check_size(trace.num_layers, experts, len(domains))
    usage = _usage(ids, experts)
    per_domain = {d: _usage(ids[labels == d], experts) for d in domains}

    pairs = {}
    for i, a in enumerate(domains):
        for b in domains[i + 1 :]:
            pairs[f"{a}|{b}"] = _js_bits(per_domain[a], per_domain[b])
    noise = {}
    for d in domains:
        mine = np.unique(seqs[labels == d])
        halves = [np.isin(seqs, mine[0::2]), np.isin(seqs, mine[1::2])]
        if all(h.any() for h in halves):
            noise[d] = _js_bits(_usage(ids[halves[0]], experts), _usage(ids[halves[1]], experts))

    prev_same = np.zeros(trace.num_tokens, dtype=bool)
    prev_same[1:] = seqs[1:] == seqs[:-1]
    rows = np.flatnonzero(prev_same)
    rng = np.random.default_rng(seed)
    random_prev = rng.integers(0, trace.num_tokens, size=len(rows))
    reuse = [_overlap(ids[rows, layer], ids[rows - 1, layer]) for layer in range(ids.shape[1])]
    reuse_base = [
        _overlap(ids[rows, layer], ids[random_prev, layer]) for layer in range(ids.shape[1])
    ]
    table_recall, popular_recall = _affinity(*_compact(ids, experts, trace.top_k), seqs)

    return {
        "tokens": trace.num_tokens,
        "sequences": int(len(np.unique(seqs))),
        "layers": trace.num_layers,
        "experts": experts,
        "top_k": trace.top_k,
        "domains": domains,
        "usage": usage.tolist(),
        "usage_per_domain": {d: u.tolist() for d, u in per_domain.items()},
        "dead_experts": [np.flatnonzero(u == 0).tolist() for u in usage],
        "max_share": usage.max(axis=1).tolist(),
        "domain_divergence_bits": pairs,
        "domain_divergence_mean": float(np.mean(list(pairs.values()))) if pairs else None,
        "same_domain_divergence_bits": noise,
        "same_domain_divergence_mean": float(np.mean(list(noise.values()))) if noise else None,
        "reuse": _nan_to_none(reuse),
        "reuse_random_baseline": _nan_to_none(reuse_base),
        "cross_layer_recall": _nan_to_none(table_recall),
        "cross_layer_popularity_baseline": _nan_to_none(popular_recall),
    }


def _nan_to_none(values: list[float]) -> list[float | None]:
    """NaN (a figure with nothing to compute it on) as None: ``null`` in JSON, not ``NaN``."""
    return [None if np.isnan(v) else v for v in values]


def _not_applicable(stats: dict) -> str:
    if stats["sequences"] < 2:
        count = stats["sequences"]
        return f"not applicable ({count} sequence{'' if count == 1 else 's'})"
    return "not applicable"


def _with_baseline(value: float | None, baseline: float | None, stats: dict) -> str:
    if value is None or baseline is None:
        return _not_applicable(stats)
    return f"{value:.3f} ({baseline:.3f})"


def format_routing_stats(stats: dict) -> str:
    lines = [
        f"{stats['tokens']} tokens, {stats['layers']} layers x {stats['experts']} experts, "
        f"top-{stats['top_k']}; domains: {', '.join(stats['domains'])}",
        "",
        "layer  dead  max share  reuse (random)   next-layer recall (popularity)",
    ]
    for layer in range(stats["layers"]):
        nxt = "-"
        if layer < stats["layers"] - 1:
            nxt = _with_baseline(
                stats["cross_layer_recall"][layer],
                stats["cross_layer_popularity_baseline"][layer],
                stats,
            )
        reuse = _with_baseline(stats["reuse"][layer], stats["reuse_random_baseline"][layer], stats)
        lines.append(
            f"{layer:5d}  {len(stats['dead_experts'][layer]):4d}  "
            f"{stats['max_share'][layer]:9.3f}  {reuse:13s}   {nxt}"
        )
    if stats["domain_divergence_mean"] is not None:
        # The baseline needs a domain of two sequences or more (two halves to compare).
        noise = stats["same_domain_divergence_mean"]
        noise = "not applicable (one sequence per domain)" if noise is None else f"{noise:.3f}"
        lines += [
            "",
            f"domain specialisation: mean Jensen-Shannon divergence between domains "
            f"{stats['domain_divergence_mean']:.3f} bits (between halves of one domain: "
            f"{noise})",
        ]
        for pair, value in sorted(stats["domain_divergence_bits"].items()):
            lines.append(f"  {pair:32s} {value:.3f}")
    return "\n".join(lines)
