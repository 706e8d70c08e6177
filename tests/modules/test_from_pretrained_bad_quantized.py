"""from_pretrained() refusals around quantized checkpoints: unsupported quantization_configs and
expert formats a checkpoint cannot give (before any weight is read), and damaged fp8 / mxfp4
codes and scales (from the headers where the shape or dtype tells, else while streaming),
each a ValueError naming the tensor or argument."""

from __future__ import annotations

import json

import pytest
import torch

import expertflow
from expertflow.runtime.checkpoint import Shard
from tests.modules.test_from_pretrained_quantized import (
    build_float,
    fp8_checkpoint,
    mxfp4_checkpoint,
    write_checkpoint,
)

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

EXPERT = "model.layers.0.block_sparse_moe.experts.3"
ATTN = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def no_reads(monkeypatch):
    """Fails the test if any tensor's data is read."""

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(Shard, "read_into", refuse)


def load(folder, **kwargs):
    return expertflow.from_pretrained(folder, device="cpu", slots=4, **kwargs)


REFUSED = {
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "awq": {"quant_method": "awq", "bits": 4, "version": "gemm"},
    "bitsandbytes": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    "compressed-tensors": {"quant_method": "compressed-tensors", "config_groups": {}},
    "fbgemm_fp8": {"quant_method": "fbgemm_fp8"},
    "no method": {"bits": 4},
    "fp8 e5m2": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]},
    "fp8 static": {
        "quant_method": "fp8",
        "activation_scheme": "static",
        "weight_block_size": [128, 128],
    },
    "fp8 per tensor": {"quant_method": "fp8", "fmt": "e4m3"},
    "fp8 bad block": {"quant_method": "fp8", "weight_block_size": [128, 0]},
}
REFUSED_WHAT = {
    "no method": "quant_method None",
    "fp8 e5m2": "fmt 'e5m2'",
    "fp8 static": "activation_scheme 'static'",
    "fp8 per tensor": "no weight_block_size",
    "fp8 bad block": r"weight_block_size \[128, 0\]",
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_unsupported_quantization_refused_before_reading(name, tmp_path, no_reads):
    tensors = build_float("qwen3_moe", tmp_path)
    folder = write_checkpoint(tmp_path / "q", tensors, REFUSED[name], tmp_path / "float")
    what = REFUSED_WHAT.get(name, f"quant_method '{name}'")
    with pytest.raises(ValueError, match=f"{what}.*supported: fp8 .*mxfp4") as info:
        load(folder)
    assert "config.json" in str(info.value)


@pytest.mark.parametrize("expert_format", ["int8", "int4", "mxfp4"])
def test_fp8_checkpoint_gives_fp8_only(expert_format, tmp_path, no_reads):
    folder, _ = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=1)
    with pytest.raises(
        ValueError, match=f"expert_format='{expert_format}' cannot .* ship as fp8.*'auto' or 'fp8'"
    ):
        load(folder, expert_format=expert_format)


@pytest.mark.parametrize("expert_format", ["int8", "int4", "fp8"])
def test_mxfp4_checkpoint_gives_mxfp4_only(expert_format, tmp_path, no_reads):
    folder, _ = mxfp4_checkpoint(tmp_path, shards=1)
    with pytest.raises(
        ValueError, match=f"expert_format='{expert_format}' cannot .* ship as mxfp4.*'mxfp4'"
    ):
        load(folder, expert_format=expert_format)


def edited(folder, change):
    """The single-shard checkpoint in ``folder`` with ``change(tensors)`` applied."""
    weights = folder / "model.safetensors"
    tensors = safetensors_torch.load_file(weights)
    change(tensors)
    safetensors_torch.save_file(tensors, weights, {"format": "pt"})
    return folder


def rewrite_header(file, change) -> None:
    """Edits a safetensors file's JSON header in place (the data left as it is)."""
    raw = file.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    change(header)
    text = json.dumps(header).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + size :])


def set_value(key, value):
    def change(tensors):
        assert key in tensors
        tensors[key] = value

    return change


def drop(key):
    def change(tensors):
        del tensors[key]

    return change


def nan_at(key, value=float("nan")):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = value

    return change


