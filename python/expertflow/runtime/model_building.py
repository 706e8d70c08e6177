"""Building the model of a checkpoint's config without its weights, for ``from_pretrained``:
the config read offline, the dtype chosen, every parameter on the meta device, and the
checkpoint's generation settings (``generation_config.json``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

__all__ = ["build_model", "model_dtype", "read_config", "read_generation_config"]


@contextlib.contextmanager
def _parameters_on_meta():
    """Module construction with every parameter on the meta device (no memory, no init) while
    buffers (rotary tables and the like, computed at construction) stay real."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def model_dtype(dtype, config, path: Path) -> torch.dtype:
    """``dtype`` (a floating torch.dtype or its name), else (None or ``"auto"``, as transformers
    reads it) the config's, else float32."""
    source = "dtype"
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        dtype = getattr(config, "dtype", None) or torch.float32
        source = f"the dtype in {path / 'config.json'}"
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if dtype not in _FLOAT_DTYPES:
        names = [str(d).removeprefix("torch.") for d in _FLOAT_DTYPES]
        raise ValueError(
            f"from_pretrained: {source} must be a floating torch.dtype or its name "
            f"({', '.join(names)}), got {dtype!r}"
        )
    return dtype


def read_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    # Any failure: transformers raises OSError, ValueError, AttributeError (an unknown dtype
    # name) or huggingface_hub's validation errors (a field of the wrong type).
    except Exception as exc:
        raise ValueError(
            f"from_pretrained: {path / 'config.json'} is not a usable transformers config "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def build_model(config, dtype: torch.dtype, path: Path) -> nn.Module:
    """The model of ``config`` with its parameters on the meta device."""
    from transformers import AutoModelForCausalLM

    try:
        with _parameters_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # a config transformers reads but cannot build a model from
        raise ValueError(
            f"from_pretrained: no model can be built from {path / 'config.json'} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    return model.eval()


def read_generation_config(path: Path):
    """The checkpoint's ``generation_config.json`` (EOS ids, sampling defaults), or None when
    it has none: a chat must stop at every EOS id the checkpoint names (Qwen3: two)."""
    from transformers import GenerationConfig

    if not (path / "generation_config.json").is_file():
        return None
    try:
        return GenerationConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # OSError, ValueError, JSON errors: a damaged file
        raise ValueError(
            f"from_pretrained: {path / 'generation_config.json'} is not a usable generation "
            f"config ({type(exc).__name__}: {exc})"
        ) from exc
