"""The options ``offload`` and ``from_pretrained`` share, validated in one place."""

from __future__ import annotations

import dataclasses
import math
import re

import torch

from expertflow._extension import check_cuda_device
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


def parse_bytes(value: int | str) -> int:
    """``gpu_memory`` as bytes: an int, or a string such as ``"24GiB"`` or ``"500 MB"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        raise ValueError(f"gpu_memory must be bytes or like '24GiB', got {value!r}")
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"gpu_memory must be bytes or like '24GiB', got {value!r}")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])


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

    def __post_init__(self):
        if (self.slots is None) == (self.gpu_memory is None):
            raise ValueError("offload: give exactly one of slots and gpu_memory")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        t = self.prefetch_threshold
        number = isinstance(t, int | float) and not isinstance(t, bool)
        if not (number and math.isfinite(t) and t >= 0):
            raise ValueError(f"prefetch_threshold must be a finite number >= 0, got {t!r}")
        self.device = torch.device(self.device)
        # A GPU the kernels were not built for fails here, with how to rebuild, not at the
        # first op deep inside a forward pass.
        check_cuda_device(self.device)

    @property
    def prefetching(self) -> bool:
        """Whether anything prefetches: a predictor, gate lookahead or both."""
        return self.predictor is not None or self.lookahead
