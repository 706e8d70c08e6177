"""Issue 18: with ``cpu_experts="auto"`` a layer's CPU experts run on a worker thread while its
device experts run and their copies arrive; errors on either side reach the caller; each miss
is placed with its planned reuse score (a reuse head's, via the prefetcher's plan)."""

from __future__ import annotations

import os
import select
import signal
import threading
import time

import numpy as np
import pytest
import torch

import expertflow
from expertflow.prediction import Predictor
from expertflow.runtime.offloaded import OffloadedExperts

pytest.importorskip("transformers")

from tests.modules.test_offload import batch, build  # noqa: E402

# Equal link and CPU rates: a step's misses alternate between the link and the CPU queue.
EVEN = {"link_gbps": 1.0, "cpu_gbps": 1.0, "cpu_gflops": 1e6}


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _offloaded(**kwargs):
    model = build("mixtral")
    ids, mask = batch()
    want = _logits(model, ids, mask)
    expertflow.offload(model, device="cpu", slots=4, cpu_experts="auto", **kwargs)
    layers = [m for m in model.modules() if isinstance(m, OffloadedExperts)]
    return model, layers, (ids, mask), want


def test_cpu_experts_run_on_the_worker_while_the_device_acquires(monkeypatch):
    model, layers, inputs, want = _offloaded(hybrid_rates=EVEN)
    cache = model._expertflow.cache
    runs, acquires = [], []
    for layer in layers:
        real_run = layer._cpu.run

        def slow_run(*args, real_run=real_run):
            started = time.perf_counter()
            time.sleep(0.03)  # long enough that a device loop started beside it lands inside
            out = real_run(*args)
            runs.append((threading.current_thread().name, started, time.perf_counter()))
            return out

        monkeypatch.setattr(layer._cpu, "run", slow_run)
    real_acquire = cache.acquire

    def timed_acquire(*args):
        acquires.append(time.perf_counter())
        return real_acquire(*args)

    monkeypatch.setattr(cache, "acquire", timed_acquire)
    got = _logits(model, *inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runs and acquires
    assert all(name.startswith("expertflow-cpu-experts") for name, _, _ in runs)
    # Sequential code would acquire only after every CPU expert of the call had finished.
    assert any(lo < t < hi for _, lo, hi in runs for t in acquires)


def test_an_error_on_the_cpu_side_reaches_the_caller_and_the_model_recovers(monkeypatch):
    model, layers, inputs, want = _offloaded(hybrid_rates=EVEN)

    def broken(*args):
        raise RuntimeError("cpu expert failed")

    monkeypatch.setattr(layers[0]._cpu, "run", broken)
    with pytest.raises(RuntimeError, match="cpu expert failed"):
        _logits(model, *inputs)
    monkeypatch.undo()
    torch.testing.assert_close(_logits(model, *inputs), want, rtol=1e-5, atol=1e-5)


def test_an_error_on_the_device_side_is_the_one_raised(monkeypatch):
    model, layers, inputs, want = _offloaded(hybrid_rates=EVEN)
    cache = model._expertflow.cache
    finished = []
    real_run = layers[0]._cpu.run

    def slow_run(*args):
        time.sleep(0.03)
        finished.append(True)
        return real_run(*args)

    def broken_views(*args):
        raise RuntimeError("device side failed")

    monkeypatch.setattr(layers[0]._cpu, "run", slow_run)
    monkeypatch.setattr(cache, "views", broken_views)
    with pytest.raises(RuntimeError, match="device side failed"):
        _logits(model, *inputs)
    assert finished  # the CPU job was waited for before the error left the layer
    monkeypatch.undo()
    torch.testing.assert_close(_logits(model, *inputs), want, rtol=1e-5, atol=1e-5)


class ReusePredictor(Predictor):
    """Scores nothing (no prefetch); reuse score (layer * E + expert) / 100 for every row."""

    def predict_step(self, histories, previous):
        return np.zeros((len(histories), self.num_layers, self.num_experts), np.float32)

    def predict_step_with_reuse(self, histories, previous):
        reuse = np.arange(self.num_layers * self.num_experts, dtype=np.float32) / 100
        reuse = np.broadcast_to(
            reuse.reshape(1, self.num_layers, self.num_experts),
            (len(histories), self.num_layers, self.num_experts),
        )
        return self.predict_step(histories, previous), reuse


class RecordingPolicy:
    """The real HybridPolicy, recording each planned miss's reuse score."""

    def __init__(self, policy, layer, seen):
        self.policy, self.layer, self.seen = policy, layer, seen
        self.link_gbps = policy.link_gbps

    def plan_step(self, hits, misses):
        self.seen.extend((self.layer, reuse) for _, _, _, reuse in misses)
        return self.policy.plan_step(hits, misses)


def test_each_miss_is_placed_with_its_planned_reuse_score():
    model = build("mixtral")
    ids = torch.randint(1, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    num_experts = model.config.num_local_experts
    expertflow.offload(
        model, device="cpu", slots=4, cpu_experts="auto", hybrid_rates=EVEN,
        predictor=ReusePredictor(2, num_experts, 2),
    )  # fmt: skip
    seen = []
    for m in model.modules():
        if isinstance(m, OffloadedExperts):
            m._hybrid = RecordingPolicy(m._hybrid, m.layer, seen)
    with torch.no_grad():
        got = model.generate(input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    planned = [r for _, r in seen if r > 0]
    assert planned, "no miss was planned with a reuse score"
    # The prompt has no plan yet (reuse 0); decode steps' misses carry the predictor's score,
    # which names the layer and the expert, so it must be one of that layer's scores.
    for layer, reuse in seen:
        if reuse > 0:
            expert = round(reuse * 100) - layer * num_experts
            assert 0 <= expert < num_experts, (layer, reuse)


def test_planned_reuse_is_clipped_zero_without_a_plan_and_checks_indices():
    model, _, _, _ = _offloaded(hybrid_rates=EVEN)
    cache = model._expertflow.cache
    assert cache.planned_reuse(1, [0, 3]) == [0.0, 0.0]
    reuse = torch.tensor([[0.5, 2.0, -1.0, 0.25] * 2] * 2)
    cache.plan(torch.zeros(2, 8), 0, reuse_scores=reuse)
    assert cache.planned_reuse(1, [0, 1, 2, 3]) == [0.5, 1.0, 0.0, 0.25]
    with pytest.raises(IndexError, match=r"ExpertCache.planned_reuse: expert must be in \[0, 8\)"):
        cache.planned_reuse(0, [8])
    with pytest.raises(IndexError, match=r"ExpertCache.planned_reuse: layer must be in \[0, 2\)"):
        cache.planned_reuse(2, [0])
    cache.plan(torch.zeros(2, 8), 0)  # a plan without reuse scores clears them
    assert cache.planned_reuse(1, [1]) == [0.0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
def test_a_forked_child_gets_its_own_cpu_worker():
    # The child inherits the parent's executor but not its thread. (An offloaded model itself
    # is not usable after a fork: the cache's transfer engine thread is not inherited either.)
    from expertflow.runtime import cpu_worker

    assert cpu_worker._cpu_worker().submit(lambda: 1).result(timeout=60) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child answers through the pipe, then exits at once
        os.close(read)
        answer = b"0"
        try:
            future = cpu_worker._cpu_worker().submit(lambda: 1)
            answer = b"1" if future.result(timeout=30) == 1 else b"0"
        finally:
            os.write(write, answer)
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 120)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    answer = os.read(read, 1) if ready else b"hung"
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"1"


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", ["auto", "int4"])
@pytest.mark.parametrize("mode", ["always", "auto", "auto-calibrated"])
def test_on_cuda_cpu_experts_give_the_models_logits(mode, fmt):
    """The GPU runs the hits and copies while the CPU computes its share from the pinned
    host store: fp32 logits and greedy tokens as the model's own on the GPU."""
    from tests.modules.test_offload_cpu_experts import _run
    from tests.modules.test_offload_formats import _quantize_in_place

    reference = build("mixtral")
    if fmt != "auto":
        _quantize_in_place(reference, fmt, None)
    ids, mask = (t.cuda() for t in batch())
    want, want_tokens = _run(reference.to("cuda"), ids, mask)
    model = build("mixtral")
    rates = EVEN if mode == "auto" else None
    expertflow.offload(
        model, device="cuda", slots=4, expert_format=fmt,
        cpu_experts=mode.split("-")[0], hybrid_rates=rates,
    )  # fmt: skip
    got, tokens = _run(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(tokens, want_tokens)
    runs = sum(m.cpu_expert_runs for m in model.modules() if isinstance(m, OffloadedExperts))
    if mode != "auto-calibrated":  # measured rates may send every miss to the link
        assert runs > 0
    if mode == "auto":  # equal rates: both the CPU and the link take misses
        assert model._expertflow.cache.stats()["misses"] > 0


def test_a_hit_whose_copy_is_far_behind_runs_on_the_cpu(monkeypatch):
    """copies_ahead feeds each hit's wait: a prefetch many copies back in the link's queue is
    computed on the CPU (the replay's rule); one that has landed is used from its slot."""
    rates = {"link_gbps": 1.0, "cpu_gbps": 4.0, "cpu_gflops": 1e6}  # CPU: a quarter of a copy
    model, layers, _, _ = _offloaded(hybrid_rates=rates)
    ids = torch.randint(1, 96, (1, 1), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    cache = model._expertflow.cache
    placed = {}
    for position in (0, 3):  # landed; the third copy still in flight
        monkeypatch.setattr(
            cache, "copies_ahead", lambda layer, experts, p=position: [p] * len(experts)
        )
        monkeypatch.setattr(cache, "planned_reuse", lambda layer, experts: [0.0] * len(experts))
        before = sum(m.cpu_expert_runs for m in layers)
        with torch.no_grad():
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        placed[position] = sum(m.cpu_expert_runs for m in layers) - before
    assert placed[0] == 0  # every expert "held and arrived": from its slot
    assert placed[3] > 0  # three copies away against the CPU kernel's quarter of one
