"""The one benchmark timer: warm-up, then the median of repeated timed runs.

CPU work is timed with perf_counter; CUDA work with CUDA events on the current stream, after
a synchronisation, so the figure is device time, not launch time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_seconds(
    fn: Callable[[], object],
    device: str,
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_seconds: float = 0.2,
) -> float:
    """Median wall time of ``fn()`` on ``device`` in seconds.

    Runs ``warmup`` untimed calls, then at least ``repeats`` timed ones and at least
    ``min_seconds`` of them in total.
    """
    for _ in range(warmup):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - start_all < min_seconds:
        if device == "cuda":
            begin = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        if len(samples) >= 10 * repeats:
            break
    return statistics.median(samples)


def device_copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Measured memory bandwidth ceiling in bytes/s: a device-to-device copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, warmup=3, repeats=10)
    return 2 * nbytes / seconds
