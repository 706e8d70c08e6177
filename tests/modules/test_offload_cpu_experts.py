"""Issue 18: ``offload(..., cpu_experts="always")`` computes every expert on the CPU from the
host store (``ops.cpu_expert``): the same logits (fp32, within 1e-5) and greedy tokens as the
model itself, for every family, float and packed; bad values are refused naming the argument."""

from __future__ import annotations

import pytest
import torch

import expertflow
from expertflow.runtime.experts import find_experts_modules

pytest.importorskip("transformers")

from tests.modules.test_offload import FAMILIES, batch, build  # noqa: E402


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    return logits, tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_always_matches_the_model(family):
    model = build(family)
    ids, mask = batch()
    want, want_tokens = _run(model, ids, mask)
    slots = len(find_experts_modules(model)) * model.config.num_experts_per_tok
    expertflow.offload(model, device="cpu", slots=slots, policy="lru", cpu_experts="always")
    got, got_tokens = _run(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    stats = model._expertflow.cache.stats()
    assert stats["hits"] == stats["misses"] == stats["bytes_copied"] == 0  # no slot used
    expertflow.restore(model)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_always_on_packed_experts_matches_never(fmt):
    outs = []
    for mode in ("never", "always"):
        model = build("mixtral")
        ids, mask = batch()
        expertflow.offload(
            model, device="cpu", slots=8, policy="lru", expert_format=fmt, cpu_experts=mode
        )
        outs.append(_run(model, ids, mask))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1][1], outs[0][1])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sometimes", r"^cpu_experts must be one of \('never', 'always', 'auto'\)"),
        (True, r"^cpu_experts must be one of"),
    ],
)
def test_bad_values_are_refused_and_the_model_is_untouched(value, message):
    _refused(dict(cpu_experts=value), message)


def _refused(kwargs, message):
    model = build("mixtral")
    ids, mask = batch()
    want, _ = _run(model, ids, mask)
    with pytest.raises(ValueError, match=message):
        expertflow.offload(model, device="cpu", slots=8, **kwargs)
    assert not hasattr(model, "_expertflow")
    torch.testing.assert_close(_run(model, ids, mask)[0], want)


CPU_WINS = {"link_gbps": 1e-3, "cpu_gbps": 100.0, "cpu_gflops": 1e6}
COPY_WINS = {"link_gbps": 100.0, "cpu_gbps": 1e-3, "cpu_gflops": 1e6}


def _runs(model) -> int:
    return sum(getattr(m, "cpu_expert_runs", 0) for m in model.modules())


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("rates", ["cpu", "copy", "calibrated"])
def test_auto_matches_the_model(family, rates):
    model = build(family)
    ids, mask = batch()
    want, want_tokens = _run(model, ids, mask)
    given = {"cpu": CPU_WINS, "copy": COPY_WINS, "calibrated": None}[rates]
    slots = len(find_experts_modules(model)) * model.config.num_experts_per_tok
    expertflow.offload(
        model, device="cpu", slots=slots, policy="lru", cpu_experts="auto", hybrid_rates=given
    )
    got, got_tokens = _run(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    stats = model._expertflow.cache.stats()
    if rates == "cpu":  # every miss on the CPU: nothing copied, nothing cached
        assert stats["misses"] == stats["hits"] == 0 and _runs(model) > 0
    if rates == "copy":  # today's path
        assert stats["misses"] > 0 and _runs(model) == 0
    expertflow.restore(model)


def test_auto_copies_a_prompt_and_computes_single_tokens_on_the_cpu():
    # 1 GB/s link, a CPU reading at 1000 GB/s but computing 2 GFLOP/s: one token costs half a
    # copy on the CPU, two or more tokens at least a copy (ties copy).
    rates = {"link_gbps": 1.0, "cpu_gbps": 1000.0, "cpu_gflops": 2.0}
    model = build("mixtral")
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(3))
    expertflow.offload(model, device="cpu", slots=4, cpu_experts="auto", hybrid_rates=rates)
    with torch.no_grad():
        model(input_ids=ids)
    assert model._expertflow.cache.stats()["misses"] > 0  # the prompt's experts were copied
    prompt_runs = _runs(model)
    with torch.no_grad():
        model(input_ids=ids[:, :1])  # one token: its misses run on the CPU
    assert _runs(model) > prompt_runs


