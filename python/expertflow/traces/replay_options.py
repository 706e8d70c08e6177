"""What :func:`~expertflow.traces.replay.replay` refuses rather than misread.

Every check names the argument the way the caller typed it: ``spell`` maps a keyword of
``replay()`` (``slots_per_layer``) to its spelling, the command line's being its option
(``--slots-per-layer``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from expertflow.runtime.policies import POLICIES
from expertflow.traces.format import Trace

__all__ = [
    "CPU_EXPERTS",
    "PREDICTION_POLICIES",
    "check_expert_bytes",
    "check_options",
    "clamp_budget",
    "option_spelling",
]

# The policies that read predicted scores (predictions, lookahead, reuse, the prefetch
# threshold, the score weight); every other policy would silently ignore them.
PREDICTION_POLICIES: tuple[str, ...] = ("expertflow",)

# Where the timing model runs a missed expert (with cpu_gbps): always copied to a slot
# (today's runtime), always computed on the host CPU (Fiddler-like), or per miss by the
# native HybridPolicy (csrc/core/hybrid_policy.h).
CPU_EXPERTS: tuple[str, ...] = ("never", "always", "auto")

Spell = Callable[[str], str]


def option_spelling(name: str) -> str:
    """A keyword of ``replay()`` as the command line's option: ``--slots-per-layer``."""
    return "--" + name.replace("_", "-")


def check_options(
    trace: Trace,
    policy: str,
    *,
    slots_per_layer: int | None = None,
    slots: int | None = None,
    predictions: object | None = None,
    lookahead: object | None = None,
    reuse: object | None = None,
    prefetch: bool = True,
    prefetch_threshold: float | None = None,
    score_weight: float | None = None,
    bandwidth_gbps: float | None = None,
    layer_compute_ms: float | None = None,
    expert_bytes: int | None = None,
    cpu_gbps: float | None = None,
    cpu_gflops: float | None = None,
    cpu_experts: str | None = None,
    spell: Spell = str,
) -> None:
    """Raises ValueError, naming the argument (as ``spell`` writes it), for every option
    ``replay()`` would otherwise misread or silently ignore. None means "not given"; the score
    arrays are only tested for being given (their shapes are checked by ``replay()``)."""
    if policy not in POLICIES:
        raise ValueError(f"{spell('policy')} must be one of {POLICIES}, got {policy!r}")
    _check_budget(trace, slots_per_layer, slots, spell)
    _check_prediction_options(
        policy,
        {
            "predictions": predictions,
            "lookahead": lookahead,
            "reuse": reuse,
            "prefetch_threshold": prefetch_threshold,
            "score_weight": score_weight,
        },
        prefetch,
        spell,
    )
    _check_timing(bandwidth_gbps, layer_compute_ms, spell)
    check_expert_bytes(expert_bytes, spell)
    check_cpu_options(bandwidth_gbps, cpu_gbps, cpu_gflops, cpu_experts, spell)


def check_cpu_options(bandwidth_gbps, cpu_gbps, cpu_gflops, cpu_experts, spell: Spell = str):
    """Refuses a CPU-expert model that is half given, or rates that are not positive finite
    numbers (None: not given)."""
    for name, value in (("cpu_gbps", cpu_gbps), ("cpu_gflops", cpu_gflops)):
        if value is None:
            continue
        if not _is_number(value) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{spell(name)} must be a finite number > 0, got {value!r}")
    if cpu_experts is not None and cpu_experts not in CPU_EXPERTS:
        raise ValueError(
            f"{spell('cpu_experts')} must be one of {CPU_EXPERTS}, got {cpu_experts!r}"
        )
    if cpu_gbps is None:
        if cpu_gflops is not None:
            raise ValueError(
                f"{spell('cpu_gflops')} is the CPU model's token term: give {spell('cpu_gbps')} too"
            )
        if cpu_experts is not None and cpu_experts != "never":
            raise ValueError(
                f"{spell('cpu_experts')} {cpu_experts} needs a CPU to model: give "
                f"{spell('cpu_gbps')}"
            )
        return
    if bandwidth_gbps is None:
        raise ValueError(
            f"{spell('cpu_gbps')} is part of the timing model: give {spell('bandwidth_gbps')} and "
            f"{spell('layer_compute_ms')} too"
        )


