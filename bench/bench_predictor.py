"""Prediction-guided caching against LRU, LFU and Belady on held-out traces of the demo model.

    python bench/bench_predictor.py --held-out HELD.npz --train TRAIN.npz --predictor DIR \
        [--cross-domain DOMAIN=DIR] [--out bench/results/predictor]

1. Predictor quality: per-layer top-k recall/precision on the held-out trace for batch 1/4/16,
   for the online history predictor, the warm-started history predictor, the path predictor and
   path + history; and, with ``--cross-domain``, a path predictor trained without one domain,
   scored on that domain against the in-domain one.
2. Caching: every held-out sequence decoded token by token (one stream), replayed through the
   native policies at slot budgets of 12.5%..87.5% of all experts: LRU and LFU (per-layer
   slots), LRFU (decayed request counts, one global pool), the ExpertFlow paper's
   configuration (path predictor + one global pool, PLEC: evictions by next-step scores alone),
   and Belady (global pool, the optimum); of expertflow's configurations (each predictor, both
   budgets, and prefetch thresholds 0.7/0.9), the one with the most hits and the one moving the
   fewest bytes; and the fastest of all under the timing model. With a path predictor that has
   a reuse head, path + reuse joins the candidates (its scores rank each layer's experts once
   the layer has run; with thresholds, and with no prefetching at all). Two oracles bound what
   better predictions could give: the step's true routing as its scores, alone and with the
   true reuse scores. With a trace recorded with
   ``--lookahead``, path + gate lookahead joins the candidates: the path predictor's picks at
   the step's start, each layer's lookahead picks when the layer before it starts. Timing
   model: an
   H200-class PCIe Gen5 link (``--bandwidth-gbps``, default 55) and a Mixtral-8x7B-sized bf16
   expert (3 x 4096 x 14336 x 2 bytes = 336 MiB), ``--layer-compute-ms`` per layer (default
   0.2: one Mixtral layer's weights read once from HBM at batch 1).
3. Predictor cost per decode step, next to the demo model's own decode step on this CPU.

Prints the tables and writes ``results.json`` and ``hit_ratio.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from expertflow.prediction import (
    REUSE_HORIZONS,
    CombinedPredictor,
    HistoryPredictor,
    load_predictor,
    multi_hot,
    uses_within,
)
from expertflow.prediction.evaluation import evaluate_predictor, evaluate_scores
from expertflow.traces.format import Trace, load_trace
from expertflow.traces.replay import replay

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2
BUDGETS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
THRESHOLDS = (0.7, 0.9)  # prefetch only predictions this sure (the rest rank evictions)
PAPER = "ExpertFlow paper (path, PLEC)"
# Shown at every budget: the runtime's default with the bundled predictor, with and without
# its reuse head.
SHOWN = ("expertflow: path, global, >= 0.9", "expertflow: path + reuse, global, >= 0.9")
# Bounds on what better predictions could give: the true routing of the step as its scores,
# alone and with the true reuse (the mean over REUSE_HORIZONS of a use within h tokens).
ORACLES = (
    "oracle: true next step, global, >= 0.9",
    "oracle: true next step + reuse, global, >= 0.9",
)


def as_decode_stream(trace: Trace, expert_bytes: int = MIXTRAL_EXPERT_BYTES) -> Trace:
    """Every token its own step, all sequences one after another (batch-1 decoding), each
    expert ``expert_bytes`` in the timing model."""
    meta = dict(trace.meta, prefill=[False] * trace.num_tokens, expert_bytes=expert_bytes)
    meta.pop("sequence_sources", None)
    return Trace(
        expert_ids=trace.expert_ids,
        meta=meta,
        token_ids=trace.token_ids,
        sequence_ids=np.zeros(trace.num_tokens, dtype=np.int64),
    )


def predictors(args, train: Trace):
    history_warm = HistoryPredictor(train.num_layers, train.num_experts, train.top_k).fit([train])
    return {
        "history (online)": lambda: HistoryPredictor(
            train.num_layers, train.num_experts, train.top_k
        ),
        "history (warm)": lambda: copy.deepcopy(history_warm),
        "path": lambda: load_predictor(args.predictor),
        "path + history": lambda: CombinedPredictor(
            [load_predictor(args.predictor), copy.deepcopy(history_warm)], [1.0, 0.5]
        ),
    }


def quality(held: Trace, makers) -> tuple[dict, dict]:
    table, scores = {}, {}
    for name, make in makers.items():
        result = evaluate_predictor(make(), held)
        scores[name] = result.pop("scores")
        table[name] = result
    if held.lookahead_ids is not None:
        # Gate lookahead knows layer l only once layer l-1 runs (nothing for layer 0); its
        # figures below are over all layers, so layer 0 counts as a miss for it.
        ahead = multi_hot(held.lookahead_ids, held.num_experts)
        scores["gate lookahead"] = ahead
        scores["path + lookahead"] = scores["path"] + 2.0 * ahead
        for name in ("gate lookahead", "path + lookahead"):
            result = evaluate_scores(scores[name], held)
            result.pop("scores")
            table[name] = result
    print("\n== predictor quality on held-out text (mean over layers) ==")
    print(
        f"{'predictor':18s} {'batch':>5s} {'top-k rec':>9s} {'prec':>6s} "
        f"{'1.5k rec':>9s} {'2k rec':>7s}"
    )
    for name, result in table.items():
        for batch in (1, 4, 16):
            rows = {r["multiple"]: r for r in result["results"] if r["batch_size"] == batch}
            print(
                f"{name:18s} {batch:5d} {rows[1.0]['mean_recall']:9.3f} "
                f"{rows[1.0]['mean_precision']:6.3f} {rows[1.5]['mean_recall']:9.3f} "
                f"{rows[2.0]['mean_recall']:7.3f}"
            )
    return table, scores


def cross_domain(held: Trace, spec: str, in_domain_dir: str) -> dict:
    domain, directory = spec.split("=", 1)
    only = held.select_sources(lambda s: s == domain)
    out = {}
    for label, path in (("trained with it", in_domain_dir), ("trained without it", directory)):
        result = evaluate_predictor(load_predictor(path), only, batch_sizes=(1,))
        result.pop("scores")
        out[label] = next(r for r in result["results"] if r["multiple"] == 1.0)["mean_recall"]
    print(f"\n== cross-domain: path predictor top-k recall on {domain} ==")
    for label, recall in out.items():
        print(f"  {label:20s} {recall:.3f}")
    return {"domain": domain, **out}


def caching(stream: Trace, scores: dict, args, reuse: np.ndarray | None = None) -> list[dict]:
    total = stream.num_layers * stream.num_experts
    truth = multi_hot(stream.expert_ids, stream.num_experts).astype(np.float32)
    flat = truth.reshape(stream.num_tokens, -1).astype(np.uint8)
    true_reuse = uses_within(flat, REUSE_HORIZONS).mean(axis=1).reshape(truth.shape)
    scores = scores | {"oracle": truth}
    timing = dict(bandwidth_gbps=args.bandwidth_gbps, layer_compute_ms=args.layer_compute_ms)
    rows = []
    for share in BUDGETS:
        slots = int(round(share * total))
        per_layer = slots // stream.num_layers
        glob, layered = dict(slots=slots), dict(slots_per_layer=per_layer)
        # (name, policy, replay keywords, predictor)
        configs = [
            ("LRU", "lru", layered, None),
            ("LFU", "lfu", layered, None),
            ("LFU over the run", "lfu_history", layered, None),
            ("LRFU, global", "lrfu", glob, None),
            # PLEC evicts by the predicted next-step scores alone: a huge score weight.
            (PAPER, "expertflow", glob | dict(score_weight=1e6), "path"),
        ]
        candidates = ["path + history", "history (warm)", "path"]
        if "path + lookahead" in scores:
            candidates.append("path + lookahead")
        for pred in candidates:
            for budget, kw in (("global", glob), ("per-layer", layered)):
                configs.append((f"expertflow: {pred}, {budget}", "expertflow", kw, pred))
        for pred in ("path", "path + lookahead"):
            for threshold in THRESHOLDS if pred in candidates else ():
                kw = glob | dict(prefetch_threshold=threshold)
                configs.append(
                    (f"expertflow: {pred}, global, >= {threshold}", "expertflow", kw, pred)
                )
        if reuse is not None:  # the path predictor's reuse head ranks evictions after release
            with_reuse = glob | dict(reuse=reuse)
            configs.append(("expertflow: path + reuse, global", "expertflow", with_reuse, "path"))
            for threshold in THRESHOLDS:
                kw = with_reuse | dict(prefetch_threshold=threshold)
                name = f"expertflow: path + reuse, global, >= {threshold}"
                configs.append((name, "expertflow", kw, "path"))
            kw = with_reuse | dict(prefetch=False)
            name = "expertflow: path + reuse, global, no prefetch"
            configs.append((name, "expertflow", kw, "path"))
        sure = glob | dict(prefetch_threshold=0.9)
        configs.append((ORACLES[0], "expertflow", sure, "oracle"))
        configs.append((ORACLES[1], "expertflow", sure | dict(reuse=true_reuse), "oracle"))
        configs.append(("Belady (optimum)", "belady", glob, None))
        results = {}
        for name, policy, kw, pred in configs:
            given = dict(predictions=scores.get(pred))
            if pred == "path + lookahead":  # lookahead picks arrive one layer ahead only
                given = dict(predictions=scores["path"], lookahead=scores["path + lookahead"])
            r = replay(stream, policy, **given, **kw, **timing)
            results[name] = dataclasses.asdict(r) | {"hit_ratio": r.hit_ratio}
        ours = [n for n in results if n.startswith("expertflow:")]
        rows.append(
            {
                "share": share,
                "slots": slots,
                "results": results,
                "best": max(ours, key=lambda n: results[n]["hit_ratio"]),
                "fewest_bytes": min(ours, key=lambda n: results[n]["bytes_moved"]),
                "fastest": min(
                    (n for n in results if n != "Belady (optimum)" and n not in ORACLES),
                    key=lambda n: results[n].get("time_per_token_ms") or 0.0,
                ),
            }
        )
    print_caching(rows, args.bandwidth_gbps, args.layer_compute_ms)
    return rows


def print_caching(rows: list[dict], bandwidth_gbps: float, layer_compute_ms: float) -> None:
    total = round(rows[0]["slots"] / rows[0]["share"]) if rows else 0
    print(
        "\n== caching, held-out text decoded token by token (replayed through the native "
        "policies) =="
    )
    print(
        f"timing model: {bandwidth_gbps} GB/s link, {MIXTRAL_EXPERT_BYTES / 2**20:.0f} "
        f"MiB experts, {layer_compute_ms} ms compute per layer"
    )
    for row in rows:
        res = row["results"]
        belady_bytes = res["Belady (optimum)"]["bytes_moved"]
        print(f"\nbudget {100 * row['share']:.1f}% ({row['slots']} of {total} slots)")
        print(
            f"  {'policy':48s} {'hits':>6s} {'vs LRU':>7s} {'GB moved':>9s} "
            f"{'x Belady':>8s} {'ms/token':>9s} {'stall':>6s}"
        )
        names = ["LRU", "LFU", "LRFU, global", PAPER, row["best"], row["fewest_bytes"]]
        names += [row["fastest"], *(n for n in SHOWN if n in res), *ORACLES, "Belady (optimum)"]
        for name in dict.fromkeys(names):  # the fastest may be one of the others
            r = res[name]
            print(
                f"  {name:48s} {r['hit_ratio']:6.3f} "
                f"{100 * (r['hit_ratio'] - res['LRU']['hit_ratio']):+6.1f}p "
                f"{r['bytes_moved'] / 1e9:9.1f} {r['bytes_moved'] / max(belady_bytes, 1):8.2f} "
                f"{r['time_per_token_ms']:9.2f} {100 * r['stall_share']:5.1f}%"
            )


def plot(rows, out: Path) -> None:
    """Hit ratio (left) and modelled time per token (right) against the slot budget: prefetching
    raises hits but also bytes, and on a saturated link bytes are what the time follows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (hits, times) = plt.subplots(1, 2, figsize=(10.5, 4.2), dpi=120)
    shares = [100 * r["share"] for r in rows]
    names = {
        "LRU": lambda r: "LRU",
        "LFU": lambda r: "LFU",
        "LRFU, global": lambda r: "LRFU, global",
        PAPER: lambda r: PAPER,
        "expertflow, most hits": lambda r: r["best"],
        "Belady (optimum)": lambda r: "Belady (optimum)",
    }
    for label, pick in names.items():
        picked = [r["results"][pick(r)] for r in rows]
        hits.plot(shares, [p["hit_ratio"] for p in picked], marker="o", label=label)
        times.plot(shares, [p["time_per_token_ms"] for p in picked], marker="o", label=label)
    hits.set_ylabel("hit ratio")
    times.set_ylabel("modelled ms per token (Mixtral-sized experts, 55 GB/s)")
    for ax in (hits, times):
        ax.set_xlabel("expert slots (% of all experts)")
        ax.grid(alpha=0.3)
    hits.set_title("Demo MoE, held-out text, batch-1 decode")
    times.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out)


