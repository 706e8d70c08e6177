"""from_pretrained() as a newcomer's own checkpoint needs it: the checkpoint's generation
settings, transformers' dtype names, and a report of what was loaded where."""

from __future__ import annotations

import json
import logging

import pytest
import torch

import expertflow
from tests.modules.test_offload import build

pytest.importorskip("transformers")


@pytest.fixture
def checkpoint(tmp_path):
    model = build("qwen3_moe").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    return tmp_path


def test_generation_config_json_is_honoured(checkpoint):
    settings = {"eos_token_id": [0, 5], "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (checkpoint / "generation_config.json").write_text(json.dumps(settings))
    model = expertflow.from_pretrained(checkpoint, device="cpu", slots=4)
    assert model.generation_config.eos_token_id == [0, 5]
    assert model.generation_config.do_sample is True
    assert model.generation_config.temperature == 0.6
    assert model.generation_config.top_p == 0.95


def test_a_damaged_generation_config_is_named(checkpoint):
    (checkpoint / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config.json is not a usable generation"):
        expertflow.from_pretrained(checkpoint, device="cpu", slots=4)


@pytest.mark.parametrize("dtype", ["auto", None, "bfloat16", "torch.bfloat16", torch.bfloat16])
def test_dtype_auto_and_names_read_as_transformers_reads_them(checkpoint, dtype):
    model = expertflow.from_pretrained(checkpoint, device="cpu", slots=4, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}  # the config's dtype


def test_loading_reports_progress_and_the_slots_chosen(checkpoint, caplog):
    with caplog.at_level(logging.INFO, logger="expertflow"):
        model = expertflow.from_pretrained(checkpoint, device="cpu", gpu_memory="1GiB")
    messages = [r.getMessage() for r in caplog.records]
    assert any("reading model.safetensors (1 of 1)" in m for m in messages)
    slots = model._expertflow.cache.num_slots
    loaded = [m for m in messages if f"loaded: {slots} slots of " in m]
    assert loaded and "(float experts) on cpu" in loaded[0]


@pytest.mark.parametrize("mode", ["always", "auto"])
def test_cpu_experts_give_the_same_logits(checkpoint, mode):
    ids = torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    logits = []
    # "auto" with rates that make the CPU win (calibrated ones may put every miss on the link).
    cpu_wins = {"link_gbps": 1e-3, "cpu_gbps": 100.0, "cpu_gflops": 1e6}
    for cpu in ("never", mode):
        rates = cpu_wins if cpu == "auto" else None
        model = expertflow.from_pretrained(checkpoint, device="cpu", slots=4, dtype="float32",
                                           cpu_experts=cpu, hybrid_rates=rates)  # fmt: skip
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
        runs = sum(getattr(m, "cpu_expert_runs", 0) for m in model.modules())
        assert (runs > 0) == (cpu != "never")
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)


def test_hybrid_rates_are_checked_before_any_weight_is_read(checkpoint):
    with pytest.raises(ValueError, match=r"^hybrid_rates are read by cpu_experts='auto' only"):
        expertflow.from_pretrained(checkpoint, device="cpu", slots=4,
                                   hybrid_rates={"link_gbps": 1.0, "cpu_gbps": 1.0,
                                                 "cpu_gflops": 1.0})  # fmt: skip
