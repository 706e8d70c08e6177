"""``expertflow.memory_report``: where an offloaded model's bytes are."""

from __future__ import annotations

import torch
from torch import nn

from expertflow.runtime.state import offload_state

__all__ = ["memory_report"]


def _device_totals(device: torch.device) -> dict | None:
    """Used and total memory of the GPU from NVML, where nvidia-ml-py and a GPU exist. The
    GPU is found by its UUID: NVML numbers every GPU of the machine, CUDA only the visible ones
    (``CUDA_VISIBLE_DEVICES``), so the two indices can differ."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    try:
        uuid = str(torch.cuda.get_device_properties(device).uuid)
        if not uuid.startswith(("GPU-", "MIG-")):  # torch prints the bare UUID
            uuid = f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return {"device_used_bytes": int(info.used), "device_total_bytes": int(info.total)}
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def memory_report(model: nn.Module) -> dict:
    """Where an offloaded model's bytes are, and what the whole model would need on the device.

    Returns:
        ``expert_format`` (how the experts are packed: ``"float"``, ``"int8"``, ...),
        ``resident_bytes`` (non-expert weights, on the device), ``slot_bytes`` (the expert slots,
        each holding one packed expert), ``host_bytes`` (every packed expert, in the host store),
        ``device_bytes`` (resident + slots),
        ``full_model_bytes`` (resident + every expert), ``saving_percent`` (of device memory
        against the whole model on the device) and, on a GPU with nvidia-ml-py installed,
        ``device_used_bytes`` and ``device_total_bytes``.
    """
    state = offload_state(model, "memory_report")
    cache = state.cache
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    resident += sum(b.numel() * b.element_size() for b in model.buffers())
    slots = cache.num_slots * cache.slot_bytes
    full = resident + cache.host_bytes
    report = {
        "expert_format": state.expert_format,
        "resident_bytes": resident,
        "slot_bytes": slots,
        "host_bytes": cache.host_bytes,
        "device_bytes": resident + slots,
        "full_model_bytes": full,
        "saving_percent": 100.0 * (1 - (resident + slots) / full) if full else 0.0,
    }
    report.update(_device_totals(cache.device) or {})
    return report
