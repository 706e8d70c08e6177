"""Hybrid execution in the replay's timing model (issue 18): copy-only against CPU experts.

A held-out trace decoded token by token (all sequences one after another, batch 1), replayed
with Mixtral-8x7B-sized experts over one link, with a host CPU computing missed experts:

- copy-only LRU (per-layer pools) and copy-only expertflow (path predictions + reuse scores,
  one global pool, prefetch >= 0.9; with ``--scores``),
- all misses on the CPU (``cpu_experts="always"``: misses fill free slots, later ones run on
  the CPU: Fiddler-like),
- hybrid (``cpu_experts="auto"``: the native HybridPolicy per miss), with LRU and (with
  ``--scores``) with expertflow (prefetch >= 0.5),
- copy-only Belady (global pool).

    python bench/bench_hybrid_replay.py --held held.npz [--scores scores.npz] [--json]

``scores.npz``: ``expertflow eval-predictor --traces held.npz --write-scores scores.npz``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expertflow.traces import load_trace
from expertflow.traces.replay import load_predictions, replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predictor import MIXTRAL_EXPERT_BYTES, as_decode_stream  # noqa: E402


def configs(per_layer: int, slots: int, predicted: dict | None):
    layered, glob = dict(slots_per_layer=per_layer), dict(slots=slots)
    always, auto = dict(cpu_experts="always"), dict(cpu_experts="auto")
    rows = [("copy-only LRU", "lru", layered)]
    if predicted is not None:
        rows.append(("copy-only expertflow", "expertflow", glob | predicted))
    rows += [
        ("all misses on the CPU (LRU)", "lru", layered | always),
        ("hybrid (auto, LRU)", "lru", layered | auto),
    ]
    if predicted is not None:
        # With CPU experts the link is less busy: prefetching at >= 0.5 pays (0.9 copy-only).
        hybrid = glob | predicted | auto | dict(prefetch_threshold=0.5)
        rows.append(("hybrid (auto, expertflow)", "expertflow", hybrid))
    rows.append(("copy-only Belady", "belady", glob))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--held", required=True, help="held-out routing trace")
    ap.add_argument("--scores", help="eval-predictor --write-scores of the same trace")
    ap.add_argument("--bandwidth-gbps", type=float, default=55.0)
    ap.add_argument("--cpu-gbps", type=float, default=100.0)
    ap.add_argument("--cpu-gflops", type=float, default=1000.0)
    ap.add_argument("--layer-compute-ms", type=float, default=0.2)
    ap.add_argument("--expert-bytes", type=int, default=MIXTRAL_EXPERT_BYTES)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    held = load_trace(args.held)
    stream = as_decode_stream(held, args.expert_bytes)
    predicted = None
    if args.scores:
        scores, reuse = load_predictions(args.scores, held)
        predicted = dict(predictions=scores, reuse=reuse, prefetch_threshold=0.9)
    timing = dict(bandwidth_gbps=args.bandwidth_gbps, layer_compute_ms=args.layer_compute_ms)
    cpu = dict(cpu_gbps=args.cpu_gbps, cpu_gflops=args.cpu_gflops)
    total = stream.num_layers * stream.num_experts
    out = []
    for share in args.budgets:
        slots = int(round(share * total))
        for name, policy, kw in configs(slots // stream.num_layers, slots, predicted):
            given_cpu = cpu if "cpu_experts" in kw else {}
            r = replay(stream, policy, **kw, **timing, **given_cpu)
            out.append(
                {
                    "budget": share,
                    "slots": r.slots,
                    "config": name,
                    "time_per_token_ms": r.time_per_token_ms,
                    "hit_ratio": r.hit_ratio,
                    "cpu_experts_per_token": (r.cpu_experts or 0) / r.tokens,
                    "copies_per_token": r.bytes_moved / r.expert_bytes / r.tokens,
                    "stall_share": r.stall_share,
                }
            )
    if args.json:
        print(json.dumps({"tokens": stream.num_tokens, "rows": out}, indent=1))
        return 0
    print(
        f"{stream.num_tokens} tokens, {stream.num_layers} layers x {stream.num_experts} experts, "
        f"top-{stream.top_k}; link {args.bandwidth_gbps} GB/s, CPU {args.cpu_gbps} GB/s and "
        f"{args.cpu_gflops} GFLOP/s, {args.expert_bytes} B experts, "
        f"{args.layer_compute_ms} ms per layer"
    )
    for row in out:
        print(
            f"{row['budget']:5.1%} {row['config']:30s} {row['time_per_token_ms']:8.2f} ms/token "
            f"hits {row['hit_ratio']:.3f} copies {row['copies_per_token']:.2f} "
            f"cpu {row['cpu_experts_per_token']:.2f} per token"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
