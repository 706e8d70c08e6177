"""from_pretrained() of checkpoints shipped quantized: GPT-OSS's MXFP4 experts and block FP8
(DeepSeek-V3 / Qwen3-*-FP8 per-expert gate/up/down, Mixtral-style w1/w2/w3) kept as shipped in
the host store, the FP8 attention and shared experts dequantized on load.

The tests write the checkpoints themselves from tiny random models: a float checkpoint by
``save_pretrained``, then each expert (and, for fp8, each linear) weight quantized with the
reference formats into the shipped layout, plus the same checkpoint dequantized back to floats,
which transformers loads as the reference."""

from __future__ import annotations

import json
import re

import pytest
import torch

import expertflow
from expertflow import formats
from expertflow.runtime.experts import find_experts_modules
from tests.modules.test_offload import COMMON, FAMILIES, batch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

FP8_LINEAR = re.compile(r"(_proj(_with_mqa)?|\.w[123])\.weight$")
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}


def fp8_config(block=(128, 128)):
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": list(block),
        "activation_scheme": "dynamic",
    }


def build_float(family: str, tmp_path, seed: int = 0, **overrides):
    """A tiny random model of ``family`` saved as a float checkpoint; returns its tensors."""
    config_cls, model_cls, base = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **base, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path / "float")
    return safetensors_torch.load_file(tmp_path / "float" / "model.safetensors")


def write_checkpoint(folder, tensors: dict, qc: dict | None, config_from, shards: int = 1):
    """``tensors`` as ``shards`` safetensors files (keys dealt in turn, so that a weight and
    its scale land in different shards) with ``config_from``'s config.json plus ``qc``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((config_from / "config.json").read_text())
    if qc is not None:
        config["quantization_config"] = qc
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        safetensors_torch.save_file(tensors, folder / "model.safetensors", {"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[i::shards]}
        safetensors_torch.save_file(part, folder / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def mxfp4_checkpoint(tmp_path, shards: int = 2, **overrides):
    """GPT-OSS with MXFP4 experts (``*_blocks`` / ``*_scales``, ``[E, out, ...]``) and bf16
    rest; returns (quantized folder, dequantized float folder)."""
    tensors = build_float("gpt_oss", tmp_path, **overrides)
    packed, floats = {}, {}
    for key, value in tensors.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = formats.quantize_mxfp4(value.transpose(1, 2))  # [E, out, in]
            packed[f"{key}_blocks"], packed[f"{key}_scales"] = blocks, scales
            floats[key] = formats.dequantize_mxfp4(blocks, scales, torch.float32)
            floats[key] = floats[key].transpose(1, 2).contiguous()
        else:
            packed[key] = value.to(torch.bfloat16)
            floats[key] = packed[key].float()
    float_dir = tmp_path / "float"
    write_checkpoint(tmp_path / "deq", floats, None, float_dir)
    return write_checkpoint(tmp_path / "mxfp4", packed, MXFP4_CONFIG, float_dir, shards), (
        tmp_path / "deq"
    )


def fp8_checkpoint(family: str, tmp_path, block, shards: int = 2, **overrides):
    """``family`` with every linear weight (experts, attention, shared experts) in block fp8
    plus ``weight_scale_inv``, the rest bf16; returns (quantized folder, dequantized one)."""
    tensors = build_float(family, tmp_path, **overrides)
    packed, floats = {}, {}
    for key, value in tensors.items():
        if FP8_LINEAR.search(key) and value.dim() == 2:
            weight, scale = formats.quantize_fp8_block(value, block)
            packed[key], packed[f"{key}_scale_inv"] = weight, scale
            floats[key] = formats.dequantize_fp8_block(weight, scale, block, torch.float32)
        else:
            packed[key] = value.to(torch.bfloat16)
            floats[key] = packed[key].float()
    assert any(".experts.0." in k and k.endswith("_scale_inv") for k in packed)
    float_dir = tmp_path / "float"
    write_checkpoint(tmp_path / "deq", floats, None, float_dir)
    folder = write_checkpoint(tmp_path / "fp8", packed, fp8_config(block), float_dir, shards)
    return folder, tmp_path / "deq"


def reference(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]


def assert_close(got, want, rel=1e-5):
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err <= rel, err


def expert_bytes(folder, pattern: str) -> int:
    """Bytes of the checkpoint's expert tensors matching ``pattern``."""
    total = 0
    for file in folder.glob("*.safetensors"):
        for key, value in safetensors_torch.load_file(file).items():
            if re.search(pattern, key):
                total += value.numel() * value.element_size()
    return total


