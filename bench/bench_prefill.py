"""Prefill of prompts of mixed lengths: one padded forward call per group of similar length,
against one call per distinct length (the only batching that needs no padding).

    python bench/bench_prefill.py [--requests 64] [--min-tokens 16] [--max-tokens 64]
        [--batch-size 16] [--device cpu]

Workload: prompts cut from the held-out text of every corpus domain, interleaved, of lengths
drawn uniformly from ``[--min-tokens, --max-tokens]`` (as real requests come); each request
generates one token, so the run is its prefill. ``generate_batch(prefill_padding=P)`` groups
the prompts a batch admits by length, padding a group by at most P of its real tokens; P = 0
is the baseline (equal lengths only). Prints prefill tokens per second and forward calls for
each P, measured in one run, and checks that every request got the same token whatever P.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from expertflow.demo.model import load_demo_model
from expertflow.serving.generation import generate_batch

sys.path.insert(0, str(Path(__file__).parent))
from bench_generate_batch import default_corpus, mixed_prompts  # noqa: E402

PADDINGS = (0.0, 0.1, 0.25, 0.5)


def count_calls(model) -> list[int]:
    """Appends each forward call's batch size to the returned list."""
    calls: list[int] = []
    model.register_forward_pre_hook(
        lambda m, a, k: calls.append(int(k["input_ids"].shape[0])), with_kwargs=True
    )
    return calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(default_corpus()))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs each")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    model, tokenizer = load_demo_model()
    model.to(args.device)
    long = mixed_prompts(args.corpus, tokenizer, args.requests, args.max_tokens)
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_tokens, args.max_tokens + 1, len(long))
    prompts = [p[:n] for p, n in zip(long, lengths.tolist(), strict=True)]
    real = sum(len(p) for p in prompts)
    calls = count_calls(model)
    kw = dict(max_new_tokens=1, batch_size=args.batch_size)
    generate_batch(model, prompts[: args.batch_size], **kw)  # first-use costs, unmeasured
    print(
        f"{len(prompts)} prompts of {args.min_tokens}-{args.max_tokens} tokens ({real} in all), "
        f"batches of {args.batch_size}, demo model on {args.device}, best of {args.repeats}"
    )
    print(f"{'prefill_padding':>15s} {'forward calls':>14s} {'padded tokens':>14s} "
          f"{'prefill s':>10s} {'tokens/s':>9s} {'vs 0':>7s}")  # fmt: skip
    first, baseline = None, None
    for padding in PADDINGS:
        best = None
        for _ in range(args.repeats):
            calls.clear()
            out = generate_batch(model, prompts, prefill_padding=padding, **kw)
            seconds = out.stats["prefill_seconds"]
            best = seconds if best is None else min(best, seconds)
        if first is None:
            first, baseline = out.sequences, best
        elif out.sequences != first:
            print(f"prefill_padding {padding}: a request's token changed", file=sys.stderr)
            return 1
        padded = out.stats["prefill_tokens"] - real
        print(
            f"{padding:15.2f} {len(calls):14d} {padded:14d} {best:10.3f} "
            f"{real / best:9.0f} {baseline / best:6.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
