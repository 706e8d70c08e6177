"""from_pretrained(): a save_pretrained checkpoint streamed into an offloaded model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import expertflow
from tests.modules.test_offload import FAMILIES, batch, build

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sharded_checkpoint_loads_with_the_same_outputs(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # several shards, experts split
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    slots = 2 * model.config.num_hidden_layers  # the tightest legal per-layer budget
    loaded = expertflow.from_pretrained(tmp_path, device="cpu", slots=slots, policy="lru")
    ids, mask = batch()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        got = loaded(input_ids=ids, attention_mask=mask).logits
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        want_tokens = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        got_tokens = loaded.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert (got - expected)[mask.bool()].abs().max().item() <= 1e-5
    assert torch.equal(got_tokens, want_tokens)
    assert not any(p.is_meta for p in loaded.parameters())
    report = expertflow.memory_report(loaded)
    assert report["slot_bytes"] == slots * loaded._expertflow.cache.slot_bytes


def test_dtype_and_gpu_memory_budget(tmp_path):
    model = build("qwen3_moe")
    model.save_pretrained(tmp_path)
    loaded = expertflow.from_pretrained(
        tmp_path, device="cpu", gpu_memory=10**9, dtype=torch.bfloat16
    )
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ref = expertflow.offload(build("qwen3_moe").to(torch.bfloat16), device="cpu", gpu_memory=10**9)
    assert loaded._expertflow.cache.num_slots == ref._expertflow.cache.num_slots


def test_bad_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        expertflow.from_pretrained(tmp_path / "missing", device="cpu", slots=4)
    with pytest.raises(ValueError, match="no config.json"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = safetensors_torch.load_file(weights)
    weights.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)
    # One expert's down projection missing from layer 1.
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    assert gone in tensors
    safetensors_torch.save_file(
        {k: v for k, v in tensors.items() if k != gone}, weights, metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match=r"lacks experts \[3\] of model.layers.1.mlp.experts"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)
    # A non-expert weight missing.
    gone = "model.layers.0.self_attn.q_proj.weight"
    safetensors_torch.save_file(
        {k: v for k, v in tensors.items() if k != gone}, weights, metadata={"format": "pt"}
    )
    with pytest.raises(ValueError, match="lacks weights for .*q_proj"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)
    weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)
    # A shard named by the index that is not there.
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ValueError, match="shards named in"):
        expertflow.from_pretrained(tmp_path, device="cpu", slots=4)


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, transformers, expertflow
    from pathlib import Path

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    path, naive = sys.argv[1], sys.argv[2] == "naive"
    # Warm every code path on a tiny checkpoint so imports do not count as loading.
    expertflow.from_pretrained(sys.argv[3], device="cpu", slots=4)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = rss("VmRSS:")
    if naive:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        expertflow.offload(model, device="cpu", slots=8)
    else:
        model = expertflow.from_pretrained(path, device="cpu", slots=8)
    cache = model._expertflow.cache
    resident = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": rss("VmHWM:") - base, "experts": cache.host_bytes,
                      "resident": resident}))
    """
)


def write_big_mixtral(path) -> int:
    """A float32 Mixtral checkpoint with 96 MiB of experts in 20 MB shards, for the peak host
    memory tests; returns the largest shard's size in bytes."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        vocab_size=128,
    )
    MixtralForCausalLM(config).save_pretrained(path, max_shard_size="20MB")
    return max(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.slow
def test_peak_host_memory_stays_near_the_expert_bytes(tmp_path):
    shard = write_big_mixtral(tmp_path / "big")
    build("mixtral").save_pretrained(tmp_path / "tiny")
    results = {}
    for mode in ("streamed", "naive"):
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK_SCRIPT,
                str(tmp_path / "big"),
                mode,
                str(tmp_path / "tiny"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    r = results["streamed"]
    # On the CPU the "device" is the host too, so the resident weights count here as well.
    bound = 1.2 * r["experts"] + shard + r["resident"]
    mib = {
        k: v / 2**20
        for k, v in (
            ("peak", r["peak"]),
            ("bound", bound),
            ("experts", r["experts"]),
            ("naive", results["naive"]["peak"]),
        )
    }
    print(
        "peak {peak:.1f} MiB, bound {bound:.1f} MiB, experts {experts:.1f} MiB, "
        "naive load + offload {naive:.1f} MiB".format(**mib)
    )
    assert r["experts"] > 90 * 2**20
    assert r["peak"] <= bound
    assert r["peak"] < results["naive"]["peak"]
