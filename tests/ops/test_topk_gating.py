"""expertflow.ops.topk_gating against the plain-torch reference, edge cases and bad input."""

from __future__ import annotations

import pytest
import torch

from expertflow import ops
from expertflow.ops import reference
from tests.ops.routing_checks import assert_same_routing

# The sweep asked for by the op's contract: T x E x k (k = E included).
TOKENS = [0, 1, 33, 4096]
EXPERTS = [8, 60, 64, 128, 256]
TOPK = [1, 2, 6, 8, "E"]


def _sweep():
    for t in TOKENS:
        for e in EXPERTS:
            for k in TOPK:
                k = e if k == "E" else k
                if k <= e:
                    yield t, e, k


def _logits(t, e, gen, dtype=torch.float32, device="cpu"):
    return (torch.randn(t, e, generator=gen) * 2).to(dtype).to(device)


def _check(logits, k, key_rtol=0.0, **kwargs):
    ids, weights = ops.topk_gating(logits, k, **kwargs)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert ids.shape == weights.shape == (logits.shape[0], k)
    assert ids.device == logits.device
    ref_ids, ref_w = reference.topk_gating(logits.cpu(), k, **kwargs)
    keys = logits.cpu().float()
    if kwargs.get("correction_bias") is not None:
        keys = (
            reference._scores(keys, kwargs.get("scoring", "softmax"))
            + kwargs["correction_bias"].cpu().float()
        )
    assert_same_routing(ids, weights, ref_ids, ref_w, keys, key_rtol=key_rtol)
    if logits.shape[0]:
        assert int(ids.min()) >= 0 and int(ids.max()) < logits.shape[1]
    return ids, weights


@pytest.mark.parametrize("t,e,k", list(_sweep()))
def test_softmax_sweep(device, gen, t, e, k):
    logits = _logits(t, e, gen, device=device)
    for renormalize in (True, False):
        _check(logits, k, renormalize=renormalize)


