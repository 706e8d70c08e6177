"""``offload(..., cpu_experts="auto")``: the rates the native HybridPolicy decides from, given or
measured at offload (a short calibration on layer 0's first expert), once per kind of expert
in a process."""

from __future__ import annotations

import math
import time
import warnings

import torch

__all__ = ["RATE_NAMES", "calibrate", "check_rates", "forget_calibrations", "hybrid_policy"]

# hybrid_rates' keys: link GB/s, CPU GB/s at one token, CPU GFLOP/s at many tokens; and,
# optional, the device's GB/s using a cached expert at one token (0: not modelled).
RATE_NAMES = ("link_gbps", "cpu_gbps", "cpu_gflops")
OPTIONAL_RATE = "device_gbps"
_CALIBRATION_TOKENS = 16


def check_rates(rates) -> dict | None:
    """``hybrid_rates`` as a dict of the three positive finite rates and ``device_gbps``
    (finite, >= 0; 0 when not given), or None (calibrate)."""
    if rates is None:
        return None
    keys = set(rates) if isinstance(rates, dict) else set()
    if not isinstance(rates, dict) or not set(RATE_NAMES) <= keys <= {*RATE_NAMES, OPTIONAL_RATE}:
        raise ValueError(
            f"hybrid_rates must be a dict with the keys {RATE_NAMES} and optionally "
            f"{OPTIONAL_RATE!r}, got {rates!r}"
        )
    checked = {}
    for name in (*RATE_NAMES, OPTIONAL_RATE):
        value = rates.get(name, 0.0)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if name == OPTIONAL_RATE and not (number and math.isfinite(value) and value >= 0):
            raise ValueError(
                f"hybrid_rates[{name!r}] must be a finite number >= 0 (0: not modelled), "
                f"got {value!r}"
            )
        if name != OPTIONAL_RATE and not (number and math.isfinite(value) and value > 0):
            raise ValueError(f"hybrid_rates[{name!r}] must be a finite number > 0, got {value!r}")
        checked[name] = float(value)
    return checked


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


def calibrate(module, hidden: int, dtype: torch.dtype) -> dict:
    """Measures, best of 3 each, on layer 0's first expert of ``module`` (an OffloadedExperts):
    the link (the expert copied into destinations allocated once, as a slot is), the device
    (the expert used from there at one token: expanded if packed, then run), and the CPU (the
    same expert computed by ``ops.cpu_expert`` at 1 and 16 tokens)."""
    if hidden is None or dtype is None:
        raise ValueError("the model has no config.hidden_size or no float parameter")
    cache, spec, packing = module.cache, module._cpu, module.packing
    tensors = cache.host_expert(module.layer, 0)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    device = cache.device
    # Timing a fresh allocation instead would count its page faults (on the CPU 0.5-7 GB/s
    # depending on what the process holds), not the copy.
    slots = [torch.empty_like(t, device=device) for t in tensors]

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def copy():
        for dst, src in zip(slots, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
        synchronize()

    token = torch.randn(1, hidden, dtype=dtype, device=device)

    def use():
        module._run_expert(token, slots if packing is None else packing.unpack(slots))
        synchronize()

    one = torch.randn(1, hidden, dtype=dtype)
    many = torch.randn(_CALIBRATION_TOKENS, hidden, dtype=dtype)
    for warm in (copy, use, lambda: spec.run(one, tensors, packing)):
        warm()  # first touches: destinations, kernels, scratch
    link_ms, device_ms = _best_ms(copy), _best_ms(use)
    cpu_ms = _best_ms(lambda: spec.run(one, tensors, packing))
    many_ms = _best_ms(lambda: spec.run(many, tensors, packing))
    flops = 2.0 * expert_params(tensors) * _CALIBRATION_TOKENS
    return check_rates(
        {
            "link_gbps": nbytes / (max(link_ms, 1e-6) * 1e6),
            "cpu_gbps": nbytes / (max(cpu_ms, 1e-6) * 1e6),
            "cpu_gflops": flops / (max(many_ms, 1e-6) * 1e6),
            "device_gbps": nbytes / (max(device_ms, 1e-6) * 1e6),
        }
    )


# Rates measured in this process, by what they depend on: offloading the same kind of model
# again (after restore(), or another copy) reuses them instead of timing again.
_measured: dict[tuple, dict] = {}


def _calibration_key(module, hidden, dtype) -> tuple:
    tensors = module.cache.host_expert(module.layer, 0)
    layout = tuple((tuple(t.shape), t.dtype) for t in tensors)
    fmt = None if module.packing is None else module.packing.format_name
    return (str(module.cache.device), layout, fmt, module._cpu.activation, hidden, dtype)


def forget_calibrations() -> None:
    """Drops the rates measured so far: the next ``offload(cpu_experts="auto")`` without
    ``hybrid_rates`` measures again (after the machine's load changed, say)."""
    _measured.clear()


def hybrid_policy(module, hidden, dtype, rates: dict | None):
    """The native HybridPolicy from ``rates``, or measured on ``module`` (an OffloadedExperts);
    None (with a warning: no figure is invented) when the calibration fails, and the model
    then copies every miss."""
    from expertflow import _C

    if rates is None:
        key = _calibration_key(module, hidden, dtype)
        try:
            rates = _measured.get(key) or calibrate(module, hidden, dtype)
        except Exception as exc:  # noqa: BLE001  (any failure: fall back, saying why)
            warnings.warn(
                f"offload: cpu_experts='auto' could not measure the link and CPU rates ({exc}); "
                "falling back to cpu_experts='never'",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        _measured[key] = rates
    return _C.HybridPolicy(
        rates["link_gbps"], rates["cpu_gbps"], rates["cpu_gflops"],
        device_gbps=rates["device_gbps"],
    )  # fmt: skip
