"""cpu_expert equals OffloadedExperts' own expert math (the family's _apply_gate or act_fn,
biases, orientation) on an expert of each of the nine families, in float and packed formats."""

from __future__ import annotations

import types

import pytest
import torch

from expertflow.runtime.cpu_experts import cpu_expert_spec
from expertflow.runtime.expert_format import ExpertPacking, codec_for
from expertflow.runtime.experts import expert_tensors, find_experts_modules
from expertflow.runtime.offloaded import OffloadedExperts

pytest.importorskip("transformers")

from tests.modules.test_offload import FAMILIES, build  # noqa: E402


def _offloaded_math(module):
    """An object whose ``run(x, tensors)`` is OffloadedExperts._run_expert for ``module``."""
    shim = types.SimpleNamespace(
        has_bias=bool(module.has_bias),
        has_gate=bool(module.has_gate),
        is_transposed=bool(module.is_transposed),
        has_post_expert_norm=False,
        act_fn=getattr(module, "act_fn", None),
        _gate=type(module)._apply_gate,
        _gate_owner=(module,),
    )
    shim._linear = types.MethodType(OffloadedExperts._linear, shim)
    return lambda x, tensors: OffloadedExperts._run_expert(shim, x, tensors)


def _formats(family):
    return ["auto", "int8", "int4", "fp8"] + (["mxfp4"] if family == "gpt_oss" else [])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_expert_math(family):
    model = build(family)
    name, module = find_experts_modules(model)[0]
    spec = cpu_expert_spec(name, module)
    math = _offloaded_math(module)
    hidden = model.config.hidden_size
    gen = torch.Generator().manual_seed(7)
    for fmt in _formats(family):
        packing = ExpertPacking(name, module, codec_for(fmt))
        for expert in (0, module.num_experts - 1):
            # The store holds each packed tensor contiguous (packing GPT-OSS's transposed
            # weights gives transposed views).
            packed = [t.contiguous() for t in packing.pack(expert_tensors(module, expert))]
            for tokens in (1, 3, 16):
                x = torch.randn(tokens, hidden, generator=gen)
                with torch.no_grad():
                    want = math(x, packing.unpack(packed))
                got = spec.run(x, packed, packing)
                torch.testing.assert_close(
                    got, want, rtol=1e-5, atol=1e-5, msg=f"{family} {fmt} T={tokens}"
                )


def test_family_activations():
    kinds = {
        f: cpu_expert_spec("m", find_experts_modules(build(f))[0][1]).activation for f in FAMILIES
    }
    assert kinds["gpt_oss"] == "gpt_oss"
    assert all(kinds[f] == "silu_gated" for f in FAMILIES if f != "gpt_oss")


def test_ungated_nemotron_h_experts():
    """Nemotron-H's experts have no gate (``has_gate=False``): ``down(relu(up(x))^2)``."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

    config = transformers.NemotronHConfig(
        hidden_size=64, moe_intermediate_size=40, n_routed_experts=4, num_hidden_layers=2
    )
    torch.manual_seed(0)
    module = NemotronHExperts(config)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.2)
    spec = cpu_expert_spec("experts", module)
    assert spec.activation == "relu2"
    math = _offloaded_math(module)
    for fmt in ("auto", "int8", "int4", "fp8"):
        packing = ExpertPacking("experts", module, codec_for(fmt))
        packed = [t.contiguous() for t in packing.pack(expert_tensors(module, 1))]
        x = torch.randn(3, 64)
        with torch.no_grad():
            want = math(x, packing.unpack(packed))
        torch.testing.assert_close(spec.run(x, packed, packing), want, rtol=1e-5, atol=1e-5)


def test_unsupported_gating_is_refused_naming_the_module():
    model = build("mixtral")
    name, module = find_experts_modules(model)[0]

    class OwnGate(type(module)):
        def _apply_gate(self, gate_up):
            return gate_up[..., ::2]

    module.__class__ = OwnGate
    with pytest.raises(ValueError, match=f"{name}.*OwnGate._apply_gate"):
        cpu_expert_spec(name, module)
