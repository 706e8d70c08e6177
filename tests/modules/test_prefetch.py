"""offload(..., predictor=...): prefetching changes what is copied, never what is computed."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import expertflow
from expertflow.prediction import HistoryPredictor, PathPredictor, Predictor, multi_hot
from expertflow.traces.recording import RoutingRecorder, record_routing
from tests.modules.test_offload import build, build_mixtral_with_agreeing_layers

pytest.importorskip("transformers")
NEW = 6


class OraclePredictor(Predictor):
    """Knows the recorded routing of every decode step of one greedy generation."""

    def __init__(self, trace):
        super().__init__(trace.num_layers, trace.num_experts, trace.top_k)
        decode = np.flatnonzero(~np.asarray(trace.meta["prefill"]))
        self.future = multi_hot(trace.expert_ids[decode], trace.num_experts)
        self.step = 0

    def predict_step(self, histories, previous):
        scores = self.future[self.step][None]
        self.step += 1
        return scores


def prompt():
    return torch.randint(1, 96, (1, 7), generator=torch.Generator().manual_seed(5))


def decode_stats(model, ids):
    cache = model._expertflow.cache
    with torch.no_grad():
        model(input_ids=ids)  # warm: the prompt's own loads are not what is compared
    before = cache.stats()
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    after = cache.stats()
    return out, {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_an_oracle_predictor_turns_decode_misses_into_prefetch_hits(family):
    reference = build(family)
    ids = prompt()
    with torch.no_grad():
        expected = reference.generate(
            input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    trace = record_routing(reference, [ids[0].tolist()], generate=NEW)
    layers = trace.num_layers
    plain = expertflow.offload(build(family), device="cpu", slots=2 * layers, policy="expertflow")
    out_plain, plain_stats = decode_stats(plain, ids)
    oracle = OraclePredictor(trace)
    guided = expertflow.offload(
        build(family), device="cpu", slots=2 * layers, policy="expertflow", predictor=oracle
    )
    prefetcher = guided._expertflow.prefetcher
    # the warm-up forward is a prompt (no plan); generate's prompt neither; then NEW-1 steps
    out_guided, guided_stats = decode_stats(guided, ids)
    assert torch.equal(out_plain, expected) and torch.equal(out_guided, expected)
    assert prefetcher.steps == NEW - 1
    assert plain_stats["misses"] > 0
    assert guided_stats["prefetch_hits"] > 0
    assert guided_stats["misses"] < plain_stats["misses"]


@pytest.mark.parametrize("kind", ["history", "path"])
@pytest.mark.parametrize("budget", ["per_layer", "global"])
def test_real_predictors_never_change_the_tokens(kind, budget):
    model = build("olmoe")
    layers = model.config.num_hidden_layers
    ids = torch.randint(1, 96, (2, 6), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, **kwargs)
    predictor = (
        HistoryPredictor(layers, 8, 2)
        if kind == "history"
        else PathPredictor(layers, 8, 2, vocab_size=96, d_model=16, context=8)
    )
    slots = 2 * layers if budget == "per_layer" else 4
    offloaded = expertflow.offload(
        model, device="cpu", slots=slots, budget=budget, predictor=predictor
    )
    with torch.no_grad():
        got = offloaded.generate(input_ids=ids, **kwargs)
    assert torch.equal(got, expected)
    prefetcher = offloaded._expertflow.prefetcher
    assert prefetcher.steps == NEW - 1 and prefetcher.seconds > 0
    assert offloaded._expertflow.cache.stats()["prefetches"] > 0
    if kind == "history":  # it learned online from the prompt and the decoded tokens
        assert sum(predictor._token_count.values()) == int(mask.sum()) + 2 * (NEW - 1)
    expertflow.restore(offloaded)
    assert not offloaded._forward_pre_hooks


class UnsureOracle(OraclePredictor):
    """Right about every expert, but only 0.3 sure."""

    def predict_step(self, histories, previous):
        return 0.3 * super().predict_step(histories, previous)


def test_a_prefetch_threshold_copies_only_confident_predictions():
    reference = build("mixtral")
    ids = prompt()
    trace = record_routing(reference, [ids[0].tolist()], generate=NEW)
    with torch.no_grad():
        expected = reference.generate(
            input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    prefetches = {}
    for threshold in (0.2, 0.5):
        model = expertflow.offload(
            build("mixtral"),
            device="cpu",
            slots=2 * trace.num_layers,
            predictor=UnsureOracle(trace),
            prefetch_threshold=threshold,
        )
        out, stats = decode_stats(model, ids)
        assert torch.equal(out, expected)
        assert model._expertflow.prefetcher.steps == NEW - 1
        prefetches[threshold] = stats["prefetches"]
    assert prefetches[0.2] > 0 and prefetches[0.5] == 0


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.5"])
def test_a_bad_prefetch_threshold_is_refused(bad):
    with pytest.raises(ValueError, match="prefetch_threshold must be"):
        expertflow.offload(build("mixtral"), device="cpu", slots=4, prefetch_threshold=bad)


class ThreadRecordingOracle(OraclePredictor):
    """The oracle, noting on which thread each prediction ran and whether learning ever
    overlapped a prediction."""

    def __init__(self, trace, fail_at=None):
        super().__init__(trace)
        self.threads, self.fail_at, self.busy, self.overlaps = set(), fail_at, False, 0

    def predict_step(self, histories, previous):
        self.busy = True
        self.threads.add(threading.get_ident())
        try:
            if self.step == self.fail_at:
                raise RuntimeError("predictor failed")
            return super().predict_step(histories, previous)
        finally:
            self.busy = False

    def learn(self, token_ids, routing):
        self.overlaps += self.busy


def test_a_background_predictor_runs_off_the_main_thread_without_changing_tokens():
    reference = build("mixtral")
    ids = prompt()
    with torch.no_grad():
        expected = reference.generate(
            input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    trace = record_routing(reference, [ids[0].tolist()], generate=NEW)
    oracle = ThreadRecordingOracle(trace)
    model = expertflow.offload(
        build("mixtral"), device="cpu", slots=4, predictor=oracle, background=True
    )
    prefetcher = model._expertflow.prefetcher
    out, _ = decode_stats(model, ids)
    assert torch.equal(out, expected)
    assert oracle.threads and threading.get_ident() not in oracle.threads
    assert oracle.step == NEW - 1 and prefetcher.steps == NEW - 1  # every step predicted once
    assert oracle.overlaps == 0  # learning waits for the step's prediction
    assert prefetcher.background_seconds > 0
    expertflow.restore(model)
    assert prefetcher._worker is None


def test_a_failing_background_predictor_raises_in_the_forward_and_recovers():
    reference = build("mixtral")
    ids = prompt()
    trace = record_routing(reference, [ids[0].tolist()], generate=NEW)
    oracle = ThreadRecordingOracle(trace, fail_at=1)
    model = expertflow.offload(
        build("mixtral"), device="cpu", slots=4, predictor=oracle, background=True
    )
    with pytest.raises(RuntimeError, match="predictor failed"), torch.no_grad():
        model.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    oracle.fail_at = None
    with torch.no_grad():  # the failed job is gone: the model generates again
        model.generate(input_ids=ids, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_a_predictor_for_another_model_is_refused():
    model = build("mixtral")
    with pytest.raises(
        ValueError,
        match="predictor is for 3 layers x 8 experts, the model has 2 MoE layers x 8 experts",
    ):
        expertflow.offload(model, device="cpu", slots=4, predictor=HistoryPredictor(3, 8, 2))
    assert not hasattr(model, "_expertflow")  # left as it was


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_gate_lookahead_prefetches_the_next_layer_without_changing_tokens(family):
    reference = build(family)
    ids = prompt()
    kwargs = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, **kwargs)
    layers = len(expertflow.runtime.routing.routed_modules(reference))
    model = expertflow.offload(build(family), device="cpu", slots=2 * layers, lookahead=True)
    with torch.no_grad():
        got = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(got, expected)
    prefetcher = model._expertflow.prefetcher
    assert prefetcher.predictor is None and prefetcher.steps == NEW - 1
    # Each decode step looks ahead from every layer but the last.
    assert prefetcher.lookahead_prefetches > 0 and prefetcher.lookahead_seconds > 0


def test_lookahead_is_exact_when_hidden_states_barely_change():
    """The lookahead picks exactly the experts layer 1 goes on to use when layer 1's router
    sees exactly layer 0's router input."""
    model = build_mixtral_with_agreeing_layers()
    ids = prompt()
    offloaded = expertflow.offload(model, device="cpu", slots=4, lookahead=True, policy="lru")
    cache = offloaded._expertflow.cache
    looked_ahead = []
    real_prefetch = cache.prefetch

    def spy(layer, experts, scores=None):
        looked_ahead.append((layer, sorted(experts)))
        return real_prefetch(layer, experts, scores)

    cache.prefetch = spy
    with RoutingRecorder(offloaded) as rec, torch.no_grad():
        offloaded.generate(input_ids=ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    decode_calls = rec.calls()[1:]
    assert [layer for layer, _ in looked_ahead] == [1] * (NEW - 1)
    for (_, experts), (routing, _) in zip(looked_ahead, decode_calls, strict=True):
        assert experts == sorted(routing[0, 1].tolist())
