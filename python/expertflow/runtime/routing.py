"""The one place that reads a routed MoE layer's call: which modules receive the routers'
choices, what a call to them carries, and the router beside them.

Transformers' experts modules are called as ``experts(hidden_states, top_k_index,
top_k_weights)``, positionally or by keyword; :class:`~expertflow.runtime.offloaded.
OffloadedExperts` keeps that signature. Hooks that record, tap or prefetch read it here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from expertflow.runtime.experts import find_experts_modules
from expertflow.runtime.offloaded import OffloadedExperts

__all__ = [
    "RoutedCall",
    "hook_routed_calls",
    "routed_call",
    "routed_modules",
    "router_of",
    "routers_beside",
]


@dataclass(frozen=True)
class RoutedCall:
    """One call of an experts module: ``hidden_states [tokens, hidden]``, ``top_k_index
    [tokens, top_k]`` (expert ids) and ``top_k_weights [tokens, top_k]``."""

    hidden_states: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor


_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def routed_call(args: tuple, kwargs: dict) -> RoutedCall:
    """The arguments of an experts module's forward, given positionally or by keyword."""
    values = [kwargs[n] if n in kwargs else args[i] for i, n in enumerate(_ARGS)]
    return RoutedCall(*values)


def routed_modules(model: nn.Module) -> list[nn.Module]:
    """The modules that receive the routers' choices, in layer order: transformers experts
    modules, or OffloadedExperts where the model was offloaded."""
    offloaded = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    return offloaded or [m for _, m in find_experts_modules(model)]


def hook_routed_calls(
    modules: list[nn.Module],
    on_call: Callable[[int, RoutedCall], None],
    only_this_thread: bool = False,
) -> list[torch.utils.hooks.RemovableHandle]:
    """Calls ``on_call(layer, call)`` before each module's forward; returns the hook handles.

    With ``only_this_thread``, only calls made by the calling thread are passed on: another
    thread's forward on the same model runs the same modules, and a recorder or tap must not
    mix its routing with its own.
    """
    owner = threading.get_ident()

    def hook_for(layer: int):
        def hook(module, args, kwargs):
            if not only_this_thread or threading.get_ident() == owner:
                on_call(layer, routed_call(args, kwargs))

        return hook

    return [
        module.register_forward_pre_hook(hook_for(layer), with_kwargs=True)
        for layer, module in enumerate(modules)
    ]


def router_of(block: nn.Module, name: str) -> nn.Module:
    """The router beside an experts module: transformers' MoE blocks call it ``gate`` or
    ``router``, and it returns ``(logits, top_k_weights, top_k_index)``."""
    for attr in ("gate", "router"):
        router = getattr(block, attr, None)
        if isinstance(router, nn.Module):
            return router
    raise ValueError(f"lookahead: no router ('gate' or 'router') beside the experts in {name!r}")


def routers_beside(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module]:
    """The router of each routed module's parent block, in the modules' order."""
    names = {id(m): n for n, m in model.named_modules()}
    routers = []
    for module in modules:
        parent_name = names[id(module)].rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        routers.append(router_of(parent, parent_name))
    return routers
