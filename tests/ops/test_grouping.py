"""expertflow.ops.group_by_expert and combine against the references, and as an MoE forward."""

from __future__ import annotations

import pytest
import torch

from expertflow import ops
from expertflow.ops import reference
from tests.ops.routing_checks import assert_same_routing

SWEEP = [
    (t, e, k)
    for t in (0, 1, 33, 4096)
    for e in (8, 60, 64, 128, 256)
    for k in (1, 2, 6, 8, e)
    if k <= e and t * k <= 4096 * 256
]


def _random_ids(t, e, k, gen, device):
    """Routings as a router makes them: k distinct experts per token."""
    if t == 0:
        return torch.empty(0, k, dtype=torch.int32, device=device)
    return torch.rand(t, e, generator=gen).argsort(dim=-1)[:, :k].int().to(device)


@pytest.mark.parametrize("t,e,k", SWEEP)
def test_group_by_expert_matches_reference(device, gen, t, e, k):
    ids = _random_ids(t, e, k, gen, device)
    got = ops.group_by_expert(ids, e)
    want = reference.group_by_expert(ids.cpu(), e)
    for name, g, w in zip(("order", "counts", "offsets", "inverse"), got, want, strict=True):
        assert g.dtype == torch.int32 and g.device == ids.device, name
        assert torch.equal(g.cpu(), w), name


def test_group_by_expert_is_stable_and_consistent(device, gen):
    ids = torch.randint(0, 5, (300, 3), generator=gen).int().to(device)  # many repeats
    order, counts, offsets, inverse = (x.cpu() for x in ops.group_by_expert(ids, 5))
    flat = ids.cpu().flatten()
    for e in range(5):
        rows = order[offsets[e] : offsets[e + 1]]
        assert torch.all(flat[rows] == e)
        assert torch.all(rows[1:] > rows[:-1])  # pair order kept within an expert
        assert counts[e] == (flat == e).sum()
    assert torch.equal(order[inverse.long()], torch.arange(flat.numel(), dtype=torch.int32))


def test_unrouted_ids_go_last(device):
    ids = torch.tensor([[2, -1], [0, 7], [2, 3]], dtype=torch.int32, device=device)
    order, counts, offsets, inverse = (x.cpu().tolist() for x in ops.group_by_expert(ids, 4))
    assert order == [2, 0, 4, 5, 1, 3]
    assert counts == [1, 0, 2, 1]
    assert offsets == [0, 1, 1, 3, 4]
    assert inverse == [1, -1, 0, -1, 2, 3]


def test_int64_ids_accepted_and_huge_values_unrouted(device):
    ids = torch.tensor([[1, 2**40], [-(2**40), 0]], dtype=torch.int64, device=device)
    order, counts, offsets, inverse = (x.cpu().tolist() for x in ops.group_by_expert(ids, 4))
    assert counts == [1, 1, 0, 0]
    assert inverse == [1, -1, -1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "t,e,k,h", [(0, 8, 2, 16), (1, 8, 1, 7), (33, 60, 6, 64), (512, 64, 8, 96), (64, 8, 8, 1)]
)
def test_combine_matches_reference(device, gen, dtype, t, e, k, h):
    ids = _random_ids(t, e, k, gen, device)
    _, _, _, inverse = ops.group_by_expert(ids, e)
    rows = torch.randn(t * k, h, generator=gen).to(dtype).to(device)
    weights = torch.rand(t, k, generator=gen).to(device)
    got = ops.combine(rows, weights, inverse)
    want = reference.combine(rows.cpu(), weights.cpu(), inverse.cpu())
    assert got.dtype == dtype and got.shape == (t, h)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)


def test_combine_skips_unrouted_pairs(device):
    rows = torch.tensor([[1.0, 2.0], [10.0, 20.0]], device=device)
    weights = torch.tensor([[0.5, 0.25], [1.0, 3.0]], device=device)
    inverse = torch.tensor([1, -1, 0, 1], dtype=torch.int32, device=device)
    out = ops.combine(rows, weights, inverse).cpu()
    assert out.tolist() == [[5.0, 10.0], [31.0, 62.0]]


