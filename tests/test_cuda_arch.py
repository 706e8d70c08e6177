"""GPU architectures: the compatibility rule, the run-time refusal, and scripts/dev's choice.

Nothing here needs a GPU: device capabilities are given, and nvidia-smi is a fake on PATH.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

import expertflow
from expertflow import _extension
from expertflow._extension import arch_list_supports, check_cuda_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LINE = re.compile(r'^set\(EXPERTFLOW_DEFAULT_ARCH_LIST "(.*)"\)$', re.M)


def cmake_default_arch_list() -> list[str]:
    text = (ROOT / "cmake" / "ExpertflowTorch.cmake").read_text()
    return DEFAULT_LINE.search(text)[1].split(";")


@pytest.mark.parametrize(
    ("arch_list", "capability", "runs"),
    [
        (["9.0"], (9, 0), True),
        (["9.0"], (8, 9), False),  # SASS never runs on an older GPU
        (["9.0"], (10, 0), False),  # nor across a major version
        (["8.0"], (8, 6), True),  # same major, newer minor
        (["8.0"], (8, 9), True),
        (["8.6"], (8, 0), False),
        (["8.0", "9.0"], (8, 9), True),
        (["8.9", "9.0"], (8, 6), False),
        (["9.0+PTX"], (9, 0), True),
        (["9.0+PTX"], (10, 0), True),  # PTX is JIT-compiled for any newer GPU
        (["9.0+PTX"], (12, 1), True),
        (["9.0+PTX"], (8, 9), False),  # but not for an older one
        (["8.0", "12.0+PTX"], (11, 0), False),
        (["9.0a"], (9, 0), True),  # arch-specific: that GPU only
        (["9.0a"], (9, 1), False),
        (["9.0a+PTX"], (10, 0), False),
        (["10.0f"], (10, 3), True),  # family-specific: the same major, minor >= its own
        (["10.0f"], (12, 0), False),
        (["10.0f+PTX"], (10, 3), True),
        (["10.0f+PTX"], (11, 0), False),
        ([" 8.6 "], (8, 9), True),
        ([], (9, 0), False),
    ],
)
def test_arch_rule(arch_list, capability, runs):
    assert arch_list_supports(arch_list, capability) is runs


def test_arch_rule_rejects_unknown_entries():
    with pytest.raises(ValueError, match="'Hopper' is not like"):
        arch_list_supports(["Hopper"], (9, 0))


def test_default_arch_list_covers_torch_gpus_and_newer():
    """The default: SASS for every GPU generation torch 2.14's CUDA 13 wheels support (Turing
    to Blackwell), PTX of the newest for GPUs that come later."""
    default = cmake_default_arch_list()
    assert default[-1].endswith("+PTX")
    assert not any(a.endswith("+PTX") for a in default[:-1])
    for cc in [(7, 5), (8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (10, 3), (12, 0), (12, 1)]:
        assert arch_list_supports(default, cc), cc
    assert arch_list_supports(default, (13, 0))  # through PTX
    assert not arch_list_supports(default, (7, 0))  # Volta: CUDA 13 dropped it


def fake_kernels(monkeypatch, arch_list):
    info = {"cuda_kernels": True, "cuda_arch_list": arch_list, "cuda_disabled_reason": ""}
    monkeypatch.setattr(_extension, "build_info", lambda: info)


def test_check_cuda_device_passes_other_devices(monkeypatch):
    monkeypatch.setattr(_extension, "build_info", lambda: pytest.fail("build_info was read"))
    check_cuda_device("cpu")
    check_cuda_device(torch.device("meta"))


def test_check_cuda_device_accepts_a_runnable_gpu(monkeypatch):
    fake_kernels(monkeypatch, ["8.0", "9.0+PTX"])
    check_cuda_device("cuda", capability=(8, 9))
    check_cuda_device("cuda:1", capability=(12, 0))
    check_cuda_device(None, capability=(9, 0))


def test_check_cuda_device_refuses_a_gpu_with_the_rebuild_command(monkeypatch):
    fake_kernels(monkeypatch, ["9.0"])
    with pytest.raises(RuntimeError) as err:
        check_cuda_device("cuda:1", capability=(8, 9))
    message = str(err.value)
    assert 'built for TORCH_CUDA_ARCH_LIST="9.0"' in message
    assert "cuda:1" in message and "compute capability 8.9" in message
    assert "TORCH_CUDA_ARCH_LIST=8.9 bash scripts/dev setup" in message


def test_check_cuda_device_without_a_visible_gpu(monkeypatch):
    fake_kernels(monkeypatch, ["9.0"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        check_cuda_device("cuda")


def test_check_cuda_device_says_why_kernels_are_absent(monkeypatch):
    reason = "nvcc 12.4 (/usr/local/cuda-12.4/bin/nvcc) does not match torch's CUDA 13.0"
    info = {"cuda_kernels": False, "cuda_arch_list": [], "cuda_disabled_reason": reason}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    with pytest.raises(RuntimeError) as err:
        check_cuda_device("cuda", capability=(9, 0))
    message = str(err.value)
    assert "built without CUDA kernels" in message and reason in message
    assert "EXPERTFLOW_CUDA=ON bash scripts/dev setup" in message


def test_check_cuda_device_on_this_build():
    """No list of this project's builds runs on compute capability 5.0 (CUDA 13 lacks it)."""
    info = expertflow.build_info()
    expected = "CUDA kernels were built for" if info["cuda_kernels"] else "without CUDA kernels"
    with pytest.raises(RuntimeError, match=expected):
        check_cuda_device("cuda", capability=(5, 0))


