"""``offload(..., cpu_experts="auto")``: the rates the native HybridPolicy decides from, given or
measured once at offload (a short calibration on layer 0's first expert)."""

from __future__ import annotations

import math
import time
import warnings

import torch

__all__ = ["RATE_NAMES", "calibrate", "check_rates", "hybrid_policy"]

# hybrid_rates' keys: link GB/s, CPU GB/s at one token, CPU GFLOP/s at many tokens.
RATE_NAMES = ("link_gbps", "cpu_gbps", "cpu_gflops")
_CALIBRATION_TOKENS = 16


def check_rates(rates) -> dict | None:
    """``hybrid_rates`` as a dict of the three positive finite rates (None: calibrate)."""
    if rates is None:
        return None
    if not isinstance(rates, dict) or set(rates) != set(RATE_NAMES):
        raise ValueError(
            f"hybrid_rates must be a dict with exactly the keys {RATE_NAMES}, got {rates!r}"
        )
    for name in RATE_NAMES:
        value = rates[name]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not (number and math.isfinite(value) and value > 0):
            raise ValueError(f"hybrid_rates[{name!r}] must be a finite number > 0, got {value!r}")
    return {name: float(rates[name]) for name in RATE_NAMES}


def expert_params(tensors) -> int:
    """The weights the token term counts: an expert's bytes / 2 (as the replay's model)."""
    return sum(t.numel() * t.element_size() for t in tensors) // 2


def _best_ms(run, repeats: int = 3) -> float:
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - started) * 1e3)
    return best


def calibrate(cache, spec, packing, hidden: int, dtype: torch.dtype) -> dict:
    """Measures the link (layer 0's first expert copied to the cache's device) and the CPU
    (the same expert computed at 1 and 16 tokens by ``ops.cpu_expert``), best of 3 each."""
    if hidden is None or dtype is None:
        raise ValueError("the model has no config.hidden_size or no float parameter")
    tensors = cache.host_expert(0, 0)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    device = cache.device

    def copy():
        out = [torch.empty_like(t, device=device).copy_(t, non_blocking=True) for t in tensors]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    copy()  # first touch of the destination's allocator
    link_ms = _best_ms(copy)
    one = torch.randn(1, hidden, dtype=dtype)
    many = torch.randn(_CALIBRATION_TOKENS, hidden, dtype=dtype)
    spec.run(one, tensors, packing)
    cpu_ms = _best_ms(lambda: spec.run(one, tensors, packing))
    many_ms = _best_ms(lambda: spec.run(many, tensors, packing))
    flops = 2.0 * expert_params(tensors) * _CALIBRATION_TOKENS
    return check_rates(
        {
            "link_gbps": nbytes / (max(link_ms, 1e-6) * 1e6),
            "cpu_gbps": nbytes / (max(cpu_ms, 1e-6) * 1e6),
            "cpu_gflops": flops / (max(many_ms, 1e-6) * 1e6),
        }
    )


def hybrid_policy(cache, spec, packing, hidden, dtype, rates: dict | None):
    """The native HybridPolicy from ``rates``, or measured; None (with a warning: no figure
    is invented) when the calibration fails, and the model then copies every miss."""
    from expertflow import _C

    if rates is None:
        try:
            rates = calibrate(cache, spec, packing, hidden, dtype)
        except Exception as exc:  # noqa: BLE001  (any failure: fall back, saying why)
            warnings.warn(
                f"offload: cpu_experts='auto' could not measure the link and CPU rates ({exc}); "
                "falling back to cpu_experts='never'",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    return _C.HybridPolicy(rates["link_gbps"], rates["cpu_gbps"], rates["cpu_gflops"])