def test_combine_is_deterministic(device, gen):
    ids = _random_ids(256, 16, 4, gen, device)
    _, _, _, inverse = ops.group_by_expert(ids, 16)
    rows = torch.randn(1024, 128, generator=gen).to(device)
    weights = torch.rand(256, 4, generator=gen).to(device)
    first = ops.combine(rows, weights, inverse)
    for _ in range(3):
        assert torch.equal(ops.combine(rows, weights, inverse), first)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_moe_forward_matches_transformers_experts(gen, dtype):
    """gating -> group -> each expert once over its tokens -> combine == Mixtral's block."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(cfg).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    block = block.to(dtype)
    x = torch.randn(3, 11, 32, generator=gen).to(dtype)
    with torch.no_grad():
        want = block(x)
        flat = x.reshape(-1, 32)
        logits, ref_weights, ref_ids = block.gate(flat)
        ids, weights = ops.topk_gating(logits, 2)
        # bf16 logits tie often; there the block's own choice may differ from the lowest id.
        assert_same_routing(
            ids, weights, ref_ids, ref_weights.float(), logits.float().softmax(-1), key_rtol=1e-6
        )
        ids, weights = ref_ids, ref_weights.float()  # group and combine exactly its routing
        order, _, offsets, inverse = ops.group_by_expert(ids, 8)
        tokens = (order // 2).long()
        rows = torch.empty(order.numel(), 32, dtype=dtype)
        experts = block.experts
        for e in range(8):
            lo, hi = int(offsets[e]), int(offsets[e + 1])
            if lo == hi:
                continue
            h = flat[tokens[lo:hi]]
            gate, up = torch.nn.functional.linear(h, experts.gate_up_proj[e]).chunk(2, dim=-1)
            rows[lo:hi] = torch.nn.functional.linear(
                experts.act_fn(gate) * up, experts.down_proj[e]
            )
        got = ops.combine(rows, weights, inverse).view_as(x)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda: (torch.zeros(4, dtype=torch.int32), 8), "topk_ids must be 2-D"),
        (lambda: (torch.zeros(4, 2), 8), "topk_ids must be int32 or int64, got Float"),
        (lambda: (torch.zeros(4, 2, dtype=torch.int32), 0), "num_experts must be >= 1, got 0"),
    ],
)
def test_group_by_expert_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ops.group_by_expert(*args())


@pytest.mark.parametrize(
    "args, message",
    [
        (
            lambda: (torch.zeros(4), torch.zeros(2, 2), torch.zeros(4, dtype=torch.int32)),
            "expert_outputs must be 2-D",
        ),
        (
            lambda: (
                torch.zeros(4, 3).double(),
                torch.zeros(2, 2),
                torch.zeros(4, dtype=torch.int32),
            ),
            "expert_outputs must be float32, bfloat16 or float16, got Double",
        ),
        (
            lambda: (
                torch.zeros(4, 3),
                torch.zeros(2, 2).half(),
                torch.zeros(4, dtype=torch.int32),
            ),
            "topk_weights must be float32, got Half",
        ),
        (
            lambda: (torch.zeros(4, 3), torch.zeros(2, 2), torch.zeros(5, dtype=torch.int32)),
            "inverse must be 1-D \\[num_tokens \\* top_k = 4\\], got shape \\[5\\]",
        ),
        (
            lambda: (torch.zeros(4, 3), torch.zeros(2, 2), torch.zeros(4, dtype=torch.long)),
            "inverse must be int32, got Long",
        ),
    ],
)
def test_combine_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        ops.combine(*args())


@pytest.mark.parametrize(
    "inverse, message",
    [
        ([0, 1, 4, 2], "inverse\\[2\\] = 4 is outside \\[-1, 4\\)"),
        ([0, -2, 1, 2], "inverse\\[1\\] = -2 is outside"),
    ],
)
def test_combine_refuses_rows_outside_expert_outputs_as_index_errors(inverse, message):
    with pytest.raises(IndexError, match=message):
        ops.combine(torch.zeros(4, 3), torch.zeros(2, 2), torch.tensor(inverse).int())


@pytest.mark.parametrize("where", ["native", "meta"])
@pytest.mark.parametrize("num_experts", [2**20 + 1, 2**30, 2**62])
def test_group_by_expert_refuses_absurd_num_experts_before_allocating(device, where, num_experts):
    # 2**30 experts used to allocate counts and offsets of 4 GiB each (12.8 GB in all).
    ids = torch.zeros(2, 2, dtype=torch.int32, device=device if where == "native" else "meta")
    with pytest.raises(
        ValueError, match=rf"num_experts must be <= 2\^20 = 1048576 .*got {num_experts}"
    ):
        ops.group_by_expert(ids, num_experts)


def test_group_by_expert_accepts_2_to_the_20_experts(device):
    ids = torch.tensor([[2**20 - 1, 0]], dtype=torch.int32, device=device)
    order, counts, offsets, inverse = ops.group_by_expert(ids, 2**20)
    assert counts.shape == (2**20,) and offsets.shape == (2**20 + 1,)
    assert order.tolist() == [1, 0] and inverse.tolist() == [1, 0]


@pytest.mark.cuda
def test_combine_mixed_devices():
    with pytest.raises(ValueError, match="topk_weights must be on expert_outputs' device cuda:0"):
        ops.combine(
            torch.zeros(4, 3, device="cuda"),
            torch.zeros(2, 2),
            torch.zeros(4, dtype=torch.int32, device="cuda"),
        )


@pytest.mark.cuda
def test_combine_cuda_skips_out_of_range_rows():
    rows = torch.ones(2, 4, device="cuda")
    inverse = torch.tensor([0, 5, 1, -7], dtype=torch.int32, device="cuda")
    out = ops.combine(rows, torch.ones(2, 2, device="cuda"), inverse)
    assert out.cpu().tolist() == [[1.0] * 4, [1.0] * 4]


def test_opcheck(device, gen):
    ids = _random_ids(9, 8, 2, gen, device)
    torch.library.opcheck(torch.ops.expertflow.group_by_expert.default, (ids, 8))
    _, _, _, inverse = ops.group_by_expert(ids, 8)
    rows = torch.randn(18, 5, generator=gen).to(device)
    weights = torch.rand(9, 2, generator=gen).to(device)
    torch.library.opcheck(torch.ops.expertflow.combine.default, (rows, weights, inverse))


def test_torch_compile_fullgraph(device, gen):
    @torch.compile(fullgraph=True)
    def regroup(ids, rows, weights):
        order, counts, offsets, inverse = ops.group_by_expert(ids, 8)
        return ops.combine(rows * 2.0, weights, inverse), counts

    ids = _random_ids(9, 8, 2, gen, device)
    rows = torch.randn(18, 5, generator=gen).to(device)
    weights = torch.rand(9, 2, generator=gen).to(device)
    out, counts = regroup(ids, rows, weights)
    _, want_counts, _, inverse = ops.group_by_expert(ids, 8)
    torch.testing.assert_close(out, ops.combine(rows * 2.0, weights, inverse))
    assert torch.equal(counts, want_counts)


def test_non_contiguous_inputs(device, gen):
    ids = _random_ids(40, 16, 4, gen, device)
    strided_ids = ids.t().contiguous().t()
    assert not strided_ids.is_contiguous()
    for got, want in zip(
        ops.group_by_expert(strided_ids, 16), ops.group_by_expert(ids, 16), strict=True
    ):
        assert torch.equal(got, want)
    _, _, _, inverse = ops.group_by_expert(ids, 16)
    rows = torch.randn(160, 80, generator=gen).to(device)[:, ::2]  # every other column
    weights = torch.rand(4, 40, generator=gen).to(device).t()
    assert not rows.is_contiguous() and not weights.is_contiguous()
    got = ops.combine(rows, weights, inverse)
    want = reference.combine(rows.cpu(), weights.cpu(), inverse.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-6, atol=1e-6)