def load(folder, **kwargs):
    kwargs = {"device": "cpu", "dtype": torch.float32, "policy": "lru", **kwargs}
    return expertflow.from_pretrained(folder, **kwargs)


def tight_slots(model) -> int:
    """The tightest per-layer budget: top_k slots per MoE layer."""
    return len(find_experts_modules(model)) * model.config.num_experts_per_tok


@pytest.mark.parametrize("expert_format", ["auto", "mxfp4"])
def test_gpt_oss_mxfp4_kept_as_shipped(expert_format, tmp_path):
    folder, deq = mxfp4_checkpoint(tmp_path)
    want = reference(deq)
    model = load(folder, slots=tight_slots(want), expert_format=expert_format)
    assert_close(logits(model), logits(want))
    report = expertflow.memory_report(model)
    assert report["expert_format"] == "mxfp4"
    packed = expert_bytes(folder, r"experts\.\w+_(blocks|scales)$")
    biases = expert_bytes(deq, r"experts\.\w+_bias$")  # kept in the compute dtype
    floats = expert_bytes(deq, r"experts\.\w+$")
    slack = 256 * 6 * 8 * 2  # each stored tensor aligned to 256 bytes: 6 per expert
    assert packed + biases <= report["host_bytes"] <= packed + biases + slack
    assert report["host_bytes"] < 0.4 * floats
    # the shipped bytes are in the store as they were
    blocks = safetensors_torch.load_file(next(folder.glob("*.safetensors")))
    cache = model._expertflow.cache
    for key, value in blocks.items():
        if key.endswith("_blocks") and ".layers.0." in key:
            position = 0 if "gate_up" in key else 3  # gate_up blocks, scales, bias, down ...
            for e in range(value.shape[0]):
                assert torch.equal(cache.host_expert(0, e)[position], value[e])


FP8_CASES = {
    # DeepSeek-V3 layout: per-expert gate/up/down, fp8 attention (MLA) and shared experts;
    # 48 rows in 32-row tiles (partial tiles), a dense first layer in fp8 too.
    "deepseek_v3": (
        (32, 32),
        dict(num_hidden_layers=3, first_k_dense_replace=1, moe_intermediate_size=48),
    ),
    # Qwen3-*-FP8: 128 x 128 tiles over a 160-row intermediate (one partial tile row).
    "qwen3_moe": ((128, 128), dict(moe_intermediate_size=160)),
    # Mixtral-style w1/w3/w2 experts.
    "mixtral": ((32, 32), dict(intermediate_size=48)),
}


@pytest.mark.parametrize("family", sorted(FP8_CASES))
def test_block_fp8_kept_as_shipped(family, tmp_path):
    block, overrides = FP8_CASES[family]
    folder, deq = fp8_checkpoint(family, tmp_path, block, **overrides)
    want = reference(deq)
    model = load(folder, slots=tight_slots(want))
    assert_close(logits(model), logits(want))
    report = expertflow.memory_report(model)
    assert report["expert_format"] == "fp8"
    packed = expert_bytes(folder, r"\.experts\.\d+\.")
    floats = expert_bytes(deq, r"\.experts\.\d+\.")
    slack = 256 * 6 * 8 * want.config.num_hidden_layers  # tensors aligned to 256 bytes
    assert packed <= report["host_bytes"] <= packed + slack
    assert report["host_bytes"] < 0.4 * floats
    # the non-expert weights are the dequantized fp8 ones, in the compute dtype
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    same = expertflow.from_pretrained(
        folder, device="cpu", dtype=torch.float32, slots=tight_slots(want), expert_format="fp8"
    )
    assert torch.equal(logits(same), logits(model))


