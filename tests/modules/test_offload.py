"""offload() on tiny random configs of transformers' MoE families: same logits, same tokens."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import expertflow
from expertflow.runtime.experts import find_experts_modules

transformers = pytest.importorskip("transformers")

COMMON = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=96,
    max_position_embeddings=64,
)

# family -> (config class, model class, config overrides)
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
        ),
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            moe_intermediate_size=24,
            intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2),
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_shared_experts=1,
            num_key_value_heads=4,
        ),
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_group=2,
            topk_group=1,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            n_shared_experts=1,
            num_key_value_heads=4,
        ),
    ),
    "phimoe": (
        "PhimoeConfig",
        "PhimoeForCausalLM",
        dict(intermediate_size=48, num_local_experts=8, num_experts_per_tok=2),
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=32,
            num_local_experts=8,
            num_experts_per_tok=2,
            head_dim=8,
            layer_types=["full_attention", "full_attention"],
        ),
    ),
}


def build(family: str, seed: int = 0):
    config_cls, model_cls, overrides = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random weights everywhere (some inits leave experts or biases zero)
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def build_mixtral_with_agreeing_layers():
    """Mixtral with both MoE layers given the same router and norms and nothing added to the
    residual stream by attention or by layer 0's experts: layer 1's router then sees exactly
    layer 0's router input, so gate lookahead must be exact."""
    model = build("mixtral")
    with torch.no_grad():
        first, second = model.model.layers
        second.mlp.gate.weight.copy_(first.mlp.gate.weight)
        for layer in (first, second):
            layer.self_attn.o_proj.weight.zero_()
            layer.post_attention_layernorm.weight.copy_(first.post_attention_layernorm.weight)
        first.mlp.experts.down_proj.zero_()
    return model


def batch():
    ids = torch.randint(1, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second sequence
    return ids, mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("policy", ["lru", "expertflow"])
@pytest.mark.parametrize("tight", [False, True])
def test_offloaded_model_matches(family, policy, tight):
    model = build(family)
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        want_tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    k = model.config.num_experts_per_tok
    layers = len(find_experts_modules(model))
    slots = layers * k if tight else layers * 8  # tightest legal: evictions every layer
    expertflow.offload(model, device="cpu", slots=slots, policy=policy)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
        got_tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    stats = model._expertflow.cache.stats()
    assert stats["misses"] > 0
    if tight:
        assert stats["evictions"] > 0
    expertflow.restore(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)


def test_bad_input():
    with pytest.raises(ValueError, match="has no MoE experts module"):
        expertflow.offload(torch.nn.Linear(3, 3), device="cpu", slots=4)
    model = build("mixtral")
    with pytest.raises(ValueError, match="exactly one of slots and gpu_memory"):
        expertflow.offload(model, device="cpu")
    with pytest.raises(ValueError, match="is below the minimum of"):
        expertflow.offload(model, device="cpu", gpu_memory="10KiB")
    with pytest.raises(ValueError, match="num_slots must be at least 4"):
        expertflow.offload(model, device="cpu", slots=3)
    with pytest.raises(ValueError, match="was not offloaded"):
        expertflow.restore(model)


def test_gpu_memory_budget_gives_slots():
    model = build("mixtral")
    expertflow.offload(model, device="cpu", gpu_memory="1GiB")
    cache = model._expertflow.cache
    assert cache.num_slots >= 16  # everything fits: 2 layers x 8 experts


def test_offload_twice_and_unsupported_layout():
    model = build("mixtral")
    expertflow.offload(model, device="cpu", slots=8)
    with pytest.raises(ValueError, match="already offloaded"):
        expertflow.offload(model, device="cpu", slots=8)
    other = build("mixtral")
    experts = other.model.layers[1].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj[:, :, :5].reshape(8, -1))
    with pytest.raises(
        ValueError,
        match=r"unsupported expert layout in model.layers.1.mlp.experts "
        r"\(MixtralExperts\): expected down_proj as a 3-D",
    ):
        expertflow.offload(other, device="cpu", slots=8)


