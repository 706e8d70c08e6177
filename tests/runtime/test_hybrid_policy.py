"""The per-miss copy-or-CPU decision (csrc/core/hybrid_policy.h) as Python sees it."""

from __future__ import annotations

import math

import pytest

from expertflow import _C

# A Mixtral-sized bf16 expert: 176M weights, 352 MB.
PARAMS = 3 * 4096 * 14336
BYTES = 2 * PARAMS


def test_one_off_miss_goes_to_the_cpu_when_it_is_faster():
    policy = _C.HybridPolicy(link_gbps=55.0, cpu_gbps=100.0, cpu_gflops=1000.0)
    where, copy_ms, cpu_ms = policy.decide(1, BYTES, PARAMS)
    assert where == "cpu"
    assert copy_ms == pytest.approx(BYTES / 55e6)
    assert cpu_ms == pytest.approx(BYTES / 100e6)


def test_reuse_and_prefill_choose_the_copy():
    policy = _C.HybridPolicy(55.0, 100.0, 200.0)
    assert policy.decide(1, BYTES, PARAMS, reuse=1.0)[0] == "copy"
    assert policy.decide(512, BYTES, PARAMS)[0] == "copy"  # compute-bound on the CPU
    assert policy.decide(1, BYTES, PARAMS, cpu_busy_ms=100.0)[0] == "copy"


def test_plan_spreads_a_steps_misses():
    policy = _C.HybridPolicy(55.0, 100.0, 1000.0)
    plan = policy.plan([(1, BYTES, PARAMS, 0.0)] * 8)
    assert set(plan) == {"copy", "cpu"}
    assert plan[0] == "cpu"


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_rates_must_be_positive_finite(bad):
    with pytest.raises(ValueError, match="link_gbps"):
        _C.HybridPolicy(bad, 10.0, 10.0)
    with pytest.raises(ValueError, match="cpu_gbps"):
        _C.HybridPolicy(10.0, bad, 10.0)
    with pytest.raises(ValueError, match="cpu_gflops"):
        _C.HybridPolicy(10.0, 10.0, bad)


def test_the_device_using_a_slot_counts_against_the_copy():
    rates = dict(link_gbps=55.0, cpu_gbps=50.0, cpu_gflops=1000.0)
    assert _C.HybridPolicy(**rates).device_gbps == 0.0  # not modelled by default
    assert _C.HybridPolicy(**rates).decide(1, BYTES, PARAMS)[0] == "copy"
    assert _C.HybridPolicy(**rates, device_gbps=100.0).decide(1, BYTES, PARAMS)[0] == "cpu"
    assert _C.HybridPolicy(**rates, device_gbps=3000.0).decide(1, BYTES, PARAMS)[0] == "copy"
    for bad in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="device_gbps must be a finite number >= 0"):
            _C.HybridPolicy(**rates, device_gbps=bad)


def test_plan_step_places_hits_and_misses():
    rates = dict(link_gbps=55.0, cpu_gbps=100.0, cpu_gflops=1000.0)
    one = (1, BYTES, PARAMS, 0.0)
    # Device use not modelled: hits use their slots; the misses are spread as by plan().
    on_hits, on_misses = _C.HybridPolicy(**rates).plan_step([one] * 2, [one] * 8)
    assert on_hits == ["copy", "copy"]
    assert on_misses == _C.HybridPolicy(**rates).plan([one] * 8)
    # A device slower than the CPU kernel: the first hit runs on the CPU.
    on_hits, _ = _C.HybridPolicy(**rates, device_gbps=10.0).plan_step([one] * 2, [])
    assert on_hits[0] == "cpu"
    # A hit's last field is the wait for its copy: one landing after the CPU would be done
    # runs on the CPU, one landing sooner stays on the device.
    on_hits, _ = _C.HybridPolicy(**rates).plan_step([(1, BYTES, PARAMS, 10.0)], [])
    assert on_hits == ["cpu"]
    on_hits, _ = _C.HybridPolicy(**rates).plan_step([(1, BYTES, PARAMS, 1.0)], [])
    assert on_hits == ["copy"]
    with pytest.raises(ValueError, match="a hit's wait_ms must be finite and >= 0"):
        _C.HybridPolicy(**rates).plan_step([(1, BYTES, PARAMS, -1.0)], [])
    with pytest.raises(ValueError, match="reuse"):
        _C.HybridPolicy(**rates).plan_step([], [(1, BYTES, PARAMS, 2.0)])


def test_bad_misses_are_value_errors():
    policy = _C.HybridPolicy(55.0, 100.0, 1000.0)
    with pytest.raises(ValueError, match="reuse"):
        policy.decide(1, BYTES, PARAMS, reuse=2.0)
    with pytest.raises(ValueError, match="tokens"):
        policy.decide(-1, BYTES, PARAMS)
