"""``expertflow replay``: a routing trace through a cache policy, under a timing model."""

from __future__ import annotations

import argparse
import json

from expertflow.runtime.policies import POLICIES
from expertflow.traces import TraceError, load_trace


def run(args: argparse.Namespace) -> int:
    from expertflow.traces.replay import load_predictions, replay

    trace = load_trace(args.trace)
    predictions = reuse = None
    if args.predictions:
        predictions, reuse = load_predictions(args.predictions, trace)
    lookahead = None
    if args.lookahead:
        if trace.lookahead_ids is None:
            raise TraceError(
                f"{args.trace}: --lookahead needs a trace recorded with `expertflow trace "
                "--lookahead` (it has no lookahead_ids)"
            )
        from expertflow.prediction import multi_hot

        lookahead = multi_hot(trace.lookahead_ids, trace.num_experts)
    result = replay(
        trace,
        args.policy,
        slots_per_layer=args.slots_per_layer,
        slots=args.slots,
        predictions=predictions,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_ms=args.layer_compute_ms,
        lookahead=lookahead,
        prefetch_threshold=args.prefetch_threshold,
        reuse=reuse,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    print(
        f"trace: {args.trace} ({trace.meta['model']}, {trace.num_tokens} tokens, "
        f"{result.steps} steps, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"top-{trace.top_k})"
    )
    print(f"policy {result.policy}, {result.slots} slots ({result.budget})")
    print(
        f"  hit ratio          {result.hit_ratio:.4f}  ({result.hits} hits, {result.misses} misses)"
    )
    print(
        f"  prefetches         {result.prefetches}  (used {result.prefetch_hits}, "
        f"wasted {result.wasted_prefetches})"
    )
    print(f"  bytes moved        {result.bytes_moved / 2**20:.1f} MiB")
    if result.time_per_token_ms is not None:
        print(f"  time per token     {result.time_per_token_ms:.3f} ms (modelled)")
        print(f"  stalled on copies  {100 * result.stall_share:.1f}% of the time")
    return 0


def add_parser(sub) -> None:
    rp = sub.add_parser("replay", help="replay a routing trace through a cache policy")
    rp.add_argument("--trace", required=True, help="trace .npz (see expertflow.traces.format)")
    rp.add_argument("--policy", required=True, choices=POLICIES)
    budget = rp.add_mutually_exclusive_group(required=True)
    budget.add_argument("--slots-per-layer", type=int, help="per-layer budget")
    budget.add_argument("--slots", type=int, help="one pool shared by all layers")
    rp.add_argument(
        "--predictions",
        help=".npz with scores float [T, L, E] (and reuse scores 'reuse', if the predictor has "
        "a reuse head: eval-predictor --write-scores writes both)",
    )
    rp.add_argument(
        "--lookahead",
        action="store_true",
        help="also prefetch the trace's recorded gate-lookahead picks, each layer's when the "
        "layer before it starts (trace recorded with --lookahead)",
    )
    rp.add_argument(
        "--prefetch-threshold",
        type=float,
        default=0.0,
        help="prefetch only predictions scored at least this (the others still rank evictions)",
    )
    rp.add_argument("--bandwidth-gbps", type=float, help="timing model: copy bandwidth")
    rp.add_argument("--layer-compute-ms", type=float, help="timing model: compute per layer")
    rp.add_argument("--json", action="store_true", help="print the result as JSON")
    rp.set_defaults(run=run)
