"""topk_gating reproduces the routers of the installed transformers' MoE families.

Each case builds the family's own router module from a tiny config with random weights, runs it
on random hidden states, and feeds the router logits it returns to expertflow.ops.topk_gating
with that family's preset. Ids must match exactly (except where the reference's own scores tie)
and weights to fp32 rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import torch

from expertflow import ops
from tests.ops.routing_checks import assert_same_routing

transformers = pytest.importorskip("transformers")


@dataclasses.dataclass
class Family:
    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    router: str
    config: Callable[[int, int, int], object]  # (hidden, experts, top_k) -> config
    kwargs: Callable[[object, torch.nn.Module], dict]  # (config, router) -> topk_gating kwargs
    ordered: bool = True  # False where the router uses topk(sorted=False)
    bias_attr: str | None = None


def _softmax_family(name, module, router, config_cls, experts_key, norm):
    def config(hidden, experts, top_k):
        cfg = getattr(transformers, config_cls)(
            hidden_size=hidden, num_experts_per_tok=top_k, **{experts_key: experts}
        )
        if norm is not None:
            cfg.norm_topk_prob = norm
        return cfg

    def kwargs(cfg, _router):
        return {"renormalize": bool(getattr(cfg, "norm_topk_prob", True))}

    return Family(name, module, router, config, kwargs)


def _deepseek_v2(norm_name: str):
    def config(hidden, experts, top_k):
        return transformers.DeepseekV2Config(
            hidden_size=hidden,
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=16.0,
        )

    def kwargs(cfg, _router):
        return {
            "renormalize": False,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "routed_scaling_factor": cfg.routed_scaling_factor,
        }

    return Family(norm_name, "deepseek_v2", "DeepseekV2TopkRouter", config, kwargs, ordered=False)


def _deepseek_v3_like(name, module, router, config_cls, norm):
    def config(hidden, experts, top_k):
        return getattr(transformers, config_cls)(
            hidden_size=hidden,
            n_routed_experts=experts,
            num_experts_per_tok=top_k,
            n_group=4,
            topk_group=2,
            norm_topk_prob=norm,
            routed_scaling_factor=2.5,
        )

    def kwargs(cfg, router):
        return {
            "scoring": "sigmoid",
            "correction_bias": router.e_score_correction_bias,
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "renormalize": cfg.norm_topk_prob,
            "routed_scaling_factor": cfg.routed_scaling_factor,
        }

    return Family(
        name, module, router, config, kwargs, ordered=False, bias_attr="e_score_correction_bias"
    )


def _gpt_oss():
    def config(hidden, experts, top_k):
        return transformers.GptOssConfig(
            hidden_size=hidden, num_local_experts=experts, num_experts_per_tok=top_k
        )

    return Family(
        "gpt_oss",
        "gpt_oss",
        "GptOssTopKRouter",
        config,
        lambda cfg, router: {"softmax_after_topk": True},
    )


FAMILIES = [
    _softmax_family(
        "mixtral", "mixtral", "MixtralTopKRouter", "MixtralConfig", "num_local_experts", None
    ),
    _softmax_family(
        "qwen2_moe", "qwen2_moe", "Qwen2MoeTopKRouter", "Qwen2MoeConfig", "num_experts", None
    ),
    _softmax_family(
        "qwen3_moe", "qwen3_moe", "Qwen3MoeTopKRouter", "Qwen3MoeConfig", "num_experts", None
    ),
    _softmax_family("olmoe", "olmoe", "OlmoeTopKRouter", "OlmoeConfig", "num_experts", False),
    _softmax_family("olmoe_norm", "olmoe", "OlmoeTopKRouter", "OlmoeConfig", "num_experts", True),
    _deepseek_v2("deepseek_v2"),
    _deepseek_v3_like(
        "deepseek_v3", "deepseek_v3", "DeepseekV3TopkRouter", "DeepseekV3Config", True
    ),
    _deepseek_v3_like(
        "deepseek_v3_no_norm", "deepseek_v3", "DeepseekV3TopkRouter", "DeepseekV3Config", False
    ),
    _deepseek_v3_like("glm4_moe", "glm4_moe", "Glm4MoeTopkRouter", "Glm4MoeConfig", True),
    _gpt_oss(),
]


def _router(family: Family, hidden: int, experts: int, top_k: int, gen: torch.Generator):
    module = __import__(
        f"transformers.models.{family.module}.modeling_{family.module}", fromlist=[family.router]
    )
    cfg = family.config(hidden, experts, top_k)
    router = getattr(module, family.router)(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen) / hidden**0.5 * 2)
        if getattr(router, "bias", None) is not None:
            router.bias.copy_(torch.randn(router.bias.shape, generator=gen))
        if family.bias_attr:
            # Realistic DeepSeek-V3 biases are small against sigmoid scores in (0, 1).
            getattr(router, family.bias_attr).copy_(torch.randn(experts, generator=gen) * 0.1)
    return cfg, router.eval()


def _reference_keys(family: Family, router, logits: torch.Tensor) -> torch.Tensor:
    """The scores the family's router selects on (to recognise its own ties)."""
    logits = logits.float()
    if family.bias_attr:
        return logits.sigmoid() + getattr(router, family.bias_attr)
    if family.name == "gpt_oss":
        return logits
    return logits.softmax(dim=-1)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
@pytest.mark.parametrize("tokens,experts,top_k", [(1, 8, 2), (64, 64, 6), (512, 128, 8)])
def test_matches_transformers_router(family, tokens, experts, top_k, gen):
    cfg, router = _router(family, 32, experts, top_k, gen)
    hidden_states = torch.randn(tokens, 32, generator=gen)
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden_states)
    ids, weights = ops.topk_gating(logits, top_k, **family.kwargs(cfg, router))
    assert_same_routing(
        ids,
        weights,
        ref_ids,
        ref_weights,
        _reference_keys(family, router, logits),
        key_rtol=1e-6,
        ordered=family.ordered,
    )


@pytest.mark.parametrize("family", [FAMILIES[0], FAMILIES[6]], ids=lambda f: f.name)
def test_matches_transformers_router_bf16(family, gen):
    cfg, router = _router(family, 64, 64, 6, gen)
    router = router.to(torch.bfloat16)
    hidden_states = torch.randn(256, 64, generator=gen).to(torch.bfloat16)
    with torch.no_grad():
        logits, ref_weights, ref_ids = router(hidden_states)
    ids, weights = ops.topk_gating(logits, 6, **family.kwargs(cfg, router))
    # The routers score in fp32 from the (bf16 or fp32) logits, as topk_gating does.
    assert_same_routing(
        ids,
        weights,
        ref_ids,
        ref_weights.float(),
        _reference_keys(family, router, logits),
        key_rtol=1e-6,
        ordered=family.ordered,
    )
