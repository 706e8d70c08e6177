"""from_pretrained(expert_format=...) of float checkpoints: each expert quantized while the
shards stream in, to exactly what offload(float model, expert_format=...) packs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import expertflow
from expertflow import formats
from tests.modules.test_from_pretrained import write_big_mixtral
from tests.modules.test_from_pretrained_quantized import assert_close, build_float, logits
from tests.modules.test_offload import COMMON, FAMILIES

transformers = pytest.importorskip("transformers")


def float_model(family: str, **overrides):
    config_cls, model_cls, base = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **base, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def assert_same_store(a, b) -> None:
    ca, cb = a._expertflow.cache, b._expertflow.cache
    assert ca.host_bytes == cb.host_bytes and ca.slot_bytes == cb.slot_bytes
    layers = len(a._expertflow.originals)
    for layer in range(layers):
        experts = a._expertflow.originals[layer][2].num_experts
        for e in range(experts):
            for x, y in zip(ca.host_expert(layer, e), cb.host_expert(layer, e), strict=True):
                assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


CASES = [
    ("mixtral", "int8", None, {}),  # gate and up from w1 and w3: rows packed apart
    ("mixtral", "int4", None, {}),
    ("mixtral", "int4", 16, {}),
    ("gpt_oss", "int8", None, {}),  # transposed [E, in, out] stacks
    ("gpt_oss", "int4", 8, {}),
    ("gpt_oss", "mxfp4", None, {}),
    ("gpt_oss", "fp8", None, {}),  # whole stacks: one chunk, as offload packs
    ("qwen3_moe", "int4", None, {}),
    ("deepseek_v3", "int8", None, {}),
    ("mixtral", "mxfp4", None, dict(intermediate_size=64)),
]


@pytest.mark.parametrize(("family", "expert_format", "group_size", "overrides"), CASES)
def test_quantized_on_load_equals_offload(family, expert_format, group_size, overrides, tmp_path):
    model = float_model(family, **overrides)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # experts split across shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    slots = model.config.num_hidden_layers * model.config.num_experts_per_tok
    kwargs = dict(device="cpu", slots=slots, policy="lru", expert_format=expert_format)
    kwargs["group_size"] = group_size
    loaded = expertflow.from_pretrained(tmp_path, dtype=torch.float32, **kwargs)
    want = expertflow.offload(float_model(family, **overrides), **kwargs)
    assert_same_store(loaded, want)
    assert torch.equal(logits(loaded), logits(want))
    report = expertflow.memory_report(loaded)
    assert report["expert_format"] == expertflow.memory_report(want)["expert_format"]
    assert report["expert_format"].startswith(expert_format)


def test_fp8_on_load_packs_gate_and_up_apart(tmp_path):
    """Mixtral's w1 and w3 (48 rows each, 32-row tiles) are packed each on its own: the model
    computes with each part's own fp8 round trip."""
    model = float_model("mixtral")
    model.save_pretrained(tmp_path)
    loaded = expertflow.from_pretrained(
        tmp_path, device="cpu", dtype=torch.float32, slots=4, expert_format="fp8"
    )
    assert expertflow.memory_report(loaded)["expert_format"] == "fp8"
    block = (128, 128)

    def round_trip(w):
        return formats.dequantize_fp8_block(*formats.quantize_fp8_block(w, block), block, w.dtype)

    with torch.no_grad():
        for layer in model.model.layers:
            experts = layer.mlp.experts
            for e in range(experts.num_experts):
                gate, up = experts.gate_up_proj[e].chunk(2)
                experts.gate_up_proj[e] = torch.cat([round_trip(gate), round_trip(up)])
                experts.down_proj[e] = round_trip(experts.down_proj[e])
    assert_close(logits(loaded), logits(model))


def test_int4_group_size_for_float_checkpoints(tmp_path):
    build_float("qwen3_moe", tmp_path)
    with pytest.raises(ValueError, match="group_size=5 does not divide the input size 32"):
        expertflow.from_pretrained(
            tmp_path / "float", device="cpu", slots=4, expert_format="int4", group_size=5
        )
    with pytest.raises(ValueError, match="group_size applies to expert_format='int4' only"):
        expertflow.from_pretrained(tmp_path / "float", device="cpu", slots=4, group_size=8)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, expertflow
    from pathlib import Path

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    path, fmt, tiny = sys.argv[1], sys.argv[2], sys.argv[3]
    # Warm every code path on a tiny checkpoint so imports do not count as loading.
    expertflow.from_pretrained(tiny, device="cpu", slots=4, expert_format=fmt)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = rss("VmRSS:")
    model = expertflow.from_pretrained(path, device="cpu", slots=8, expert_format=fmt)
    cache = model._expertflow.cache
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": rss("VmHWM:") - base, "experts": cache.host_bytes,
                      "resident": resident}))
    """
)


@pytest.mark.slow
def test_peak_host_memory_stays_near_the_packed_expert_bytes(tmp_path):
    """int4 quantized while streaming: the float experts (~100 MiB) never on the host, the
    peak within 1.2 x the packed experts plus one shard (and, on the CPU, the resident
    weights)."""
    shard = write_big_mixtral(tmp_path / "big")
    float_model("mixtral").save_pretrained(tmp_path / "tiny")
    args = [str(tmp_path / "big"), "int4", str(tmp_path / "tiny")]
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *args], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 1.2 * r["experts"] + shard + r["resident"]
    print(
        f"peak {r['peak'] / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB, packed experts "
        f"{r['experts'] / 2**20:.1f} MiB (float: 96 MiB)"
    )
    assert r["experts"] < 20 * 2**20  # int4 of 96 MiB of float32 experts
    assert r["peak"] <= bound
