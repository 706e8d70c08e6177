"""Loading of the native extension ``expertflow._C`` and the facts of its build."""

from __future__ import annotations

import importlib
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
        ``git_revision`` (of the source tree at configure time, "unknown" outside git) and
        ``cxx_standard`` (the ``__cplusplus`` value).
    """
    from expertflow import _C

    info = dict(_C.build_info())
    arch = info["cuda_arch_list"].replace(" ", ";")
    info["cuda_arch_list"] = [a for a in arch.split(";") if a]
    return info