def predictor_cost(args, held: Trace) -> dict:
    import torch

    from expertflow.demo.model import load_demo_model

    predictor = load_predictor(args.predictor)
    # One sequence decoding: its history grows by one id per step, so the predictor runs as it
    # does in a model (cached window keys/values; a whole window every context / 2 ids).
    ids, previous = held.token_ids.tolist(), held.expert_ids[:1]
    # With its reuse head, as the prefetcher runs it.
    for n in range(1, 21):
        predictor.predict_step_with_reuse([ids[:n]], previous)
    steps = 128
    started = time.perf_counter()
    for n in range(21, 21 + steps):
        predictor.predict_step_with_reuse([ids[:n]], previous)
    predict_ms = (time.perf_counter() - started) / steps * 1e3
    model, _ = load_demo_model()
    prompt = torch.tensor([held.token_ids[:32].tolist()])
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=33, do_sample=False, pad_token_id=0)
        first = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
        prefill = time.perf_counter() - first
    step_ms = (first - started - prefill) / 32 * 1e3
    print(
        f"\n== predictor cost (CPU, {torch.get_num_threads()} threads) ==\n"
        f"  path predictor {predict_ms:.2f} ms per decode step; demo model decode step "
        f"{step_ms:.2f} ms -> {100 * predict_ms / step_ms:.1f}%"
    )
    offloaded = {}
    for background in (False, True):
        offloaded[background] = _offloaded_step(model, prompt, args.predictor, background)
        step, critical, worker = offloaded[background]
        where = "on a worker thread" if background else "before layer 0"
        print(
            f"  offloaded (24 slots), predictor {where}: decode step {step:.2f} ms, "
            f"predictor on the critical path {critical:.2f} ms"
            + (f" (worker {worker:.2f} ms)" if background else "")
        )
    return {
        "predict_ms": predict_ms,
        "decode_step_ms": step_ms,
        "offloaded_step_ms": offloaded[False][0],
        "offloaded_critical_ms": offloaded[False][1],
        "background_step_ms": offloaded[True][0],
        "background_critical_ms": offloaded[True][1],
    }


