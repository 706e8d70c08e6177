"""Every op refuses inputs on more than one device, naming the argument and both devices.

The dispatcher picks one kernel from the devices of all the inputs together: a meta input
selects the fake kernel (which used to return uninitialised ids for a CPU call), a CUDA input
the CUDA kernel. Each kernel's checks must therefore refuse the mix itself (issue 21, item 4).
"""

from __future__ import annotations

import pytest
import torch

from expertflow import ops


def _message(op, name, first_name, first, got):
    return (
        rf"{op}: {name} must be on {first_name}' device {first} \(all inputs on one device\), "
        rf"got {got}"
    )


def _gating(logits_device, bias_device):
    """A topk_gating call with its inputs on these devices, and the message it must raise."""

    def call():
        return ops.topk_gating(
            torch.randn(3, 8, device=logits_device),
            2,
            scoring="sigmoid",
            correction_bias=torch.zeros(8, device=bias_device),
        )

    return call, (logits_device, bias_device)


def _combine(rows_device, weights_device, inverse_device):
    """A combine call with its inputs on these devices (the first mismatch is named)."""

    def call():
        return ops.combine(
            torch.randn(6, 4, device=rows_device),
            torch.rand(3, 2, device=weights_device),
            torch.arange(6, dtype=torch.int32, device=inverse_device),
        )

    return call, (rows_device, weights_device, inverse_device)


def _expected(devices):
    """The message for inputs on `devices` (as passed to _gating or _combine)."""
    names = ("router_logits", "correction_bias")
    if len(devices) == 3:
        names = ("expert_outputs", "topk_weights", "inverse")
    op = "topk_gating" if len(devices) == 2 else "combine"
    first = torch.device(devices[0])
    bad = next(i for i, d in enumerate(devices) if torch.device(d) != first)
    got = torch.device(devices[bad])
    show = {"cuda": "cuda:0"}
    return _message(op, names[bad], names[0], show.get(str(first), first), show.get(str(got), got))


MIXES = [
    _gating("cpu", "meta"),
    _gating("meta", "cpu"),
    _combine("cpu", "meta", "cpu"),
    _combine("cpu", "cpu", "meta"),
    _combine("meta", "cpu", "cpu"),
]


@pytest.mark.parametrize("call, devices", MIXES)
def test_meta_and_cpu_inputs_are_refused(call, devices):
    with pytest.raises(ValueError, match=_expected(devices)):
        call()


CUDA_MIXES = [
    _gating("cpu", "cuda"),
    _gating("cuda", "cpu"),
    _gating("cuda", "meta"),
    _combine("cpu", "cuda", "cuda"),
    _combine("cuda", "cuda", "cpu"),
    _combine("cuda", "meta", "cuda"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("call, devices", CUDA_MIXES)
def test_cpu_and_cuda_inputs_are_refused(call, devices):
    with pytest.raises(ValueError, match=_expected(devices)):
        call()


def test_all_meta_inputs_give_meta_outputs_of_the_right_shapes():
    ids, weights = _gating("meta", "meta")[0]()
    assert ids.device.type == "meta" and ids.shape == (3, 2) and ids.dtype == torch.int32
    assert weights.shape == (3, 2) and weights.dtype == torch.float32
    out = _combine("meta", "meta", "meta")[0]()
    assert out.device.type == "meta" and out.shape == (3, 4)


def test_the_fake_kernel_checks_sizes_as_the_native_ones():
    # A meta call used to return outputs for any top_k or number of experts.
    with pytest.raises(ValueError, match=r"top_k must be in \[1, num_experts=8\], got 9"):
        ops.topk_gating(torch.randn(3, 8, device="meta"), 9)
    with pytest.raises(ValueError, match="between 1 and 2\\^20 experts"):
        ops.topk_gating(torch.empty(3, 2**20 + 1, device="meta"), 2)
