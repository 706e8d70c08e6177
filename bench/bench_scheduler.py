"""Distinct experts per decode batch: FIFO batches against the token scheduler, on real routing.

    python bench/bench_scheduler.py --held-out HELD.npz --predictor DIR

Workload: the held-out sequences of all domains interleaved in arrival order (a mixed-domain
stream of requests). Every decode step j, groups of 2 (ExpertFlow's pair) or 4 consecutive
batches of B requests decode their j-th tokens. FIFO keeps arrival order; the scheduler
regroups each group of batches by the paths the predictor predicts for those tokens
(``expertflow.serving.scheduler``: one two-batch split for a pair, ``regroup`` for 4), and, as the
bound of what this scheduler could do with perfect prediction, by the true paths. Reported:
distinct experts per batch per layer under the routers' real choices, for B = 4, 16, 64, and
the scheduler's decision time. End to end (real batched generation, KV rows moving, bytes and
throughput): ``bench/bench_generate_batch.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from expertflow.prediction import load_predictor, multi_hot
from expertflow.serving.scheduler import paths_from_scores, regroup, split_two_batches
from expertflow.traces.format import load_trace


def interleaved(trace):
    """Sequences of all sources in round-robin arrival order, cut to a common length."""
    sources = trace.meta.get("sequence_sources") or ["all"] * (int(trace.sequence_ids.max()) + 1)
    by_source: dict[str, list] = {}
    for seq, rows in enumerate(trace.sequence_rows()):
        by_source.setdefault(sources[seq], []).append(rows)
    order = []
    for i in range(max(len(v) for v in by_source.values())):
        order += [v[i] for v in by_source.values() if i < len(v)]
    length = min(len(r) for r in order)
    return np.stack([r[:length] for r in order])  # [requests, steps] token rows


def measure(true_paths, pred_paths, rows, batch, groups=2):
    """Mean distinct experts per batch per layer for fifo, predicted and oracle regrouping of
    ``groups`` consecutive batches (2: ExpertFlow's pair, one two-batch split)."""
    requests, steps = rows.shape
    chunks = requests // (groups * batch)
    totals = {"fifo": 0.0, "scheduled": 0.0, "oracle": 0.0}
    seconds, decisions = 0.0, 0
    layers = true_paths.shape[1]
    fifo = [r // batch for r in range(groups * batch)]
    for step in range(steps):
        for c in range(chunks):
            members = rows[np.arange(groups * batch * c, groups * batch * (c + 1)), step]
            true = true_paths[members]
            assignments = {"fifo": fifo}
            started = time.perf_counter()
            if groups == 2:
                first, _ = split_two_batches(pred_paths[members], batch)
                assignments["scheduled"] = [0 if r in first else 1 for r in range(2 * batch)]
            else:
                assignments["scheduled"] = regroup(pred_paths[members], fifo, groups)
            seconds += time.perf_counter() - started
            decisions += 1
            assignments["oracle"] = regroup(true, fifo, groups)
            for name, assignment in assignments.items():
                assignment = np.asarray(assignment)
                distinct = sum(true[assignment == g].any(0).sum() for g in range(groups))
                totals[name] += distinct / (groups * layers)
    n = steps * chunks
    return {k: v / n for k, v in totals.items()} | {"decision_us": 1e6 * seconds / decisions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", required=True)
    p.add_argument("--predictor", required=True)
    p.add_argument("--steps", type=int, default=32, help="decode steps per request measured")
    p.add_argument("--out", default="bench/results/scheduler")
    args = p.parse_args(argv)
    trace = load_trace(args.held_out)
    scores = load_predictor(args.predictor).predict_trace(trace)
    pred_paths = paths_from_scores(scores, trace.top_k)
    true_paths = multi_hot(trace.expert_ids, trace.num_experts).astype(bool)
    rows = interleaved(trace)[:, : args.steps]
    print(
        f"{rows.shape[0]} requests (domains interleaved), {rows.shape[1]} decode steps each, "
        f"{trace.num_layers} layers x {trace.num_experts} experts, top-{trace.top_k}"
    )
    print(
        f"{'batch':>5s} {'fifo':>7s} {'scheduled':>10s} {'saving':>7s} {'oracle':>7s} "
        f"{'decision':>9s}   (distinct experts per batch per layer)"
    )
    results = {}
    for groups in (2, 4):
        print(f"-- {groups} batches regrouped together")
        for batch in (4, 16, 64):
            if rows.shape[0] < groups * batch:
                print(
                    f"{batch:5d}  (needs {groups * batch} requests, the trace has {rows.shape[0]})"
                )
                continue
            r = measure(true_paths, pred_paths, rows, batch, groups)
            results[f"{groups}x{batch}"] = r
            print(
                f"{batch:5d} {r['fifo']:7.2f} {r['scheduled']:10.2f} "
                f"{100 * (1 - r['scheduled'] / r['fifo']):6.1f}% {r['oracle']:7.2f} "
                f"{r['decision_us']:7.0f} us"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
