"""The options ``offload`` and ``from_pretrained`` share, validated in one place."""

from __future__ import annotations

import dataclasses
import math
import operator
import os
import re

import torch

from expertflow._extension import check_cuda_device
from expertflow.runtime.expert_format import EXPERT_FORMATS
from expertflow.runtime.hybrid import check_rates
from expertflow.runtime.policies import BUDGETS, POLICIES

__all__ = ["OffloadOptions", "parse_bytes"]

_UNITS = {
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


_BYTES = (
    "a positive number of bytes: an int (or a whole float such as 1.5e9), or a str like "
    "'24GiB', '500 MB' or '1.5e9'"
)


def parse_bytes(value: int | float | str) -> int:
    """``gpu_memory`` as bytes: an int, a whole float (``1.5e9``), or a string such as
    ``"24GiB"``, ``"500 MB"`` or ``"1.5e9"`` (rounded down to whole bytes)."""
    if isinstance(value, str):
        match = re.fullmatch(
            r"\s*((?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)\s*([KMGT]i?B|B)?\s*", value, re.IGNORECASE
        )
        number = match and float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()]
        if not number or not math.isfinite(number) or number < 1:
            raise ValueError(f"gpu_memory must be {_BYTES}, got {value!r}")
        return int(number)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"gpu_memory must be {_BYTES}, got {_short(value)}")
    # A float must be a whole number of bytes: 1.5 bytes, inf or nan are mistakes, not budgets.
    whole = isinstance(value, int) or (math.isfinite(value) and value == int(value))
    if not whole or value <= 0:
        raise ValueError(f"gpu_memory must be {_BYTES}, got {value!r}")
    return int(value)


def _short(value) -> str:
    """The type and a bounded repr of a refused value (a model or tensor prints at length)."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _positive_int(value, name: str) -> int:
    """``value`` as an int >= 1: an int type, never a float or bool (which would be truncated
    or read as 1 silently) nor a str."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive int, got {_short(value)}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive int, got {number}")
    return number


def _check_predictor(predictor) -> None:
    from expertflow.prediction import Predictor

    if predictor is None or isinstance(predictor, Predictor | str | os.PathLike):
        return
    raise ValueError(
        "predictor must be an expertflow.prediction.Predictor or the folder of a saved one "
        f"(a str or path), got {_short(predictor)}"
    )


# Where an offloaded model computes its experts (OffloadOptions.cpu_experts).
CPU_EXPERTS: tuple[str, ...] = ("never", "always", "auto")


@dataclasses.dataclass
class OffloadOptions:
    """How a model is offloaded (the keyword arguments of :func:`expertflow.offload`).

    Attributes:
        device: where the model runs.
        slots: total device slots for experts (exclusive with ``gpu_memory``).
        gpu_memory: a total budget ("24GiB" or bytes); slots are what remains after the
            resident weights, divided by the slot size.
        policy: one of :data:`expertflow.runtime.policies.POLICIES`.
        budget: ``"per_layer"`` or ``"global"`` slot pools.
        predictor: a :class:`~expertflow.prediction.Predictor` or the folder of a saved one.
        lookahead: also prefetch what each layer's router picks one layer early.
        background: run the predictor on a worker thread.
        prefetch_threshold: copy ahead only predicted experts scored at least this.
        expert_format: how experts are kept in the host store and copied, one of
            :data:`~expertflow.runtime.expert_format.EXPERT_FORMATS`.
        group_size: int4's group size (None: the default, or the largest that divides a
            weight's input size).
        cpu_experts: ``"never"`` (every expert runs from a slot), ``"always"`` (every
            expert computed on the CPU from the host store by ``ops.cpu_expert``; the slots
            are not used) or ``"auto"`` (each miss copied or computed on the CPU, as the
            native HybridPolicy decides).
        hybrid_rates: ``"auto"``'s rates, a dict of ``link_gbps``, ``cpu_gbps`` and
            ``cpu_gflops`` (None: measured at offload).
    """

    device: str | torch.device = "cuda"
    slots: int | None = None
    gpu_memory: int | str | None = None
    policy: str = "expertflow"
    budget: str = "per_layer"
    predictor: object = None
    lookahead: bool = False
    background: bool = False
    prefetch_threshold: float = 0.0
    expert_format: str = "auto"
    group_size: int | None = None
    cpu_experts: str = "never"
    hybrid_rates: dict | None = None

    def __post_init__(self):
        if (self.slots is None) == (self.gpu_memory is None):
            raise ValueError("offload: give exactly one of slots and gpu_memory")
        if self.slots is not None:
            self.slots = _positive_int(self.slots, "slots")
        else:
            parse_bytes(self.gpu_memory)  # refused here, before any work on the model
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        t = self.prefetch_threshold
        number = isinstance(t, int | float) and not isinstance(t, bool)
        if not (number and math.isfinite(t) and t >= 0):
            raise ValueError(f"prefetch_threshold must be a finite number >= 0, got {t!r}")
        for name in ("lookahead", "background"):  # a str such as "no" would read as True
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        _check_predictor(self.predictor)
        if self.expert_format not in EXPERT_FORMATS:
            raise ValueError(
                f"expert_format must be one of {EXPERT_FORMATS}, got {_short(self.expert_format)}"
            )
        if self.cpu_experts not in CPU_EXPERTS:
            raise ValueError(
                f"cpu_experts must be one of {CPU_EXPERTS}, got {_short(self.cpu_experts)}"
            )
        self.hybrid_rates = check_rates(self.hybrid_rates)
        if self.hybrid_rates is not None and self.cpu_experts != "auto":
            raise ValueError(
                f"hybrid_rates are read by cpu_experts='auto' only, got cpu_experts="
                f"{self.cpu_experts!r}"
            )
        if self.group_size is not None:
            self.group_size = _positive_int(self.group_size, "group_size")
            if self.expert_format != "int4":
                raise ValueError(
                    f"group_size applies to expert_format='int4' only, got expert_format="
                    f"{self.expert_format!r}"
                )
        try:
            self.device = torch.device(self.device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(
                f"device must be a torch.device or a str such as 'cuda', 'cuda:1' or 'cpu', "
                f"got {self.device!r}"
            ) from exc
        # A GPU the kernels were not built for fails here, with how to rebuild, not at the
        # first op deep inside a forward pass.
        check_cuda_device(self.device)

    @property
    def prefetching(self) -> bool:
        """Whether anything prefetches: a predictor, gate lookahead or both."""
        return self.predictor is not None or self.lookahead