def _offloaded_step(base, prompt, predictor_dir, background: bool) -> tuple[float, float, float]:
    """Decode step, predictor time on the critical path and on the worker (ms) of the demo
    model offloaded with the predictor."""
    import copy

    import torch

    import expertflow

    model = copy.deepcopy(base)
    expertflow.offload(
        model,
        device="cpu",
        slots=24,
        predictor=load_predictor(predictor_dir),
        background=background,
    )
    prefetcher = model._expertflow.prefetcher
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
        steps, critical, worker = (
            prefetcher.steps,
            prefetcher.seconds,
            prefetcher.background_seconds,
        )
        started = time.perf_counter()
        model.generate(prompt, max_new_tokens=33, min_new_tokens=33, do_sample=False,
                       pad_token_id=0)  # fmt: skip
        elapsed = time.perf_counter() - started
    n = prefetcher.steps - steps
    expertflow.restore(model)
    return (
        1e3 * elapsed / n,
        1e3 * (prefetcher.seconds - critical) / n,
        1e3 * (prefetcher.background_seconds - worker) / n,
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--held-out", required=True)
    p.add_argument("--train", required=True, help="trace the history predictor warms up on")
    p.add_argument("--predictor", required=True, help="trained path predictor folder")
    p.add_argument("--cross-domain", help="DOMAIN=DIR: path predictor trained without DOMAIN")
    p.add_argument("--bandwidth-gbps", type=float, default=55.0)
    p.add_argument("--layer-compute-ms", type=float, default=0.2)
    p.add_argument("--out", default="bench/results/predictor")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    held, train = load_trace(args.held_out), load_trace(args.train)
    table, scores = quality(held, predictors(args, train))
    results = {"quality": table}
    if args.cross_domain:
        results["cross_domain"] = cross_domain(held, args.cross_domain, args.predictor)
    reuse = load_predictor(args.predictor).reuse_trace(held)
    rows = caching(as_decode_stream(held), scores, args, reuse)
    results["caching"] = rows
    results["cost"] = predictor_cost(args, held)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(rows, out / "hit_ratio.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'hit_ratio.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
