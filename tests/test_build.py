"""The package imports cleanly, reports its build, and refuses a torch it was not built for."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import expertflow
from expertflow import _extension


def test_build_info_reports_the_build():
    info = expertflow.build_info()
    assert info["torch_version"] == torch.__version__
    assert isinstance(info["cuda_kernels"], bool)
    assert isinstance(info["cuda_arch_list"], list)
    assert isinstance(info["git_revision"], str) and info["git_revision"]
    assert info["cxx_standard"] >= 202002
    if info["cuda_kernels"]:
        assert torch.version.cuda, "CUDA kernels need a CUDA build of torch"
        assert (
            info["cuda_arch_list"]
            and info["cuda_version"].split(".")[0] == (torch.version.cuda.split(".")[0])
        )
        assert info["cuda_disabled_reason"] == ""
        _extension.arch_list_supports(info["cuda_arch_list"], (9, 0))  # every entry parses
    else:
        assert info["cuda_arch_list"] == [] and info["cuda_version"] == ""
        assert info["cuda_disabled_reason"], "a build without CUDA kernels says why"


def test_build_info_arch_list_is_the_recorded_one():
    from expertflow import _build_info

    recorded = [a for a in _build_info.CUDA_ARCH_LIST.split(";") if a]
    assert expertflow.build_info()["cuda_arch_list"] == recorded


def test_ops_are_registered_for_cpu():
    for name in ("topk_gating", "group_by_expert", "combine"):
        op = getattr(torch.ops.expertflow, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU"), name


def test_cuda_kernels_registered_iff_built():
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("expertflow::topk_gating", "CUDA")
    assert has_cuda == expertflow.build_info()["cuda_kernels"]


def test_import_never_initialises_cuda():
    code = (
        "import torch, expertflow\n"
        "expertflow.build_info()\n"
        "expertflow.ops.topk_gating(torch.randn(3, 8), 2)\n"
        "assert not torch.cuda.is_initialized(), 'CUDA was initialised'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_mismatched_torch_is_refused_with_a_clear_error():
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0 but torch .* installed"):
        _extension._check_torch_matches("1.0.0")
    _extension._check_torch_matches(torch.__version__)  # the real one passes


def test_public_api():
    assert set(expertflow.__all__) >= {"build_info", "ops", "__version__"}
    assert set(expertflow.ops.__all__) == {
        "topk_gating",
        "group_by_expert",
        "combine",
        "dequantize_int8",
        "dequantize_int4",
        "dequantize_fp8_block",
        "dequantize_mxfp4",
        "cpu_expert",
        "CPU_EXPERT_FORMATS",
        "CPU_EXPERT_ACTIVATIONS",
    }
