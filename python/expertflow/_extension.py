"""Loading of the native extension ``expertflow._C`` and the facts of its build."""

from __future__ import annotations

import importlib
import re
from types import ModuleType
from typing import Any

import torch

_REBUILD_HINT = (
    "Rebuild expertflow against the installed torch: "
    "pip install --no-build-isolation --force-reinstall --no-deps <path to expertflow>"
)


def _check_torch_matches(built_version: str) -> None:
    """Raises ImportError when the running torch is not the one _C was compiled against.

    The C++ ABI of torch changes between releases and between CUDA and CPU builds, so a mismatch
    fails later with an obscure undefined-symbol error or worse; refuse it up front.
    """
    running = torch.__version__
    if running != built_version:
        raise ImportError(
            f"expertflow was built against torch {built_version} but torch {running} is "
            f"installed. {_REBUILD_HINT}"
        )


def load_extension() -> ModuleType:
    """Imports expertflow._C after checking it matches the installed torch."""
    try:
        build = importlib.import_module("expertflow._build_info")
    except ImportError as exc:
        raise ImportError(
            "expertflow's native extension is not built (expertflow/_build_info.py is missing). "
            "Install the package with: pip install --no-build-isolation ."
        ) from exc
    _check_torch_matches(build.TORCH_VERSION)
    return importlib.import_module("expertflow._C")


def build_info() -> dict[str, Any]:
    """What the native extension was built with.

    Returns:
        A dict with ``torch_version`` (the torch it was compiled against), ``cuda_kernels``
        (whether CUDA kernels are compiled in), ``cuda_version`` (nvcc's, or ""),
        ``cuda_arch_list`` (list of TORCH_CUDA_ARCH_LIST entries, empty without CUDA),
        ``cuda_disabled_reason`` (why CUDA kernels are absent, e.g. an nvcc that does not match
        torch's CUDA; "" with them), ``git_revision`` (of the source tree at configure time,
        "unknown" outside git) and ``cxx_standard`` (the ``__cplusplus`` value).
    """
    from expertflow import _C, _build_info

    info = dict(_C.build_info())
    arch = info["cuda_arch_list"].replace(" ", ";")
    info["cuda_arch_list"] = [a for a in arch.split(";") if a]
    info["cuda_disabled_reason"] = getattr(_build_info, "CUDA_DISABLED_REASON", "")
    return info


_ARCH_ENTRY = re.compile(r"^(\d+)\.(\d+)([af]?)(\+PTX)?$")


def arch_list_supports(arch_list: list[str], capability: tuple[int, int]) -> bool:
    """Whether a build for ``arch_list`` has code that runs on a GPU of ``capability``.

    The rule of CUDA's binary compatibility: SASS for ``X.Y`` runs on ``X.Z`` with ``Z >= Y``
    (same major); PTX (``+PTX``) for ``X.Y`` is JIT-compiled for any GPU ``>= X.Y``. An ``a``
    suffix (``9.0a``, arch-specific features) runs on ``X.Y`` only; an ``f`` suffix
    (``10.0f``, family-specific) on ``X.Z`` with ``Z >= Y``, as SASS or PTX.

    Args:
        arch_list: TORCH_CUDA_ARCH_LIST entries, e.g. ``["8.0", "9.0a", "12.0+PTX"]``.
        capability: the device's compute capability ``(major, minor)``, e.g. ``(8, 9)``.

    Raises:
        ValueError: an entry is not like ``9.0``, ``9.0a`` or ``12.0+PTX``.
    """
    major, minor = capability
    for entry in arch_list:
        match = _ARCH_ENTRY.match(entry.strip())
        if match is None:
            raise ValueError(f"CUDA arch entry {entry!r} is not like '9.0', '9.0a' or '12.0+PTX'")
        arch = (int(match[1]), int(match[2]))
        suffix, ptx = match[3], bool(match[4])
        if suffix == "a":
            runs = arch == (major, minor)
        elif ptx and not suffix:
            runs = arch <= (major, minor)
        else:
            runs = arch[0] == major and arch[1] <= minor
        if runs:
            return True
    return False


def check_cuda_device(
    device: str | int | torch.device | None = "cuda",
    *,
    capability: tuple[int, int] | None = None,
) -> None:
    """Refuses, with the fix, a CUDA device that expertflow's build cannot run kernels on.

    Does nothing for a non-CUDA ``device``. Otherwise raises when the extension has no CUDA
    kernels (saying why, from :func:`build_info`'s ``cuda_disabled_reason``), when torch sees no
    CUDA device, or when no entry of the build's arch list runs on the device
    (:func:`arch_list_supports`). Initialises CUDA only to read the device's capability.

    Args:
        device: the device a model is to run on, e.g. ``"cuda"``, ``"cuda:1"``, ``1`` or
            ``torch.device("cpu")``; ``None`` means the current CUDA device.
        capability: the device's ``(major, minor)`` instead of asking the GPU (for tests).

    Raises:
        RuntimeError: the device cannot run expertflow's CUDA kernels; the message says how to
            rebuild.
    """
    dev = torch.device("cuda") if device is None else torch.device(device)
    if dev.type != "cuda":
        return
    info = build_info()
    if not info["cuda_kernels"]:
        reason = info["cuda_disabled_reason"] or "reason not recorded"
        raise RuntimeError(
            f"expertflow was built without CUDA kernels ({reason}), so it cannot run on {dev}. "
            "Install a CUDA build of torch and the CUDA toolkit of the same major version "
            "(CUDA_HOME), then rebuild: EXPERTFLOW_CUDA=ON bash scripts/dev setup "
            "(with ON the build fails, saying why, instead of leaving the kernels out)."
        )
    where = str(dev)
    if capability is None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {dev} was asked for, but torch sees no CUDA device "
                "(torch.cuda.is_available() is False)"
            )
        capability = torch.cuda.get_device_capability(dev)
        where = f"{dev} ({torch.cuda.get_device_name(dev)})"
    if not arch_list_supports(info["cuda_arch_list"], capability):
        cc = f"{capability[0]}.{capability[1]}"
        built = ";".join(info["cuda_arch_list"])
        raise RuntimeError(
            "expertflow's CUDA kernels were built for "
            f'TORCH_CUDA_ARCH_LIST="{built}", none of '
            f"which runs on {where}, compute capability {cc}. Rebuild on this machine with "
            f"`bash scripts/dev setup` (it builds for the GPUs it sees), or for this GPU "
            f"anywhere: TORCH_CUDA_ARCH_LIST={cc} bash scripts/dev setup"
        )
