"""What ``expertflow.ops.cpu_expert`` needs to run one expert of a transformers experts module:
the family's activation, and an expert's tensors in the op's argument form."""

from __future__ import annotations

import torch
from torch import nn

from expertflow import ops

__all__ = ["CpuExpertSpec", "cpu_expert_spec"]

# transformers activation classes (by name: transformers is optional) -> the op's activation.
_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "GELU": "gelu",
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu",
    "ReLUSquaredActivation": "relu2",
}
_GATED = ("silu", "gelu", "gelu_tanh")


def _act_name(name: str, module: nn.Module) -> str:
    act = getattr(module, "act_fn", None)
    kind = _ACTIVATIONS.get(type(act).__name__)
    if kind == "gelu" and getattr(act, "approximate", "none") == "tanh":
        kind = "gelu_tanh"
    if kind == "gelu" and getattr(act, "act", None) not in (None, torch.nn.functional.gelu):
        kind = None  # a python variant: not known to be the erf form
    if kind is None:
        raise ValueError(
            f"cpu_expert: the activation {type(act).__name__} of {name} "
            f"({type(module).__name__}) has no native CPU kernel (supported: "
            f"{', '.join(sorted(_ACTIVATIONS))})"
        )
    return kind


class CpuExpertSpec:
    """How one experts module's experts run on the CPU.

    Attributes:
        activation: the op's activation name.
        alpha, limit: GPT-OSS's clamped SwiGLU parameters (unused by the others).
        transposed: float weights are stored ``[in, out]``.
        has_bias: the expert's tensors include the two biases.
    """

    def __init__(self, activation: str, alpha: float, limit: float, transposed: bool, has_bias):
        self.activation = activation
        self.alpha = alpha
        self.limit = limit
        self.transposed = transposed
        self.has_bias = has_bias

    def run(
        self,
        x: torch.Tensor,
        tensors: list[torch.Tensor],
        packing=None,
    ) -> torch.Tensor:
        """One expert over ``x`` ``[tokens, hidden]`` from its store tensors (packed by
        ``packing``, an ExpertPacking, or the module's own float tensors when None)."""
        codec = None if packing is None else packing.codec
        fmt = "float" if codec is None else codec.name.split(" ")[0]
        if codec is None:
            ranges = [range(i, i + 1) for i in range(len(tensors))]
        else:
            ranges = packing.part_ranges()
        groups = [[tensors[i] for i in r] for r in ranges]
        if self.has_bias:
            up, (up_bias,), down, (down_bias,) = groups
        else:
            (up, down), up_bias, down_bias = groups, None, None
        block = getattr(codec, "block", (128, 128))
        return ops.cpu_expert(
            x,
            up,
            down,
            up_bias=up_bias,
            down_bias=down_bias,
            format=fmt,
            activation=self.activation,
            transposed=self.transposed and codec is None,
            alpha=self.alpha,
            limit=self.limit,
            fp8_block=block,
        )


def cpu_expert_spec(name: str, module: nn.Module) -> CpuExpertSpec:
    """The CPU expert spec of a transformers experts module (``use_experts_implementation``):
    GPT-OSS's own ``_apply_gate`` is its clamped SwiGLU; other gated families use the default
    ``act_fn(gate) * up`` over the two halves; ungated ones ``act_fn(up)``.

    Raises:
        ValueError: an activation or gating without a native kernel, naming the module.
    """
    gate = getattr(type(module), "_apply_gate", None)
    # The class that defines the gating in use (the default one is set on the family's class).
    owner = next((c.__name__ for c in type(module).__mro__ if "_apply_gate" in vars(c)), "")
    alpha, limit = 1.702, 7.0
    if not module.has_gate:
        activation = _act_name(name, module)
    elif owner == "GptOssExperts":
        activation, alpha, limit = "gpt_oss", float(module.alpha), float(module.limit)
    elif getattr(gate, "__name__", "") == "_default_apply_gate":
        kind = _act_name(name, module)
        if kind not in _GATED:
            raise ValueError(f"cpu_expert: no gated {kind} kernel for {name}")
        activation = f"{kind}_gated"
    else:
        raise ValueError(
            f"cpu_expert: {name} ({type(module).__name__}) gates with its own {owner}._apply_gate, "
            "which has no native CPU kernel"
        )
    assert activation in ops.CPU_EXPERT_ACTIVATIONS
    return CpuExpertSpec(
        activation, alpha, limit, bool(module.is_transposed), bool(module.has_bias)
    )
