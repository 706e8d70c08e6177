"""The ``expertflow`` command line: ``expertflow replay ...`` (more subcommands later)."""

from __future__ import annotations

import argparse
import json
import sys

from expertflow.trace import TraceError, load_trace


def _replay(args: argparse.Namespace) -> int:
    from expertflow.replay import load_predictions, replay

    trace = load_trace(args.trace)
    predictions = load_predictions(args.predictions, trace) if args.predictions else None
    result = replay(
        trace,
        args.policy,
        slots_per_layer=args.slots_per_layer,
        slots=args.slots,
        predictions=predictions,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_ms=args.layer_compute_ms,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="replay a routing trace through a cache policy")
    rp.add_argument("--trace", required=True, help="trace .npz (see expertflow.trace)")
    rp.add_argument("--policy", required=True, choices=["lru", "lfu", "expertflow", "belady"])
    budget = rp.add_mutually_exclusive_group(required=True)
    budget.add_argument("--slots-per-layer", type=int, help="per-layer budget")
    budget.add_argument("--slots", type=int, help="one pool shared by all layers")
    rp.add_argument("--predictions", help=".npz with scores float [T, L, E]")
    rp.add_argument("--bandwidth-gbps", type=float, help="timing model: copy bandwidth")
    rp.add_argument("--layer-compute-ms", type=float, help="timing model: compute per layer")
    rp.add_argument("--json", action="store_true", help="print the result as JSON")
    rp.set_defaults(run=_replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceError, ValueError) as exc:
        print(f"expertflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
