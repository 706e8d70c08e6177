"""offload(expert_format=...): experts packed in the store and the slots, expanded per use.

The exact check: an offloaded model in a quantized format gives the logits of the float model
whose experts were replaced by the format's round trip (the formats' plain-torch references),
whatever the cache evicts. The loose check: how far each format is from the float model on
these tiny random models (stated bounds, far above what trained weights show: README
"Quantized experts")."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import expertflow
from expertflow import formats
from expertflow.runtime.experts import expert_param_names, find_experts_modules

from .test_offload import FAMILIES, batch, build

pytest.importorskip("transformers")

# Relative error (Frobenius) of the logits against the float model, on FAMILIES' random
# weights (normal, std 0.2): int4's groups there are as small as 8 columns.
BOUNDS = {"int8": 0.01, "int4": 0.15, "fp8": 0.05, "mxfp4": 0.3}


def _round_trip(w: torch.Tensor, fmt: str, group: int) -> torch.Tensor:
    """``w`` ([out, in] float32) through the format's references."""
    if fmt == "int8":
        return formats.dequantize_int8(*formats.quantize_int8(w), torch.float32)
    if fmt == "int4":
        return formats.dequantize_int4(*formats.quantize_int4(w, group), group, torch.float32)
    if fmt == "fp8":
        return formats.dequantize_fp8_block(*formats.quantize_fp8_block(w), dtype=torch.float32)
    return formats.dequantize_mxfp4(*formats.quantize_mxfp4(w), torch.float32)


def _quantize_in_place(model: nn.Module, fmt: str, group_size: int | None) -> None:
    """The float model's experts replaced by their round trip through ``fmt``."""
    with torch.no_grad():
        for _, m in find_experts_modules(model):
            for name in expert_param_names(m):
                if name.endswith("_bias"):
                    continue
                stack = getattr(m, name)
                for e in range(stack.shape[0]):
                    w = stack[e].t() if m.is_transposed else stack[e]
                    group = group_size or math.gcd(w.shape[1], 64)
                    q = _round_trip(w.float(), fmt, group)
                    stack[e].copy_(q.t() if m.is_transposed else q)


def _logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _formats_for(family: str) -> list[str]:
    # mxfp4 needs input sizes that are multiples of 32: only GPT-OSS's tiny config has them.
    return ["int8", "int4", "fp8"] + (["mxfp4"] if family == "gpt_oss" else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_in_every_format_matches_its_round_trip(family):
    float_logits = _logits(build(family))
    for fmt in _formats_for(family):
        reference = build(family)
        _quantize_in_place(reference, fmt, None)
        want = _logits(reference)
        model = build(family)
        k = model.config.num_experts_per_tok
        layers = len(find_experts_modules(model))
        # The tightest legal cache: every layer evicts.
        expertflow.offload(model, device="cpu", slots=layers * k, expert_format=fmt)
        got = _logits(model)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"{family} {fmt}")
        stats = model._expertflow.cache.stats()
        assert stats["evictions"] > 0
        error = float((got - float_logits).norm() / float_logits.norm())
        assert error < BOUNDS[fmt], f"{family} {fmt}: relative logits error {error:.4f}"


