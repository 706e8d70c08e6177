"""``expertflow replay``: a routing trace through a cache policy, under a timing model."""

from __future__ import annotations

import argparse
import json

from expertflow.runtime.policies import POLICIES
from expertflow.traces import TraceError, load_trace
from expertflow.traces.replay_options import CPU_EXPERTS

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps it at least 1: ``1.5 GiB``."""
    unit = 0
    while abs(count) >= 1024 and unit + 1 < len(_BYTE_UNITS):
        count /= 1024
        unit += 1
    return f"{count:.0f} B" if unit == 0 else f"{count:.1f} {_BYTE_UNITS[unit]}"


def _lookahead_scores(args: argparse.Namespace, trace):
    if not args.lookahead:
        return None
    if trace.lookahead_ids is None:
        raise TraceError(
            f"{args.trace}: --lookahead needs a trace recorded with `expertflow trace "
            "--lookahead` (it has no lookahead_ids)"
        )
    from expertflow.prediction import multi_hot

    return multi_hot(trace.lookahead_ids, trace.num_experts)


def _expert_bytes(value: str | None) -> int | None:
    """``--expert-bytes`` as an int (its range is checked with the other options)."""
    if value is None:
        return None
    try:
        return int(value.strip().replace("_", ""))
    except ValueError:
        raise ValueError(
            f"--expert-bytes must be a positive integer (the bytes of one expert), got {value!r}"
        ) from None


def run(args: argparse.Namespace) -> int:
    from expertflow.traces.replay import load_predictions, replay
    from expertflow.traces.replay_options import check_options, option_spelling

    trace = load_trace(args.trace)
    options = dict(
        slots_per_layer=args.slots_per_layer,
        slots=args.slots,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_ms=args.layer_compute_ms,
        prefetch_threshold=args.prefetch_threshold,
        expert_bytes=_expert_bytes(args.expert_bytes),
        cpu_gbps=args.cpu_gbps,
        cpu_gflops=args.cpu_gflops,
        cpu_experts=args.cpu_experts,
    )
    # Refuse before reading predictions (they can be large): only their presence matters here.
    check_options(
        trace,
        args.policy,
        predictions=args.predictions,
        lookahead=True if args.lookahead else None,
        spell=option_spelling,
        **options,
    )
    predictions = reuse = None
    if args.predictions:
        predictions, reuse = load_predictions(args.predictions, trace)
    result = replay(
        trace,
        args.policy,
        predictions=predictions,
        lookahead=_lookahead_scores(args, trace),
        reuse=reuse,
        spell=option_spelling,
        **options,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        _print_result(args, trace, result)
    return 0


def _print_result(args: argparse.Namespace, trace, result) -> None:
    print(
        f"trace: {args.trace} ({trace.meta['model']}, {trace.num_tokens} tokens, "
        f"{result.steps} steps, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"top-{trace.top_k})"
    )
    print(f"policy {result.policy}, {result.slots} slots ({result.budget})")
    if result.note:
        print(f"  note: {result.note}")
    print(
        f"  hit ratio          {result.hit_ratio:.4f}  ({result.hits} hits, {result.misses} misses)"
    )
    print(
        f"  prefetches         {result.prefetches}  (used {result.prefetch_hits}, "
        f"wasted {result.wasted_prefetches})"
    )
    if result.expert_bytes != result.trace_expert_bytes:
        print(
            f"  expert size        {human_bytes(result.expert_bytes)} ({result.expert_bytes} B, "
            f"--expert-bytes; the trace's: {result.trace_expert_bytes} B)"
        )
    if result.tokens:
        print(
            f"  bytes moved        {human_bytes(result.bytes_per_token)} per token, "
            f"{human_bytes(result.bytes_per_step)} per step "
            f"({human_bytes(result.bytes_moved)} in all)"
        )
    else:
        print(f"  bytes moved        {human_bytes(result.bytes_moved)}")
    if result.time_per_token_ms is not None:
        print(
            f"  time per step      {result.time_per_step_ms:.3f} ms, per token "
            f"{result.time_per_token_ms:.3f} ms (modelled)"
        )
        waits = "copies" if result.cpu_experts is None else "copies and CPU experts"
        print(f"  stalled on {waits}  {100 * result.stall_share:.1f}% of the time")
    if result.cpu_experts is not None:
        print(
            f"  CPU experts        {result.cpu_experts} computed on the CPU ({result.misses} "
            "misses in all; a miss on the CPU is neither copied nor cached)"
        )


def add_parser(sub) -> None:
    rp = sub.add_parser("replay", help="replay a routing trace through a cache policy")
    rp.add_argument("--trace", required=True, help="trace .npz (see expertflow.traces.format)")
    rp.add_argument("--policy", required=True, choices=POLICIES, help="the cache policy to replay")
    budget = rp.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--slots-per-layer",
        type=int,
        help="per-layer budget, at least top_k (above num_experts: replayed as num_experts)",
    )
    budget.add_argument(
        "--slots",
        type=int,
        help="one pool shared by all layers, at least top_k (above num_layers x num_experts: "
        "replayed as that)",
    )
    rp.add_argument(
        "--predictions",
        help="(expertflow policy) .npz with scores float [T, L, E] (and reuse scores 'reuse', "
        "if the predictor has a reuse head: eval-predictor --write-scores writes both)",
    )
    rp.add_argument(
        "--lookahead",
        action="store_true",
        help="(expertflow policy) also prefetch the trace's recorded gate-lookahead picks, each "
        "layer's when the layer before it starts (trace recorded with --lookahead)",
    )
    rp.add_argument(
        "--prefetch-threshold",
        type=float,
        help="(expertflow policy, with --predictions) prefetch only predictions scored at "
        "least this (the others still rank evictions; default 0)",
    )
    rp.add_argument(
        "--bandwidth-gbps", type=float,
        help="timing model: host-to-device copy bandwidth in GB/s (default: no timing model; "
        "give it with --layer-compute-ms)",
    )  # fmt: skip
    rp.add_argument(
        "--layer-compute-ms", type=float,
        help="timing model: compute time of one layer in ms (default: no timing model; give it "
        "with --bandwidth-gbps)",
    )  # fmt: skip
    rp.add_argument(
        "--expert-bytes",
        help="timing model and bytes moved: every expert this many bytes instead of the trace's "
        "meta.expert_bytes (e.g. its packed size in a quantized format)",
    )
    rp.add_argument(
        "--cpu-gbps", type=float,
        help="timing model: a host CPU computes missed experts at this many GB/s of weight bytes, "
        "concurrently with the link (needs --bandwidth-gbps); see --cpu-experts",
    )  # fmt: skip
    rp.add_argument(
        "--cpu-gflops", type=float,
        help="(with --cpu-gbps) the CPU's GFLOP/s: an expert takes at least 2 x params x tokens "
        "flops (params = expert bytes / 2); default: no token term",
    )  # fmt: skip
    rp.add_argument(
        "--cpu-experts", choices=CPU_EXPERTS,
        help="(with --cpu-gbps) which misses the CPU computes: never (copy-only), always "
        "(Fiddler-like), auto (default: per miss, the native HybridPolicy)",
    )  # fmt: skip
    rp.add_argument("--json", action="store_true", help="print the result as JSON")
    rp.set_defaults(run=run)
