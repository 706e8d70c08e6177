"""Transfer engine on a GPU: copy throughput against plain ``tensor.copy_``, and overlap with
compute, measured in one run.

1. Throughput: the ExpertCache copies N experts (pinned host -> device slots, misses on the
   urgent stream); the baseline is one ``copy_`` of the same bytes from pinned memory. Target:
   >= 90% of the baseline.
2. Overlap: the same copies issued as prefetches while a bf16 GEMM runs on the compute stream.
   Target: total <= 1.15 x max(copies alone, GEMM alone).

    python bench/bench_transfer.py [--expert-mib 16] [--experts 64] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timer import median_seconds  # noqa: E402

from expertflow import ExpertCache  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expert-mib", type=int, default=16)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--gemm", type=int, default=8192, help="GEMM size n (n x n x n, bf16)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_transfer: needs a CUDA device; none is visible")
        return 1

    n_experts = args.experts
    elems = args.expert_mib * 2**20 // 2
    nbytes = n_experts * elems * 2
    # Twice as many experts as slots: alternating halves makes every request a miss.
    cache = ExpertCache(
        [[[torch.randn(elems, dtype=torch.bfloat16)] for _ in range(2 * n_experts)]],
        device="cuda",
        slots=n_experts,
        top_k=1,
        budget="global",
        policy="lru",
    )

    # Baseline: one copy_ of the same bytes from pinned memory.
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).random_(0, 255)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    baseline_s = median_seconds(lambda: dst.copy_(src, non_blocking=True), "cuda", repeats=10)

    offset = [0]

    def engine_misses():
        base = offset[0]
        offset[0] = n_experts - offset[0]  # alternate halves: every request misses
        for e in range(n_experts):
            slots, _ = cache.acquire(0, [base + e])
            cache.wait(slots[0])
            cache.release(0)
        cache.synchronize()

    engine_s = median_seconds(engine_misses, "cuda", warmup=2, repeats=10)

    a = torch.randn(args.gemm, args.gemm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.gemm, args.gemm, device="cuda", dtype=torch.bfloat16)
    gemm_s = median_seconds(lambda: a @ b, "cuda", repeats=10)
    reps = max(1, round(engine_s / gemm_s))  # enough GEMMs to cover the copies

    def gemms():
        for _ in range(reps):
            a @ b

    gemms_s = median_seconds(gemms, "cuda", repeats=5)

    def overlapped():
        base = offset[0]
        offset[0] = n_experts - offset[0]
        scores = torch.zeros(1, 2 * n_experts)
        scores[0, base : base + n_experts] = 1.0
        cache.plan(scores, per_layer=n_experts)  # prefetch stream
        gemms()  # compute stream, concurrently
        cache.synchronize()
        torch.cuda.synchronize()

    overlapped_s = median_seconds(overlapped, "cuda", warmup=2, repeats=5)

    row = {
        "bytes": nbytes,
        "baseline_copy_GBps": nbytes / baseline_s / 1e9,
        "engine_GBps": nbytes / engine_s / 1e9,
        "engine_of_baseline": baseline_s / engine_s,
        "copies_alone_ms": engine_s * 1e3,
        "gemms_alone_ms": gemms_s * 1e3,
        "overlapped_ms": overlapped_s * 1e3,
        "overlap_ratio": overlapped_s / max(engine_s, gemms_s),
        "gemm_TFLOPs": 2 * args.gemm**3 / gemm_s / 1e12,
        "device": torch.cuda.get_device_name(),
    }
    print("transfer engine, medians:")
    for key, value in row.items():
        print(f"  {key:20} {value:.3f}" if isinstance(value, float) else f"  {key:20} {value}")
    print(
        f"engine throughput {row['engine_of_baseline']:.1%} of copy_ (target >= 90%); "
        f"overlapped {row['overlap_ratio']:.2f} x max(alone) (target <= 1.15)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "transfer_cuda.json").write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
