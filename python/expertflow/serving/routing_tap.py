"""The routing a forward call took, read from hooks on the model's MoE layers."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from expertflow.runtime.routing import RoutedCall, hook_routed_calls, routed_modules


class _RoutingTap:
    """Hooks on the model's MoE layers keeping each layer's ``top_k_index`` of the last call.

    Only calls made by the thread that entered the tap are kept: another thread's forward on
    the same model (another :func:`~expertflow.serving.generation.generate_batch`) runs the
    same modules, and its routing must not replace this thread's between its forward call and
    :meth:`routing`.
    """

    def __init__(self, model: nn.Module):
        self.modules = routed_modules(model)
        if not self.modules:
            raise ValueError(
                f"generate_batch: {type(model).__name__} has no MoE experts module that "
                "expertflow supports"
            )
        self._index: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = []

    @property
    def num_experts(self) -> int:
        return self.modules[0].num_experts

    def __enter__(self) -> _RoutingTap:
        def keep(layer: int, call: RoutedCall) -> None:
            self._index[layer] = call.top_k_index.detach()

        self._handles = hook_routed_calls(self.modules, keep, only_this_thread=True)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def clear(self) -> None:
        self._index = [None] * len(self.modules)

    def routing(self) -> np.ndarray:
        """``[tokens, L, K]`` expert ids of the last forward call."""
        return torch.stack(self._index, dim=1).cpu().numpy()
