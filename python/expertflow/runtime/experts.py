"""Finding the routed experts of a transformers MoE model, by structure.

Transformers' shared experts interface (classes decorated with ``use_experts_implementation``)
holds each layer's experts as 3-D ``gate_up_proj``/``up_proj`` and ``down_proj`` stacks with the
``is_transposed``/``has_bias``/``has_gate`` flags. Detection is by those, so a new family using
the same interface needs no code here.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "EXPERT_FLAGS",
    "expert_param_names",
    "expert_tensors",
    "find_experts_modules",
    "offloadable_modules",
]

EXPERT_FLAGS = ("is_transposed", "has_bias", "has_gate")


def _is_experts_module(module: nn.Module) -> bool:
    return all(hasattr(module, f) for f in EXPERT_FLAGS) and isinstance(
        getattr(module, "down_proj", None), nn.Parameter
    )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules of ``model`` in layer order, as (qualified name, module)."""
    return [(name, m) for name, m in model.named_modules() if _is_experts_module(m)]


def expert_param_names(module: nn.Module) -> list[str]:
    """The experts module's per-expert stacks, in the order the host store keeps them."""
    up = "gate_up_proj" if module.has_gate else "up_proj"
    names = [up] + ([f"{up}_bias"] if module.has_bias else []) + ["down_proj"]
    return names + (["down_proj_bias"] if module.has_bias else [])


def expert_tensors(module: nn.Module, expert: int) -> list[torch.Tensor]:
    """One expert's tensors (views of the module's stacks), in the host store's order."""
    return [getattr(module, name)[expert].detach() for name in expert_param_names(module)]


def _check_layout(name: str, module: nn.Module) -> None:
    """Refuses experts modules whose tensors are not the interface's 3-D per-expert stacks."""
    experts = getattr(module, "num_experts", None)
    for attr in expert_param_names(module):
        t = getattr(module, attr, None)
        dims = 2 if attr.endswith("_bias") else 3
        if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] != experts:
            raise ValueError(
                f"offload: unsupported expert layout in {name} ({type(module).__name__}): "
                f"expected {attr} as a {dims}-D tensor with num_experts={experts} rows, got "
                f"{None if not isinstance(t, torch.Tensor) else list(t.shape)}"
            )


_QUANTIZED_SUFFIXES = ("_scale_inv", "_scales", "_blocks", "_scale", "_qweight", "_zeros")


def _refuse_quantized_experts(model: nn.Module) -> None:
    """Refuses experts modules that a quantizer (transformers' FP8 or MXFP4 integration,
    bitsandbytes, ...) already replaced: their codes and scales are not the float stacks the
    interface describes, and reading only the codes would drop the scales."""
    for name, module in model.named_modules():
        tensors = dict(module.named_parameters(recurse=False))
        tensors.update(module.named_buffers(recurse=False))
        down = tensors.get("down_proj")
        packed = [n for n in tensors if n.startswith(("down_proj", "gate_up_proj", "up_proj"))]
        quantized = [n for n in packed if n.endswith(_QUANTIZED_SUFFIXES)]
        if quantized or (down is not None and not down.is_floating_point()):
            raise ValueError(
                f"offload: the experts of {name} ({type(module).__name__}) are already quantized "
                f"(tensors {sorted(packed)}); offload() reads float experts only. Load the "
                "checkpoint with expertflow.from_pretrained(path, expert_format='auto'), which "
                "keeps FP8 and MXFP4 experts as shipped, or load the model unquantized and "
                "pass expert_format='int8' or 'int4'"
            )


MIN_TRANSFORMERS = (5, 0)


def _check_transformers_version() -> None:
    """Older transformers keep experts as a ModuleList of MLPs, which offload cannot read:
    say so rather than "no experts module"."""
    try:
        import transformers
    except ImportError:
        return
    release = transformers.__version__.split("+")[0].split(".")
    try:
        version = tuple(int(part) for part in release[:2])
    except ValueError:
        return  # a development version: let the structural message speak
    if version < MIN_TRANSFORMERS:
        raise ValueError(
            f"offload: transformers {transformers.__version__} is installed; expertflow needs "
            "transformers >= 5.0, whose MoE families share the experts interface offload "
            "reads (pip install 'transformers>=5')"
        )


def offloadable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The experts modules ``offload`` replaces; refuses a model already offloaded, one without
    experts, quantized experts and experts of another layout."""
    if hasattr(model, "_expertflow"):
        raise ValueError("offload: this model is already offloaded; call restore(model) first")
    _refuse_quantized_experts(model)
    found = find_experts_modules(model)
    if not found:
        _check_transformers_version()
        raise ValueError(
            f"offload: {type(model).__name__} has no MoE experts module (looked for modules with "
            f"a 3-D down_proj parameter and the flags {', '.join(EXPERT_FLAGS)}, as transformers' "
            "use_experts_implementation classes have)"
        )
    for name, module in found:
        _check_layout(name, module)
    return found