def _is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_expert_bytes(expert_bytes, spell: Spell = str) -> None:
    """Refuses an expert size that is not a positive integer (None: the trace's own size)."""
    if expert_bytes is None:
        return
    if not _is_int(expert_bytes) or expert_bytes < 1:
        raise ValueError(
            f"{spell('expert_bytes')} must be a positive integer (the bytes of one expert, e.g. "
            f"its packed size in a quantized format), got {expert_bytes!r}"
        )


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_budget(trace: Trace, slots_per_layer, slots, spell: Spell) -> None:
    """Refuses a budget no layer could run in (the per-layer minimum stated per layer; the
    global one, top_k, is the native core's to check: "num_slots must be at least ...")."""
    if (slots_per_layer is None) == (slots is None):
        raise ValueError(f"give exactly one of {spell('slots_per_layer')} and {spell('slots')}")
    name, value = _budget(slots_per_layer, slots)
    if not _is_int(value):
        raise ValueError(f"{spell(name)} must be an integer, got {value!r}")
    if slots_per_layer is not None and value < trace.top_k:
        raise ValueError(
            f"{spell(name)} must be at least top_k={trace.top_k} (one token's experts at one "
            f"layer), got {value}"
        )


def _budget(slots_per_layer, slots) -> tuple[str, int]:
    return ("slots_per_layer", slots_per_layer) if slots_per_layer is not None else ("slots", slots)


def clamp_budget(
    trace: Trace, slots_per_layer: int | None, slots: int | None, spell: Spell = str
) -> tuple[int | None, int | None, str | None]:
    """``(slots_per_layer, slots, note)``: a budget above what can ever be used (a layer's pool
    beyond num_experts, a global one beyond num_layers x num_experts) cut to it, with a note
    saying so (None when nothing was cut). Clamped, not refused: such a pool holds every expert
    and never evicts, exactly like the full-size one, so a sweep over budgets stays valid; the
    note keeps the reported size honest."""
    name, value = _budget(slots_per_layer, slots)
    per_layer = slots_per_layer is not None
    cap = trace.num_experts if per_layer else trace.num_layers * trace.num_experts
    if value <= cap:
        return slots_per_layer, slots, None
    what = (
        f"num_experts={cap}"
        if per_layer
        else f"num_layers x num_experts = {trace.num_layers} x {trace.num_experts} = {cap}"
    )
    note = (
        f"{spell(name)} {value} is more than {what}: replayed with {cap}, every expert resident "
        "(a larger pool holds the same experts and moves the same bytes)"
    )
    return (cap, None, note) if per_layer else (None, cap, note)


def _check_prediction_options(policy: str, given: dict, prefetch: bool, spell: Spell) -> None:
    for name, value in given.items():
        if value is not None and policy not in PREDICTION_POLICIES:
            users = " and ".join(repr(p) for p in PREDICTION_POLICIES)
            raise ValueError(
                f"{spell(name)} is read only by the {users} policy; {policy!r} would ignore it"
            )
    threshold = given["prefetch_threshold"]
    if threshold is not None:
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(
                f"{spell('prefetch_threshold')} must be a finite number >= 0, got {threshold}"
            )
        if given["predictions"] is None:
            raise ValueError(
                f"{spell('prefetch_threshold')} filters predicted experts: give "
                f"{spell('predictions')} too (lookahead picks are prefetched without it)"
            )
    if given["reuse"] is not None and given["predictions"] is None:
        raise ValueError(f"reuse scores come with predictions: give {spell('predictions')} too")
    if not prefetch and given["predictions"] is None and given["lookahead"] is None:
        raise ValueError(
            "prefetch=False changes nothing without predictions or lookahead scores to prefetch"
        )


def _check_timing(bandwidth_gbps, layer_compute_ms, spell: Spell) -> None:
    if bandwidth_gbps is None and layer_compute_ms is None:
        return
    if bandwidth_gbps is None or layer_compute_ms is None:
        missing = "bandwidth_gbps" if bandwidth_gbps is None else "layer_compute_ms"
        raise ValueError(
            f"the timing model needs both {spell('bandwidth_gbps')} and "
            f"{spell('layer_compute_ms')}: {spell(missing)} is missing"
        )
    if not (math.isfinite(bandwidth_gbps) and bandwidth_gbps > 0):
        raise ValueError(
            f"{spell('bandwidth_gbps')} must be a finite number > 0, got {bandwidth_gbps}"
        )
    if not (math.isfinite(layer_compute_ms) and layer_compute_ms >= 0):
        raise ValueError(
            f"{spell('layer_compute_ms')} must be a finite number >= 0, got {layer_compute_ms}"
        )