def test_memory_report():
    model = build("mixtral")
    expert_bytes = sum(
        p.numel() * p.element_size()
        for _, m in find_experts_modules(model)
        for p in (m.gate_up_proj, m.down_proj)
    )
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    expertflow.offload(model, device="cpu", slots=4)
    report = expertflow.memory_report(model)
    assert report["resident_bytes"] >= total - expert_bytes  # buffers count too
    assert report["host_bytes"] >= expert_bytes  # plus 256-byte alignment
    assert report["slot_bytes"] == 4 * model._expertflow.cache.slot_bytes
    assert report["device_bytes"] == report["resident_bytes"] + report["slot_bytes"]
    assert 0 < report["saving_percent"] < 100
    with pytest.raises(ValueError, match="was not offloaded"):
        expertflow.memory_report(build("mixtral"))


class _FakeNvml(types.ModuleType):
    """Stands in for nvidia-ml-py: records the calls, serves one GPU by UUID."""

    class NVMLError(Exception):
        pass

    def __init__(self, uuid, fail_init=False):
        super().__init__("pynvml")
        self.uuid, self.fail_init, self.calls = uuid, fail_init, []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail_init:
            raise self.NVMLError("driver not loaded")

    def nvmlShutdown(self):
        self.calls.append("shutdown")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.calls.append(uuid)
        if uuid != f"GPU-{self.uuid}":
            raise self.NVMLError("not found")
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle):
        assert handle == "handle"
        return types.SimpleNamespace(used=3 << 30, total=141 << 30)


def test_device_totals_find_the_gpu_by_uuid_and_shut_nvml_down(monkeypatch):
    from expertflow.runtime.memory import _device_totals

    props = types.SimpleNamespace(uuid="58c5a5d5-0000-1111-2222-333344445555")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    nvml = _FakeNvml(props.uuid)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    totals = _device_totals(torch.device("cuda", 1))
    assert totals == {"device_used_bytes": 3 << 30, "device_total_bytes": 141 << 30}
    assert nvml.calls == ["init", f"GPU-{props.uuid}", "shutdown"]
    assert _device_totals(torch.device("cpu")) is None

    props.uuid = "another-gpu"  # NVML does not know it: no figures, NVML still shut down
    nvml.calls.clear()
    assert _device_totals(torch.device("cuda", 0)) is None
    assert nvml.calls[-1] == "shutdown"

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml(props.uuid, fail_init=True))
    assert _device_totals(torch.device("cuda", 0)) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert _device_totals(torch.device("cuda", 0)) is None


@pytest.mark.cuda
def test_memory_report_on_cuda_has_the_device_totals_from_nvml():
    pytest.importorskip("pynvml", reason="nvidia-ml-py is not installed")
    model = build("mixtral")
    expertflow.offload(model, device="cuda", slots=4)
    report = expertflow.memory_report(model)
    total = torch.cuda.get_device_properties(0).total_memory
    # NVML counts memory CUDA reserves for itself, so its total is at least CUDA's.
    assert total <= report["device_total_bytes"] <= 1.1 * total
    assert report["device_bytes"] <= report["device_used_bytes"] <= report["device_total_bytes"]


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_bf16_on_cuda_matches_the_model_fully_on_the_gpu(family):
    model = build(family).to(torch.bfloat16)
    ids, mask = batch()
    reference = build(family).to(torch.bfloat16).to("cuda")
    with torch.no_grad():
        want = reference(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float()
    layers = len(find_experts_modules(model))
    expertflow.offload(model, device="cuda", slots=layers * model.config.num_experts_per_tok)
    with torch.no_grad():
        got = model(input_ids=ids.cuda(), attention_mask=mask.cuda()).logits.float()
    # bf16: combine sums in fp32 where the eager experts sum in bf16.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert model._expertflow.cache.host_pinned
