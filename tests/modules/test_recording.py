"""Routing recording: the trace holds exactly what the routers chose, for every family."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import expertflow
from expertflow.traces.format import load_trace, save_trace
from expertflow.traces.recording import RoutingRecorder, record_routing
from tests.modules.test_offload import FAMILIES, build, build_mixtral_with_agreeing_layers

pytest.importorskip("transformers")


def prompts(gen, lengths, vocab=96):
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def routing_of_one_forward(model, ids):
    """The router choices of one unbatched forward over ``ids`` (the reference)."""
    with RoutingRecorder(model) as rec, torch.no_grad():
        model(input_ids=torch.tensor([ids]))
    ((expert_ids, probs),) = rec.calls()
    return expert_ids, probs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_trace_equals_each_prompt_alone(family, gen):
    model = build(family)
    ps = prompts(gen, [5, 9, 1, 7])
    trace = record_routing(model, ps, batch_size=3, sources=["a", "b", "a", "c"])
    layers = len(expertflow.runtime.routing.routed_modules(model))
    assert trace.expert_ids.shape == (sum(map(len, ps)), layers, model.config.num_experts_per_tok)
    assert trace.meta["prefill"] == [True] * trace.num_tokens
    assert trace.meta["sequence_sources"] == ["a", "b", "a", "c"]
    for seq, p in enumerate(ps):
        rows = trace.sequence_ids == seq
        np.testing.assert_array_equal(trace.token_ids[rows], p)
        expected, probs = routing_of_one_forward(model, p)
        # Left padding changes no real token's hidden state beyond rounding: same choices.
        np.testing.assert_array_equal(np.sort(trace.expert_ids[rows], -1), np.sort(expected, -1))
        np.testing.assert_allclose(
            np.sort(trace.gate_probs[rows].astype(np.float32), -1),
            np.sort(probs, -1),
            atol=2e-3,
        )


def test_generated_tokens_are_recorded_in_order(gen):
    model = build("mixtral")
    ps = prompts(gen, [4, 6])
    trace = record_routing(model, ps, generate=5, batch_size=2)
    for seq, p in enumerate(ps):
        rows = np.flatnonzero(trace.sequence_ids == seq)
        # prompt + the 4 generated tokens fed back (the 5th is never an input)
        assert len(rows) == len(p) + 4
        prefill = np.asarray(trace.meta["prefill"])[rows]
        assert prefill.tolist() == [True] * len(p) + [False] * 4
        # The whole sequence's routing equals one forward over prompt + generated tokens.
        expected, _ = routing_of_one_forward(model, trace.token_ids[rows].tolist())
        np.testing.assert_array_equal(np.sort(trace.expert_ids[rows], -1), np.sort(expected, -1))
    assert len(trace.steps()) == 1 + 4


def test_offloaded_model_records_the_same_trace(gen):
    ps = prompts(gen, [6, 3, 8])
    plain = record_routing(build("qwen3_moe"), ps, generate=3, batch_size=2)
    model = expertflow.offload(build("qwen3_moe"), device="cpu", slots=4, policy="lru")
    offloaded = record_routing(model, ps, generate=3, batch_size=2)
    np.testing.assert_array_equal(plain.expert_ids, offloaded.expert_ids)
    np.testing.assert_array_equal(plain.token_ids, offloaded.token_ids)
    assert plain.meta["expert_bytes"] == offloaded.meta["expert_bytes"] > 0


def test_trace_round_trips_through_a_file(tmp_path, gen):
    trace = record_routing(build("olmoe"), prompts(gen, [3, 5]), generate=2, sources=["x", "y"])
    save_trace(trace, tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    for name in ("expert_ids", "gate_probs", "token_ids", "sequence_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name))
    assert back.meta == trace.meta


def test_bad_input(gen):
    model = build("mixtral")
    with pytest.raises(ValueError, match="batch_size"):
        record_routing(model, [[1, 2]], batch_size=0)
    with pytest.raises(ValueError, match="prompts"):
        record_routing(model, [])
    with pytest.raises(ValueError, match="prompts"):
        record_routing(model, [[1], []])
    with pytest.raises(ValueError, match="sources"):
        record_routing(model, [[1, 2]], sources=["a", "b"])
    with pytest.raises(ValueError, match="no MoE experts module"):
        RoutingRecorder(torch.nn.Linear(2, 2))


def test_lookahead_ids_are_recorded_and_exact_when_the_layers_agree(tmp_path, gen):
    model = build_mixtral_with_agreeing_layers()
    trace = record_routing(model, prompts(gen, [5, 8]), generate=3, batch_size=2, lookahead=True)
    assert (trace.lookahead_ids[:, 0] == -1).all()
    np.testing.assert_array_equal(
        np.sort(trace.lookahead_ids[:, 1], -1), np.sort(trace.expert_ids[:, 1], -1)
    )
    save_trace(trace, tmp_path / "t.npz")
    np.testing.assert_array_equal(load_trace(tmp_path / "t.npz").lookahead_ids, trace.lookahead_ids)
    plain = record_routing(build("olmoe"), prompts(gen, [4]), lookahead=True)
    assert plain.lookahead_ids.shape == plain.expert_ids.shape
    assert (plain.lookahead_ids[:, 1:] >= 0).all()


def test_a_recording_keeps_only_its_own_threads_calls(gen):
    """Another thread's forward passes on the same model are not recorded."""
    import threading

    model = build("mixtral")
    ids = prompts(gen, [6])[0]
    other = torch.tensor(prompts(gen, [3, 3]))
    stop = threading.Event()

    def other_thread():
        with torch.no_grad():
            while not stop.is_set():
                model(input_ids=other)

    worker = threading.Thread(target=other_thread)
    with RoutingRecorder(model) as rec, torch.no_grad():
        worker.start()
        try:
            for _ in range(5):
                model(input_ids=torch.tensor([ids]))
        finally:
            stop.set()
            worker.join()
    calls = rec.calls()
    assert len(calls) == 5
    expected, _ = routing_of_one_forward(model, ids)
    for expert_ids, _ in calls:
        np.testing.assert_array_equal(expert_ids, expected)