@pytest.mark.parametrize("load", ["offload", "from_pretrained"])
def test_offload_refuses_a_gpu_the_build_cannot_run_on(monkeypatch, tmp_path, load):
    """offload and from_pretrained check the device before building anything."""
    from expertflow.demo.model import DEMO_MODEL_DIR, load_demo_model

    info = {"cuda_kernels": False, "cuda_arch_list": [], "cuda_disabled_reason": "nvcc absent"}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    with pytest.raises(RuntimeError, match="built without CUDA kernels \\(nvcc absent\\)"):
        if load == "offload":
            model, _ = load_demo_model()
            expertflow.offload(model, device="cuda", slots=32)
        else:
            expertflow.from_pretrained(DEMO_MODEL_DIR, device="cuda", slots=32)
    if load == "offload":
        assert not hasattr(model, "_expertflow")


@pytest.mark.cuda
def test_this_build_runs_on_every_visible_gpu():
    for index in range(torch.cuda.device_count()):
        check_cuda_device(index)


def dev_arch(tmp_path, nvidia_smi: str | None, arch_env: str | None = None) -> str:
    """What `bash scripts/dev arch` prints with a fake nvidia-smi (a shell script body)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"}
    if arch_env is not None:
        env["TORCH_CUDA_ARCH_LIST"] = arch_env
    if nvidia_smi is not None:
        fake = tmp_path / "nvidia-smi"
        fake.write_text("#!/bin/sh\n" + nvidia_smi + "\n")
        fake.chmod(0o755)
        env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "dev"), "arch"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.parametrize(
    ("gpus", "expected"),
    [
        ("9.0", "9.0"),
        ("8.9\n8.6\n8.9", "8.6;8.9"),  # every distinct capability, in order
        ("10.0\n9.0\n12.0", "9.0;10.0;12.0"),  # numeric order, not text order
        ("8.9\r", "8.9"),
    ],
)
def test_dev_builds_for_the_visible_gpus(tmp_path, gpus, expected):
    assert dev_arch(tmp_path, f"printf '{gpus}\\n'") == expected


@pytest.mark.parametrize(
    "nvidia_smi",
    [
        "echo 'NVIDIA-SMI has failed because it could not communicate with the driver'; exit 9",
        "echo '[N/A]'",  # answers, but with no capability
        "exit 0",  # no GPU listed
    ],
)
def test_dev_uses_the_default_without_a_gpu(tmp_path, nvidia_smi):
    assert dev_arch(tmp_path, nvidia_smi) == ";".join(cmake_default_arch_list())


def test_dev_prefers_the_callers_arch_list(tmp_path):
    assert dev_arch(tmp_path, "printf '8.9\\n'", arch_env="9.0") == "9.0"
    assert dev_arch(tmp_path, "exit 9", arch_env="8.0;9.0+PTX") == "8.0;9.0+PTX"