@pytest.mark.parametrize("t,e,k", list(_sweep()))
def test_sigmoid_bias_groups_sweep(device, gen, t, e, k):
    logits = _logits(t, e, gen, device=device)
    bias = (torch.randn(e, generator=gen) * 0.1).to(device)
    groups = 4 if e % 4 == 0 else 2 if e % 2 == 0 else 1
    kept = max(1, groups // 2)
    if k > kept * (e // groups):
        kept = groups
    _check(
        logits,
        k,
        key_rtol=1e-5,
        scoring="sigmoid",
        correction_bias=bias,
        n_group=groups,
        topk_group=kept,
        routed_scaling_factor=2.5,
    )


@pytest.mark.parametrize("t,e,k", [(33, 64, 6), (4096, 256, 8), (1, 8, 4), (0, 64, 2)])
def test_group_limited_greedy_softmax(device, gen, t, e, k):
    logits = _logits(t, e, gen, device=device)
    _check(logits, k, renormalize=False, n_group=4, topk_group=2, routed_scaling_factor=16.0)


@pytest.mark.parametrize("t,e,k", [(33, 32, 4), (4096, 128, 4), (1, 8, 1), (0, 60, 2)])
def test_softmax_after_topk(device, gen, t, e, k):
    _check(_logits(t, e, gen, device=device), k, softmax_after_topk=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_inputs_are_scored_in_fp32(device, gen, dtype):
    logits = _logits(257, 64, gen, dtype=dtype, device=device)
    _check(logits, 6, renormalize=True)
    bias = torch.randn(64, generator=gen).to(dtype).to(device)
    _check(
        logits, 8, key_rtol=1e-5, scoring="sigmoid", correction_bias=bias, n_group=8, topk_group=4
    )


def test_softmax_with_bias(device, gen):
    logits = _logits(100, 16, gen, device=device)
    bias = torch.randn(16, generator=gen).to(device) * 0.05
    _check(logits, 4, key_rtol=1e-5, correction_bias=bias)


def test_sigmoid_without_bias(device, gen):
    _check(_logits(100, 16, gen, device=device), 4, scoring="sigmoid", renormalize=False)


def test_ties_go_to_lowest_expert_id(device):
    logits = torch.tensor(
        [
            [1.0, 5.0, 5.0, 0.0, 5.0, 5.0, 2.0, 5.0],
            [0.0] * 8,
            [3.0, 3.0, 9.0, 3.0, 3.0, 3.0, 3.0, 3.0],
        ],
        device=device,
    )
    ids, weights = ops.topk_gating(logits, 3)
    assert ids.tolist() == [[1, 2, 4], [0, 1, 2], [2, 0, 1]]
    torch.testing.assert_close(weights[0].cpu(), torch.full((3,), 1 / 3))
    groups_tied = torch.zeros(1, 8, device=device)
    gids, _ = ops.topk_gating(groups_tied, 2, n_group=4, topk_group=2)
    assert gids.tolist() == [[0, 1]]


def test_nan_and_inf_never_give_out_of_range_ids(device):
    nan, inf = float("nan"), float("inf")
    logits = torch.tensor(
        [[nan, 1.0, -inf, nan, 0.5, nan], [nan] * 6, [-inf] * 6, [inf, 0.0, 1.0, -inf, 2.0, 3.0]],
        device=device,
    )
    for kwargs in (
        {},
        {"scoring": "sigmoid"},
        {"softmax_after_topk": True},
        {"correction_bias": torch.zeros(6, device=device), "scoring": "sigmoid"},
        {"n_group": 3, "topk_group": 2},
    ):
        ids, weights = ops.topk_gating(logits, 4, **kwargs)
        if "n_group" not in kwargs:  # numbers first, then -inf, then NaN
            assert ids.tolist()[0][:3] == [1, 4, 2], kwargs
        for row in ids.tolist():
            assert sorted(set(row)) == sorted(row) and all(0 <= e < 6 for e in row), kwargs
        ref_ids, ref_w = reference.topk_gating(logits.cpu(), 4, **kwargs)
        assert ids.cpu().tolist() == ref_ids.tolist(), kwargs
        torch.testing.assert_close(weights.cpu(), ref_w, equal_nan=True)
    _, softmax_w = ops.topk_gating(logits, 2)
    assert torch.isnan(softmax_w[0]).all() and torch.isnan(softmax_w[2]).all()
    assert torch.isnan(softmax_w[3]).all()  # +inf in a softmax row: NaN, as torch.softmax


def test_group_scores_use_top_two_with_bias(device):
    # Group 0 holds the single best expert, group 1 the best pair: DeepSeek-V3 keeps group 1.
    logits = torch.zeros(1, 8, device=device)
    bias = torch.tensor([0.9, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0, 0.0], device=device)
    ids, weights = ops.topk_gating(
        logits,
        2,
        scoring="sigmoid",
        correction_bias=bias,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
    )
    assert ids.tolist() == [[4, 5]]
    torch.testing.assert_close(weights.cpu(), torch.tensor([[1.25, 1.25]]))
    # Without a bias the group key is the best score alone: group 0 wins.
    plain = torch.tensor([[0.9, 0.0, 0.0, 0.0, 0.6, 0.6, 0.0, 0.0]], device=device)
    ids, _ = ops.topk_gating(plain, 2, scoring="sigmoid", n_group=2, topk_group=1)
    assert ids.tolist() == [[0, 1]]


def test_non_contiguous_input(device, gen):
    base = _logits(64, 32, gen, device=device)
    view = base.t().contiguous().t()  # same values, column-major strides
    assert not view.is_contiguous()
    a = ops.topk_gating(view, 4)
    b = ops.topk_gating(base, 4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda: (torch.randn(4), 2), "router_logits must be 2-D"),
        (lambda: (torch.randn(2, 4, 8), 2), "router_logits must be 2-D"),
        (lambda: (torch.randn(4, 8), 0), "top_k must be in \\[1, num_experts=8\\], got 0"),
        (lambda: (torch.randn(4, 8), 9), "top_k must be in \\[1, num_experts=8\\], got 9"),
        (lambda: (torch.randn(4, 8).double(), 2), "float32, bfloat16 or float16, got Double"),
        (lambda: (torch.randint(0, 3, (4, 8)), 2), "float32, bfloat16 or float16, got Long"),
    ],
)
def test_bad_input_names_the_argument(make_args, message):
    with pytest.raises(ValueError, match=message):
        ops.topk_gating(*make_args())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_group": 3, "topk_group": 1}, "n_group=3 must divide num_experts=8"),
        ({"n_group": 4, "topk_group": 5}, "topk_group must be in \\[1, n_group=4\\], got 5"),
        ({"n_group": 4, "topk_group": 1}, "top_k=3 exceeds the 2 experts in topk_group=1"),
        ({"correction_bias": torch.zeros(7)}, "correction_bias must be 1-D \\[num_experts=8\\]"),
        ({"correction_bias": torch.zeros(8, dtype=torch.long)}, "must be a floating-point"),
        ({"scoring": "sigmoid", "softmax_after_topk": True}, "requires scoring='softmax'"),
    ],
)
def test_bad_router_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ops.topk_gating(torch.randn(4, 8), 3, **kwargs)


