"""Fused expertflow.ops.topk_gating against the same routing in eager torch ops.

The baseline is the routers' own code in transformers (softmax -> topk -> renormalise for
Mixtral/Qwen3-MoE; sigmoid + bias + group-limited top-k for DeepSeek-V3). Prints a table of
medians and speed-ups; on CUDA also the achieved bytes/s against the measured copy bandwidth.

    python bench/bench_gating.py [--device cpu|cuda] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timer import device_copy_bandwidth, median_seconds  # noqa: E402

import expertflow  # noqa: E402
from expertflow import ops  # noqa: E402


def eager_mixtral(logits: torch.Tensor, top_k: int):
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights /= weights.sum(dim=-1, keepdim=True)
    return ids, weights


def eager_deepseek_v3(logits, top_k, bias, n_group, topk_group, scale=2.5):
    num_experts = logits.shape[-1]
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group)
    choice = choice.masked_fill(~score_mask.reshape(-1, num_experts).bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20) * scale
    return ids, weights


def cases(router: str, quick: bool):
    tokens = [1, 256, 4096] if quick else [1, 16, 256, 4096]
    experts = [8, 64, 128, 256]
    topks = [2, 8]
    for t in tokens:
        for e in experts:
            for k in topks:
                if router == "deepseek_v3" and e < 64:
                    continue  # 8 groups of at least 8 experts, as the family uses
                yield t, e, k


def run(router: str, device: str, dtype: torch.dtype, quick: bool, bandwidth: float | None):
    rows = []
    gen = torch.Generator().manual_seed(0)
    for t, e, k in cases(router, quick):
        logits = torch.randn(t, e, generator=gen).to(dtype).to(device)
        if router == "mixtral":
            fused = functools.partial(ops.topk_gating, logits, k)
            eager = functools.partial(eager_mixtral, logits, k)
        else:
            bias = (torch.randn(e, generator=gen) * 0.1).to(device)
            fused = functools.partial(
                ops.topk_gating,
                logits,
                k,
                scoring="sigmoid",
                correction_bias=bias,
                n_group=8,
                topk_group=4,
                routed_scaling_factor=2.5,
            )
            eager = functools.partial(eager_deepseek_v3, logits, k, bias, 8, 4)
        # Same answer before timing anything.
        f_ids, _ = fused()
        e_ids, _ = eager()
        assert torch.equal(f_ids.sort(-1)[0].long(), e_ids.sort(-1)[0]) or t > 256, (t, e, k)
        fused_s = median_seconds(fused, device)
        eager_s = median_seconds(eager, device)
        row = {
            "router": router,
            "tokens": t,
            "experts": e,
            "top_k": k,
            "fused_us": fused_s * 1e6,
            "eager_us": eager_s * 1e6,
            "speedup": eager_s / fused_s,
        }
        if bandwidth:
            moved = t * e * logits.element_size() + t * k * 8  # logits in, ids + weights out
            row["fused_GBps"] = moved / fused_s / 1e9
            row["of_copy_bandwidth"] = moved / fused_s / bandwidth
        rows.append(row)
    return rows


def print_table(rows):
    cols = ["router", "tokens", "experts", "top_k", "eager_us", "fused_us", "speedup"]
    if "fused_GBps" in rows[0]:
        cols += ["fused_GBps", "of_copy_bandwidth"]
    print(" | ".join(f"{c:>10}" for c in cols))
    for r in rows:
        cells = [f"{r[c]:>10.2f}" if isinstance(r[c], float) else f"{r[c]:>10}" for c in cols]
        print(" | ".join(cells))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--router", choices=["mixtral", "deepseek_v3", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer token counts")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    bandwidth = device_copy_bandwidth(args.device) if args.device == "cuda" else None
    routers = ["mixtral", "deepseek_v3"] if args.router == "all" else [args.router]
    rows = [r for router in routers for r in run(router, args.device, dtype, args.quick, bandwidth)]
    env = {
        "device": torch.cuda.get_device_name()
        if args.device == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": args.dtype,
        "expertflow": expertflow.build_info()["git_revision"],
    }
    if bandwidth:
        env["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"topk_gating, fused vs eager torch, medians ({env})")
    print_table(rows)
    big = [r for r in rows if r["tokens"] == 4096]
    print(
        f"min speed-up at T=4096: {min(r['speedup'] for r in big):.2f}x "
        f"(target >= {'3' if args.device == 'cuda' else '2'}x)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gating_{args.device}_{args.dtype}.json"
    path.write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