@pytest.mark.parametrize("group_size", [8, 16])
def test_int4_group_size_is_used(group_size):
    reference = build("mixtral")
    _quantize_in_place(reference, "int4", group_size)
    model = build("mixtral")
    expertflow.offload(model, device="cpu", slots=4, expert_format="int4", group_size=group_size)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    up = model._expertflow.cache.host_expert(0, 0)[1]  # gate_up's scales [out, in / group]
    assert up.shape == (2 * 48, 32 // group_size)


def test_packed_bytes_shrink_the_store_and_the_copies():
    """Host bytes and bytes copied per step follow the format (large enough experts that the
    256-byte alignment of each tensor does not dominate)."""
    overrides = dict(hidden_size=256, intermediate_size=512, vocab_size=96)
    sizes, copied = {}, {}
    for fmt in ("auto", "int8", "int4"):
        model = _mixtral(overrides)
        expertflow.offload(model, device="cpu", slots=4, expert_format=fmt)
        report = expertflow.memory_report(model)
        assert report["expert_format"] == {"auto": "float"}.get(fmt, fmt)
        sizes[fmt] = report["host_bytes"]
        assert report["slot_bytes"] == 4 * model._expertflow.cache.slot_bytes
        _logits(model)
        copied[fmt] = model._expertflow.cache.stats()["bytes_copied"]
    # float32 -> int8 (+ one float32 scale a row) and int4 (+ one scale per 64 columns)
    assert 0.25 < sizes["int8"] / sizes["auto"] < 0.26
    assert 0.140 < sizes["int4"] / sizes["auto"] < 0.142  # (0.5 + 4 / 64) / 4
    assert copied["int8"] / copied["auto"] == pytest.approx(sizes["int8"] / sizes["auto"])
    assert copied["int4"] / copied["auto"] == pytest.approx(sizes["int4"] / sizes["auto"])


def _mixtral(overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, num_local_experts=8, num_experts_per_tok=2, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model


def test_gpu_memory_budgets_the_packed_slot_size():
    sizes = {}
    for fmt in ("auto", "int4"):
        model = build("mixtral")
        expertflow.offload(model, device="cpu", gpu_memory="140KiB", expert_format=fmt)
        sizes[fmt] = model._expertflow.cache.num_slots
    assert sizes["int4"] > sizes["auto"]


def test_restore_gives_the_quantized_experts_back_as_floats():
    reference = build("qwen3_moe")
    _quantize_in_place(reference, "int8", None)
    model = build("qwen3_moe")
    expertflow.offload(model, device="cpu", slots=4, expert_format="int8")
    expertflow.restore(model)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    for (_, m), (_, r) in zip(
        find_experts_modules(model), find_experts_modules(reference), strict=True
    ):
        assert not m.down_proj.is_meta
        torch.testing.assert_close(m.down_proj, r.down_proj, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(expert_format="int3"), "expert_format must be one of"),
        (dict(expert_format=4), "expert_format must be one of"),
        (dict(expert_format="int8", group_size=32), "group_size applies to expert_format='int4'"),
        (dict(expert_format="int4", group_size=0), "group_size must be a positive int"),
        (dict(expert_format="int4", group_size=2.0), "group_size must be a positive int"),
        (dict(expert_format="int4", group_size=64), "group_size=64 does not divide"),
        (dict(expert_format="mxfp4"), "is not a multiple of 32"),
    ],
)
def test_bad_formats_are_refused_naming_them_and_the_model_kept(kwargs, match):
    model = build("mixtral")
    want = _logits(model)
    with pytest.raises(ValueError, match=match):
        expertflow.offload(model, device="cpu", slots=4, **kwargs)
    assert not hasattr(model, "_expertflow")
    torch.testing.assert_close(_logits(model), want, rtol=0, atol=0)


def test_experts_already_quantized_are_refused_naming_the_class():
    model = build("mixtral")
    experts = model.model.layers[0].mlp.experts
    q, scale = formats.quantize_fp8_block(experts.down_proj[0].detach())
    experts.down_proj = nn.Parameter(q[None].repeat(8, 1, 1), requires_grad=False)
    experts.down_proj_scale_inv = nn.Parameter(scale[None].repeat(8, 1, 1), requires_grad=False)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.experts \(MixtralExperts\) are "):
        expertflow.offload(model, device="cpu", slots=4)


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "mxfp4"])
def test_on_cuda_slots_hold_packed_bytes_and_expand_on_the_gpu(fmt):
    """fp32 on the GPU against the round-trip model on the GPU: the slot's bytes are expanded
    by the CUDA kernels."""
    family = "gpt_oss" if fmt == "mxfp4" else "mixtral"
    reference = build(family)
    _quantize_in_place(reference, fmt, None)
    ids, mask = batch()
    with torch.no_grad():
        want = reference.to("cuda")(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    model = build(family)
    layers = len(find_experts_modules(model))
    slots = layers * model.config.num_experts_per_tok
    expertflow.offload(model, device="cuda", slots=slots, expert_format=fmt)
    with torch.no_grad():
        got = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model._expertflow.cache.host_pinned
    assert model._expertflow.cache.stats()["evictions"] > 0