def test_python_level_argument_errors():
    with pytest.raises(ValueError, match="scoring must be one of"):
        ops.topk_gating(torch.randn(4, 8), 2, scoring="relu")
    with pytest.raises(ValueError, match="needs topk_group"):
        ops.topk_gating(torch.randn(4, 8), 2, n_group=2)
    with pytest.raises(ValueError, match="topk_group was given without n_group"):
        ops.topk_gating(torch.randn(4, 8), 2, topk_group=2)


@pytest.mark.cuda
def test_mismatched_devices():
    with pytest.raises(ValueError, match="correction_bias must be on router_logits' device"):
        ops.topk_gating(torch.randn(4, 8, device="cuda"), 2, correction_bias=torch.zeros(8))


@pytest.mark.cuda
def test_cuda_matches_cpu_exactly_on_ids(gen):
    logits = _logits(4096, 256, gen)
    for kwargs in (
        {},
        {"renormalize": False},
        {"softmax_after_topk": True},
        {"n_group": 8, "topk_group": 4, "renormalize": False},
    ):
        cpu = ops.topk_gating(logits, 8, **kwargs)
        gpu = ops.topk_gating(logits.cuda(), 8, **kwargs)
        assert torch.equal(cpu[0], gpu[0].cpu()), kwargs
        torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=2e-6, atol=1e-7)


def test_opcheck(device, gen):
    logits = _logits(17, 16, gen, device=device)
    bias = torch.randn(16, generator=gen).to(device)
    for args in (
        (logits, 2, "softmax", True, None, 1, 1, 1.0, False),
        (logits.bfloat16(), 4, "sigmoid", True, bias, 4, 2, 2.5, False),
        (logits, 3, "softmax", False, None, 1, 1, 1.0, True),
    ):
        torch.library.opcheck(torch.ops.expertflow.topk_gating.default, args)


def test_torch_compile_fullgraph(device, gen):
    @torch.compile(fullgraph=True)
    def route(x):
        ids, weights = ops.topk_gating(x * 2.0, 2, renormalize=True)
        return ids, weights * 3.0

    x = _logits(33, 8, gen, device=device)
    ids, weights = route(x)
    ref_ids, ref_w = ops.topk_gating(x * 2.0, 2)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w * 3.0)


def test_single_expert_and_all_experts(device, gen):
    ids, weights = ops.topk_gating(_logits(5, 1, gen, device=device), 1)
    assert ids.cpu().tolist() == [[0]] * 5
    torch.testing.assert_close(weights.cpu(), torch.ones(5, 1))
    logits = _logits(7, 16, gen, device=device)
    _check(logits, 16, n_group=4, topk_group=4, renormalize=False)
    bias = torch.randn(16, generator=gen).to(device)
    _check(
        logits, 16, key_rtol=1e-5, scoring="sigmoid", correction_bias=bias, n_group=4, topk_group=4
    )


def test_bias_dtype_is_upcast(device, gen):
    logits = _logits(64, 32, gen, device=device)
    bias = torch.randn(32, generator=gen).to(device)
    a = ops.topk_gating(logits, 4, scoring="sigmoid", correction_bias=bias.bfloat16())
    b = ops.topk_gating(logits, 4, scoring="sigmoid", correction_bias=bias.bfloat16().float())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