def test_fp8_store_holds_the_shipped_bytes(tmp_path):
    """Each expert's gate and up are kept as their own chunks (their partial tiles differ from
    the merged weight's): the store holds the shipped fp8 codes and scales byte for byte."""
    folder, _ = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=1, intermediate_size=48)
    model = load(folder, slots=4)
    shipped = safetensors_torch.load_file(folder / "model.safetensors")
    cache = model._expertflow.cache
    # expert tensors in the store: w1 codes, w1 scales, w3 codes, w3 scales, w2 codes, scales
    names = ["w1.weight", "w1.weight_scale_inv", "w3.weight", "w3.weight_scale_inv"]
    names += ["w2.weight", "w2.weight_scale_inv"]
    for layer in range(2):
        for e in range(8):
            stored = cache.host_expert(layer, e)
            for i, name in enumerate(names):
                key = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{name}"
                assert torch.equal(stored[i].view(torch.uint8), shipped[key].view(torch.uint8))


def test_from_config_ignores_quantization_config(tmp_path):
    """transformers' from_config does not apply a quantization_config (only from_pretrained
    runs its quantizers); from_pretrained drops it from the model's config all the same."""
    folder, deq = fp8_checkpoint("qwen3_moe", tmp_path, (128, 128), moe_intermediate_size=160)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert config.quantization_config["quant_method"] == "fp8"
    built = transformers.AutoModelForCausalLM.from_config(config)
    names = {type(m).__name__.lower() for m in built.modules()}
    assert not any("fp8" in n or "mxfp4" in n for n in names), names
    assert all(p.is_floating_point() and p.dtype != torch.float8_e4m3fn for p in built.parameters())
    model = load(folder, slots=4)
    assert getattr(model.config, "quantization_config", None) is None


def test_deepseek_v3_mtp_layer_skipped(tmp_path):
    """DeepSeek-V3 ships a multi-token-prediction layer 61 (fp8 too) that transformers skips
    (``_keys_to_ignore_on_load_unexpected``): its weights and scales are skipped alike."""
    block, overrides = FP8_CASES["deepseek_v3"]
    folder, deq = fp8_checkpoint("deepseek_v3", tmp_path, block, shards=1, **overrides)
    tensors = safetensors_torch.load_file(folder / "model.safetensors")
    for key in list(tensors):
        if key.startswith("model.layers.1."):
            tensors[key.replace("model.layers.1.", "model.layers.61.")] = tensors[key].clone()
    assert "model.layers.61.mlp.experts.0.gate_proj.weight_scale_inv" in tensors
    assert "model.layers.61.self_attn.q_a_proj.weight_scale_inv" in tensors
    safetensors_torch.save_file(tensors, folder / "model.safetensors", {"format": "pt"})
    want = reference(deq)
    assert_close(logits(load(folder, slots=tight_slots(want))), logits(want))


def test_gpu_memory_budgets_the_shipped_slot_size_and_restore_expands(tmp_path):
    """The slots a gpu_memory budget buys are counted in packed bytes (about 4x more than for
    the same experts in float32); restore() gives the experts back expanded to floats."""
    folder, deq = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=1)
    want = reference(deq)
    budget = 185_000
    packed = load(folder, gpu_memory=budget, slots=None)
    floats = load(deq, gpu_memory=budget, slots=None)
    n_packed, n_float = (m._expertflow.cache.num_slots for m in (packed, floats))
    slot = packed._expertflow.cache.slot_bytes
    assert 4 <= n_float < n_packed <= 16
    assert slot < floats._expertflow.cache.slot_bytes / 3
    report = expertflow.memory_report(packed)
    assert report["resident_bytes"] + n_packed * slot <= budget
    expertflow.restore(packed)
    assert_close(logits(packed), logits(want))