FP8_BAD = {
    # shape and dtype: refused from the headers, before any read
    "expert scale shape": (
        set_value(f"{EXPERT}.w1.weight_scale_inv", torch.ones(1, 1)),
        rf"{EXPERT}.w1.weight_scale_inv has shape \[1, 1\], expected \[2, 1\]",
        True,
    ),
    "expert scale dtype": (
        set_value(f"{EXPERT}.w2.weight_scale_inv", torch.ones(1, 2, dtype=torch.bfloat16)),
        rf"{EXPERT}.w2.weight_scale_inv has dtype BF16, expected torch.float32",
        True,
    ),
    "expert codes dtype": (
        set_value(f"{EXPERT}.w3.weight", torch.ones(48, 32, dtype=torch.int8)),
        rf"{EXPERT}.w3.weight has dtype I8, expected a float dtype",
        True,
    ),
    "attention scale shape": (
        set_value(f"{ATTN}.weight_scale_inv", torch.ones(2, 2)),
        rf"{ATTN}.weight_scale_inv has shape \[2, 2\], expected \[1, 1\]",
        True,
    ),
    "attention scale dtype": (
        set_value(f"{ATTN}.weight_scale_inv", torch.ones(1, 1, dtype=torch.float16)),
        rf"{ATTN}.weight_scale_inv has dtype F16, expected F32",
        True,
    ),
    # values: refused while streaming
    "expert scale nan": (
        nan_at(f"{EXPERT}.w1.weight_scale_inv"),
        rf"fp8 scale tensor {EXPERT}.w1.weight_scale_inv has NaN or inf",
        False,
    ),
    "attention scale inf": (
        nan_at(f"{ATTN}.weight_scale_inv", float("inf")),
        rf"fp8 scale tensor {ATTN}.weight_scale_inv has NaN or inf",
        False,
    ),
    "attention scale missing": (
        drop(f"{ATTN}.weight_scale_inv"),
        rf"fp8 tensor {ATTN}.weight has no pair .*{ATTN}.weight_scale_inv is missing",
        False,
    ),
    "attention weight missing": (
        drop(f"{ATTN}.weight"),
        rf"fp8 tensor {ATTN}.weight_scale_inv has no pair .*its weight {ATTN}.weight is",
        False,
    ),
    "expert scale missing": (
        drop(f"{EXPERT}.w2.weight_scale_inv"),
        r"lacks experts \[3\] of model.layers.0.mlp.experts.down_proj \(its scales\)",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(FP8_BAD))
def test_damaged_fp8_checkpoints(name, tmp_path, monkeypatch):
    change, message, before_reading = FP8_BAD[name]
    folder, _ = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=1)
    edited(folder, change)
    if before_reading:
        monkeypatch.setattr(Shard, "read_into", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=message):
        load(folder)


def test_fp8_pairs_across_shards_and_a_corrupt_scale_header(tmp_path):
    folder, _ = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=3)
    load(folder)  # weights and their scales dealt to different shards: paired all the same
    file = sorted(folder.glob("*.safetensors"))[0]
    scale = next(k for k in safetensors_torch.load_file(file) if k.endswith("_scale_inv"))

    def corrupt(header):  # the shape no longer matches the bytes the entry spans
        header[scale]["shape"] = [header[scale]["shape"][0] + 1, header[scale]["shape"][1]]

    rewrite_header(file, corrupt)
    with pytest.raises(ValueError, match=rf"tensor {scale} has data_offsets .* but shape"):
        load(folder)


def test_truncated_file_names_the_cut_tensor(tmp_path, no_reads):
    folder, _ = fp8_checkpoint("mixtral", tmp_path, (32, 32), shards=1)
    file = folder / "model.safetensors"
    raw = file.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    header.pop("__metadata__", None)
    last = max(header, key=lambda k: header[k]["data_offsets"])
    file.write_bytes(raw[:-2])
    with pytest.raises(ValueError, match=rf"is truncated: .*cut: {last}"):
        load(folder)


MXFP4_BAD = {
    "scale nan": (
        nan_at("model.layers.1.mlp.experts.down_proj_scales", 0xFF),
        r"mxfp4 scale tensor model.layers.1.mlp.experts.down_proj_scales has NaN scales \(0xFF\)",
        False,
    ),
    "scale shape": (
        set_value(
            "model.layers.0.mlp.experts.gate_up_proj_scales",
            torch.ones(8, 64, 2, dtype=torch.uint8),
        ),
        r"gate_up_proj_scales has shape \[64, 2\] per expert, expected \[64, 1\]",
        True,
    ),
    "scale dtype": (
        set_value(
            "model.layers.0.mlp.experts.down_proj_scales", torch.ones(8, 32, 1, dtype=torch.int8)
        ),
        r"down_proj_scales has dtype I8, expected torch.uint8",
        True,
    ),
    "blocks shape": (
        set_value(
            "model.layers.0.mlp.experts.down_proj_blocks",
            torch.ones(8, 32, 1, 8, dtype=torch.uint8),
        ),
        r"down_proj_blocks has shape \[32, 1, 8\] per expert, expected \[32, 1, 16\]",
        True,
    ),
    "scales missing": (
        drop("model.layers.1.mlp.experts.gate_up_proj_scales"),
        r"lacks experts \[0, 1, .*\] of model.layers.1.mlp.experts.gate_up_proj \(its scales\)",
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(MXFP4_BAD))
def test_damaged_mxfp4_checkpoints(name, tmp_path, monkeypatch):
    change, message, before_reading = MXFP4_BAD[name]
    folder, _ = mxfp4_checkpoint(tmp_path, shards=1)
    edited(folder, change)
    if before_reading:
        monkeypatch.setattr(Shard, "read_into", lambda *a, **k: pytest.fail("a tensor was read"))
    with pytest.raises(ValueError, match=message):
        load(folder)
