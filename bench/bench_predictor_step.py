"""Cost of one decode step of the path predictor, measured in the same run three ways: the
native decoder on cached window keys/values (the default), the torch network op by op on the
same cache, and the torch network scoring the whole window each step (no cache).

    python bench/bench_predictor_step.py [--steps 200] [--threads 1]

Untrained weights of the demo model's shape (6 layers x 16 experts, vocab 4096, context 64)
at the bundled path predictor's size (d 160, 4 layers, as scripts/demo_assets.sh trains it;
``--d-model``, ``--depth``): the cost does not depend on the weights. Each row's history grows
by one id per step, as in decoding, from 100 prompt ids.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from expertflow.prediction import PathPredictor, multi_hot


def whole_window_step(predictor: PathPredictor, histories, previous) -> np.ndarray:
    """The baseline: each row's whole window run through the stack, as before caching."""
    with torch.no_grad():
        starts = [predictor.window_start(len(h) - 1) for h in histories]
        width = max(len(h) - s for h, s in zip(histories, starts, strict=True))
        ids = torch.zeros((len(histories), width), dtype=torch.long)
        for b, (h, s) in enumerate(zip(histories, starts, strict=True)):
            ids[b, : len(h) - s] = torch.as_tensor(h[s:])
        last = torch.as_tensor([len(h) - s - 1 for h, s in zip(histories, starts, strict=True)])
        x = predictor.net.features(ids)[torch.arange(len(histories)), last]
        before = None
        if predictor.uses_previous:
            hot = multi_hot(np.asarray(previous), predictor.num_experts)
            before = torch.from_numpy(hot.reshape(len(histories), -1))
        return torch.sigmoid(predictor.net.head_logits(x, before)).numpy()


def ms_per_step(step, batch: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    histories = [rng.integers(0, 4096, 100).tolist() for _ in range(batch)]
    previous = rng.integers(0, 16, (batch, 6, 2))
    for _ in range(20):  # warm-up; also fills the cache
        step(histories, previous)
        for h in histories:
            h.append(int(rng.integers(0, 4096)))
    started = time.perf_counter()
    for _ in range(steps):
        step(histories, previous)
        for h in histories:
            h.append(int(rng.integers(0, 4096)))
    return 1e3 * (time.perf_counter() - started) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d-model", type=int, default=160)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"path predictor d {args.d_model}, {args.depth} layers: ms per decode step "
        f"({args.threads} thread(s), {args.steps} steps)"
    )
    print(
        f"{'variant':24s} {'batch':>5s} {'native':>7s} {'torch':>7s} {'torch, whole window':>20s}"
        f" {'native vs torch':>16s}"
    )
    for use_previous in (False, True):
        name = "ids + previous routing" if use_previous else "ids only"
        for batch in (1, 16):
            predictor = PathPredictor(
                6,
                16,
                2,
                vocab_size=4096,
                d_model=args.d_model,
                depth=args.depth,
                use_previous=use_previous,
            )
            native = ms_per_step(predictor.predict_step, batch, args.steps)
            predictor.native = False
            cached = ms_per_step(predictor.predict_step, batch, args.steps)
            whole = ms_per_step(
                lambda h, prev, pr=predictor: whole_window_step(pr, h, prev), batch, args.steps
            )
            print(
                f"{name:24s} {batch:5d} {native:7.3f} {cached:7.3f} {whole:20.3f}"
                f" {cached / native:15.1f}x"
            )


if __name__ == "__main__":
    main()