def test_a_failed_calibration_warns_and_copies(monkeypatch):
    from expertflow.runtime import hybrid

    def broken(*args):
        raise RuntimeError("no timer")

    monkeypatch.setattr(hybrid, "calibrate", broken)
    hybrid.forget_calibrations()  # an earlier test's rates for this model would be reused
    model = build("mixtral")
    ids, mask = batch()
    want, _ = _run(model, ids, mask)
    with pytest.warns(RuntimeWarning, match="falling back to cpu_experts='never'"):
        expertflow.offload(model, device="cpu", slots=8, cpu_experts="auto")
    torch.testing.assert_close(_run(model, ids, mask)[0], want, rtol=1e-5, atol=1e-5)
    assert _runs(model) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cpu_experts="auto", hybrid_rates={**CPU_WINS, "cpu_gbps": -1.0}),
         r"^hybrid_rates\['cpu_gbps'\] must be a finite number > 0"),
        (dict(cpu_experts="auto", hybrid_rates={**CPU_WINS, "link_gbps": float("nan")}),
         r"^hybrid_rates\['link_gbps'\] must be a finite number > 0"),
        (dict(cpu_experts="auto", hybrid_rates={"link_gbps": 1.0}),
         r"^hybrid_rates must be a dict with the keys \('link_gbps', 'cpu_gbps', 'cpu_gflops'\) "
         r"and optionally 'device_gbps'"),
        (dict(cpu_experts="auto", hybrid_rates={**CPU_WINS, "device_gbps": -1.0}),
         r"^hybrid_rates\['device_gbps'\] must be a finite number >= 0 \(0: not modelled\)"),
        (dict(cpu_experts="auto", hybrid_rates={**CPU_WINS, "device": 1.0}),
         r"^hybrid_rates must be a dict with the keys"),
        (dict(cpu_experts="never", hybrid_rates=CPU_WINS),
         r"^hybrid_rates are read by cpu_experts='auto' only"),
    ],
)  # fmt: skip
def test_bad_rates_are_refused_naming_them(kwargs, message):
    _refused(kwargs, message)


def test_calibration_times_copies_into_slots_allocated_once(monkeypatch):
    # A fresh destination per timed copy measured page faults, not the link: on the CPU 0.5-7
    # GB/s depending on how much memory the process held.
    from expertflow.runtime import hybrid

    allocations = []
    real_empty_like = torch.empty_like

    def counting_empty_like(*args, **kwargs):
        allocations.append(args[0].shape)
        return real_empty_like(*args, **kwargs)

    model = build("mixtral")
    expertflow.offload(model, device="cpu", slots=8, cpu_experts="always")
    cache = model._expertflow.cache
    layer = next(m for m in model.modules() if hasattr(m, "cpu_expert_runs"))
    monkeypatch.setattr(torch, "empty_like", counting_empty_like)
    rates = hybrid.calibrate(layer, model.config.hidden_size, torch.float32)
    assert len(allocations) == len(cache.host_expert(0, 0))  # once per tensor, not per repeat
    assert set(rates) == {*hybrid.RATE_NAMES, "device_gbps"}
    assert all(value > 0 for value in rates.values())


def test_the_cost_of_using_a_slot_sends_misses_to_the_cpu():
    # The copy alone is faster than the CPU kernel (2 vs 1 GB/s), but the device then reads the
    # slot at 0.5 GB/s: copying and using costs 2.5x the CPU kernel, so both misses of the one
    # token run on the CPU (without the term both are copied: the second ties).
    copy_alone = {"link_gbps": 2.0, "cpu_gbps": 1.0, "cpu_gflops": 1e6}
    runs = []
    for rates in (copy_alone, {**copy_alone, "device_gbps": 0.5}):
        model = build("mixtral")
        ids, mask = batch()
        expertflow.offload(model, device="cpu", slots=4, cpu_experts="auto", hybrid_rates=rates)
        with torch.no_grad():
            model(input_ids=ids[:1, :1])  # one token: the CPU's token term stays small
        runs.append((_runs(model), model._expertflow.cache.stats()["misses"]))
    assert runs[0] == (0, runs[0][1]) and runs[0][1] > 0  # copy-only without the device term
    assert runs[1][0] > 0 and runs[1][1] == 0  # with it: every miss on the CPU


def test_hits_run_on_the_cpu_where_using_a_slot_is_slower():
    from expertflow import _C

    model = build("mixtral")
    ids = torch.randint(1, 96, (1, 1), generator=torch.Generator().manual_seed(2))
    expertflow.offload(model, device="cpu", slots=8, cpu_experts="auto", hybrid_rates=COPY_WINS)
    with torch.no_grad():
        want = model(input_ids=ids).logits  # every miss copied: the experts are now cached
    hits = model._expertflow.cache.stats()["hits"]
    assert _runs(model) == 0
    slow_device = _C.HybridPolicy(100.0, 1.0, 1e6, device_gbps=0.01)
    for m in model.modules():
        if hasattr(m, "use_hybrid"):
            m.use_hybrid(slow_device)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _runs(model) == 2 * 2  # both experts of both layers, from the host store
    assert model._expertflow.cache.stats()["hits"] == hits  # no slot used


def test_calibrations_are_reused_for_the_same_kind_of_expert(monkeypatch):
    from expertflow.runtime import hybrid

    calls = []
    real = hybrid.calibrate

    def counted(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(hybrid, "calibrate", counted)
    hybrid.forget_calibrations()
    for fmt in ("auto", "auto", "int8"):  # the second reuses the first's; int8 is another kind
        model = build("mixtral")
        expertflow.offload(model, device="cpu", slots=4, cpu_experts="auto", expert_format=fmt)
    assert len(calls) == 2
    hybrid.forget_calibrations()
    expertflow.offload(build("mixtral"), device="cpu", slots=4, cpu_experts="auto")
    assert len(calls) == 3
