"""Shared fixtures: the device sweep and the CUDA skip rule."""

from __future__ import annotations

import pytest
import torch

import expertflow


def cuda_unavailable_reason() -> str | None:
    """Why CUDA tests cannot run here, or None when they can."""
    if not expertflow.build_info()["cuda_kernels"]:
        return "expertflow was built without CUDA kernels"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {reason}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """Every op test runs on the CPU, and on CUDA where a device and the kernels exist."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A CPU generator with a fresh seed per test, printed on failure via the test id."""
    g = torch.Generator()
    g.seed()
    return g
