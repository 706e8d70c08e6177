"""offload() arguments: refused with a short ValueError naming the argument, before the model
is touched; budgets capped at what the experts need; a failed offload leaves the model as it
was, so that the next one works."""

from __future__ import annotations

import pytest
import torch

import expertflow
from expertflow.runtime.options import parse_bytes
from tests.modules.test_offload import batch, build

pytest.importorskip("transformers")

EXPERTS = 2 * 8  # build("mixtral"): 2 MoE layers x 8 experts


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1.5e9, 1_500_000_000), ("1.5e9", 1_500_000_000), (".5 KiB", 512), ("1.1GB", 1_100_000_000)],
)
def test_gpu_memory_accepts_whole_floats_and_exponents(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize(
    "value", ["..GiB", b"24GiB", 1.5, float("nan"), float("inf"), 0, -5, True, "0.4B", "e9", [1]]
)
def test_bad_gpu_memory_is_refused_naming_it(value):
    model = build("mixtral")
    with pytest.raises(ValueError, match=r"gpu_memory must be a positive number of bytes") as err:
        expertflow.offload(model, device="cpu", gpu_memory=value)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("value", [4.0, True, "8", None.__class__, torch.zeros(3)])
def test_slots_of_a_wrong_type_are_refused_naming_them(value):
    with pytest.raises(ValueError, match=r"^slots must be a positive int, got ") as err:
        expertflow.offload(build("mixtral"), device="cpu", slots=value)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("value", [0, -1, -(2**40)])
def test_slots_below_one_are_refused(value):
    with pytest.raises(ValueError, match=rf"slots must be a positive int, got {value}"):
        expertflow.offload(build("mixtral"), device="cpu", slots=value)


@pytest.mark.parametrize("budget", ["per_layer", "global"])
@pytest.mark.parametrize("kwargs", [{"slots": 2**31}, {"slots": 2**40}, {"gpu_memory": "24GiB"}])
def test_budgets_beyond_the_experts_are_capped_at_one_slot_per_expert(kwargs, budget):
    # gpu_memory="24GiB" on the CPU tried to allocate 25.7 GB for a few hundred KB of experts;
    # 2**31 slots gave a pybind11 TypeError printing every tensor.
    model = build("mixtral")
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    expertflow.offload(model, device="cpu", budget=budget, **kwargs)
    cache = model._expertflow.cache
    assert cache.num_slots == EXPERTS
    assert model._expertflow.pool_size == (8 if budget == "per_layer" else EXPERTS)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_other_arguments_are_refused_naming_them():
    model = build("mixtral")
    with pytest.raises(ValueError, match=r"lookahead must be True or False, got 'no'"):
        expertflow.offload(model, device="cpu", slots=8, lookahead="no")
    with pytest.raises(ValueError, match=r"background must be True or False, got 1"):
        expertflow.offload(model, device="cpu", slots=8, background=1)
    with pytest.raises(ValueError, match=r"device must be a torch.device or a str .* 'bogus'"):
        expertflow.offload(model, device="bogus", slots=8)
    assert not hasattr(model, "_expertflow")


def snapshot(model):
    """Everything a failed offload could leave changed: modules, tensors, devices, state."""
    return (
        [(name, id(m)) for name, m in model.named_modules()],
        [(n, id(p), p.device, p.data_ptr()) for n, p in model.named_parameters()],
        [(n, b.device) for n, b in model.named_buffers()],
        [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()],
        hasattr(model, "_expertflow"),
    )


def test_predictor_of_a_wrong_type_is_refused_and_the_model_kept():
    model = build("mixtral")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"predictor must be an .*Predictor or the folder .*int 42"
    ):
        expertflow.offload(model, device="cpu", slots=8, predictor=42)
    assert snapshot(model) == before
    expertflow.offload(model, device="cpu", slots=8)  # not "already offloaded"


class Boom(Exception):
    """Not a ValueError: the roll-back must not depend on the kind of exception."""


@pytest.mark.parametrize("where", ["prefetcher", "lock_each_forward", "to", "point_at_store"])
def test_any_exception_while_installing_rolls_the_model_back(where, monkeypatch, tmp_path):
    import expertflow.runtime.offload as offload_module

    model = build("mixtral")
    ids, mask = batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
    before = snapshot(model)

    def boom(*args, **kwargs):
        raise Boom(where)

    calls = {"n": 0}

    def boom_on_second_layer(module, cache, layer):  # one layer already swapped
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom(where)
        original_point_at_store(module, cache, layer)

    original_point_at_store = offload_module._point_at_store
    if where == "to":
        monkeypatch.setattr(type(model), "to", boom)
    elif where == "point_at_store":
        monkeypatch.setattr(offload_module, "_point_at_store", boom_on_second_layer)
    else:
        monkeypatch.setattr(offload_module, f"_{where}" if where == "prefetcher" else where, boom)
    with pytest.raises(Boom):
        expertflow.offload(model, device="cpu", slots=8, lookahead=True)
    assert snapshot(model) == before
    monkeypatch.undo()
    expertflow.offload(model, device="cpu", slots=8, lookahead=True)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_predictor_folder_that_does_not_load_rolls_back(tmp_path):
    model = build("mixtral")
    before = snapshot(model)
    with pytest.raises(ValueError, match="has no predictor.json"):
        expertflow.offload(model, device="cpu", slots=8, predictor=tmp_path)
    assert snapshot(model) == before
    expertflow.offload(model, device="cpu", slots=8)


def test_a_model_that_is_not_a_module_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"offload: model must be a torch.nn.Module .*got str"):
        expertflow.offload("mixtral", device="cpu", slots=8)


@pytest.mark.cuda
def test_a_failed_offload_to_cuda_moves_the_model_back_to_the_host(tmp_path):
    # The predictor is loaded after the model was moved to the device: the roll-back must
    # move every tensor back, not only put the experts modules back.
    model = build("mixtral")
    modules = [(name, id(m)) for name, m in model.named_modules()]
    values = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    with pytest.raises(ValueError, match="has no predictor.json"):
        expertflow.offload(model, device="cuda", slots=8, predictor=tmp_path)
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert not hasattr(model, "_expertflow")
    for name, t in model.state_dict(keep_vars=True).items():
        assert t.device.type == "cpu", name
        assert torch.equal(t, values[name]), name


def test_a_budget_too_small_states_the_minimum_in_gib_and_what_would_fit():
    model = build("mixtral")  # 51840 resident bytes, 18432-byte slots, 2 layers, top-2
    with pytest.raises(ValueError) as error:
        expertflow.offload(model, device="cpu", gpu_memory=100_000)
    text = str(error.value)
    assert "minimum of 0.00 GiB (139520 bytes) for budget='per_layer'" in text  # / 0.9
    assert "budget='global' needs only 0.00 GiB (98560 bytes)" in text
    assert "expert_format" in text
    expertflow.offload(model, device="cpu", gpu_memory=100_000, budget="global")
    assert model._expertflow.cache.num_slots == 2


def test_transformers_older_than_5_is_named_with_the_version_needed(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.56.2")
    with pytest.raises(ValueError, match=r"transformers 4.56.2 is installed; .* >= 5.0"):
        expertflow.offload(torch.nn.Linear(2, 2), device="cpu", slots=1)
