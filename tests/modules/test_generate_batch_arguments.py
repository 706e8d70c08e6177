"""generate_batch refuses bad arguments up front, with a ValueError naming the argument, and
does no needless work for absurd but valid ones (issue 21)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import expertflow
from expertflow.serving.requests import _Request
from expertflow.serving.sampling import _Sampling
from tests.modules.test_generate_batch import alone, without_eos

pytest.importorskip("transformers")

OK = [[1, 2, 3]]


@pytest.fixture(scope="module")
def model():
    return without_eos("mixtral")


def call(model, prompts=OK, **overrides):
    kwargs = {"max_new_tokens": 2, "batch_size": 1, **overrides}
    return expertflow.generate_batch(model, prompts, **kwargs)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Seen in the issue: messages that did not name the argument.
        (dict(eos_token_id="x"), r"eos_token_id must be .*got 'x'"),
        (dict(eos_token_id=["x"]), r"eos_token_id must be an int .*got 'x'"),
        (dict(eos_token_id=[1, -1]), r"eos_token_id must be an int in \[0, 95\], got -1"),
        (dict(eos_token_id=96), r"eos_token_id must be an int in \[0, 95\], got 96"),
        (dict(eos_token_id=2.0), r"eos_token_id must be .*got 2.0"),
        (dict(eos_token_id=True), r"eos_token_id must be an int .*got True"),
        (
            dict(do_sample=True, temperature=float("inf")),
            r"temperature must be > 0 \(a finite number\), got inf",
        ),
        (dict(temperature="1"), r"temperature must be > 0 \(a finite number\), got '1'"),
        (dict(temperature=True), r"temperature must be > 0 \(a finite number\), got True"),
        # Request i is seeded seed + i: every one must be a seed torch takes.
        (dict(seed=2**64), rf"seed must be an int in \[{-(2**63)}, {2**64 - 1}\], got {2**64}"),
        (dict(seed=-(2**63) - 1), "seed must be an int in"),
        (dict(seed=True), "seed must be an int"),
        (dict(seed=1.0), "seed must be an int"),
        (dict(top_k=True), "top_k must be None or an int >= 1, got True"),
        (dict(top_k=2.0), "top_k must be None or an int >= 1, got 2.0"),
        (dict(top_p=True), r"top_p must be None or in \(0, 1\] \(a number\), got True"),
        (dict(top_p=float("nan")), r"top_p must be None or in \(0, 1\] \(a number\), got nan"),
        (dict(top_p="0.5"), r"top_p must be None or in \(0, 1\] \(a number\)"),
        (dict(do_sample="no"), "do_sample must be a bool, got 'no'"),
        (dict(do_sample=1), "do_sample must be a bool, got 1"),
        (dict(batch_size=True), "batch_size must be an int >= 1, got True"),
        (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
        (dict(active_batches=0), "active_batches must be an int >= 1, got 0"),
        (dict(prefill_padding=True), "prefill_padding must be a finite number >= 0, got True"),
        (dict(prefill_padding="0.5"), "prefill_padding must be a finite number >= 0"),
        (dict(schedule=["fifo"]), "schedule must be one of"),
        (dict(predictor=42), "predictor must be a Predictor, a predictor folder .* got int 42"),
    ],
)
def test_a_bad_argument_is_refused_naming_it(model, overrides, message):
    with pytest.raises(ValueError, match=message):
        call(model, **overrides)


def test_a_seed_that_overflows_for_the_last_request_is_refused_before_any_work(model):
    # 2**64 - 2 is a valid seed for request 0, but request 2 would get 2**64: "Overflow" in
    # one request of the batch, after the others ran.
    with pytest.raises(ValueError, match=r"seed must be at most 2\*\*64 - 3 with 3 prompts"):
        call(model, OK * 3, seed=2**64 - 2, do_sample=True)
    out = call(model, OK * 3, seed=2**64 - 3, do_sample=True)
    assert out.errors == {} and out.finish_reasons == ["length"] * 3
    assert call(model, OK, seed=-(2**63), do_sample=True).errors == {}


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ("hello", r"non-empty list of prompts.*got a str \(text: tokenize it first\)"),
        (b"hello", r"got a bytes \(text: tokenize it first\)"),
        ([1, 2, 3], r"got one list of ints \[1, 2, 3\] \(one prompt\? pass \[prompt\]\)"),
        (torch.tensor([1, 2, 3]), r"one tensor must be 2-D \[prompts, tokens\], got shape \[3\]"),
        (torch.tensor(5), r"one tensor must be 2-D .*got shape \[\]"),
        ({1: [1, 2]}, "non-empty list of prompts.*got dict"),
    ],
)
def test_prompts_that_are_not_a_list_of_token_id_lists_say_what_they_are(model, prompts, message):
    with pytest.raises(ValueError, match=message) as refused:
        call(model, prompts)
    assert "of length 0" not in str(refused.value)


def test_numpy_scalars_are_taken_as_the_numbers_they_hold(model):
    reference = call(model, OK * 2, max_new_tokens=3, batch_size=2)
    out = call(
        model,
        np.array(OK * 2),
        max_new_tokens=np.int64(3),
        batch_size=np.int32(2),
        active_batches=np.int64(2),
        prefill_padding=np.float32(0.5),
        eos_token_id=np.int64(0),
    )
    assert out.sequences == [s[: s.index(0) + 1] if 0 in s else s for s in reference.sequences]
    sampled = [
        call(model, OK * 2, **args).sequences
        for args in (
            dict(do_sample=True, seed=5, top_k=3, top_p=0.5, temperature=0.7),
            dict(
                do_sample=np.bool_(True),
                seed=np.int64(5),
                top_k=np.int64(3),
                top_p=np.float32(0.5),
                temperature=np.float64(0.7),
            ),
        )
    ]
    assert sampled[0] == sampled[1]
    assert call(model, OK, eos_token_id=torch.tensor([5, 7])).errors == {}


def test_a_tiny_temperature_samples_the_most_likely_token_instead_of_nan(model):
    # logits / 1e-45 were inf, softmax NaN: every request failed in torch.multinomial.
    prompts = [[1, 2, 3], [4, 5], [9]]
    greedy = call(model, prompts, max_new_tokens=4, batch_size=2)
    cold = call(model, prompts, max_new_tokens=4, batch_size=2, do_sample=True, temperature=1e-45)
    assert cold.errors == {}
    assert cold.sequences == greedy.sequences
    logits = torch.tensor([[0.0, 3.0, 3.0, -1.0]])  # a tie: both best tokens may come
    draws = {_Sampling(do_sample=True, temperature=1e-45).pick(logits, [_Request(i, [1])])[0]
             for i in range(40)}  # fmt: skip
    assert draws == {1, 2}


def test_absurd_active_batches_do_no_work_for_batches_that_stay_empty(model):
    # Admission fills the first batches: only ceil(requests / batch_size) ever hold one, yet
    # every round visited all 10**7 (minutes).
    prompts = [[1, 2], [3], [4, 5, 6]]
    reference = call(model, prompts, max_new_tokens=3, batch_size=2)
    started = time.perf_counter()
    for schedule in ("fifo", "expertflow"):
        out = call(
            model, prompts, max_new_tokens=3, batch_size=2, active_batches=10**7, schedule=schedule
        )
        assert out.sequences == reference.sequences
    huge_batch = call(model, prompts, max_new_tokens=3, batch_size=10**12)
    assert huge_batch.sequences == reference.sequences
    assert time.perf_counter() - started < 20


def test_a_huge_max_new_tokens_ends_at_the_context(model):
    context = model.config.max_position_embeddings
    prompt = [3] * (context - 2)
    out = call(model, [prompt], max_new_tokens=10**12)
    assert out.finish_reasons == ["context"] and out.sequences[0] == alone(model, prompt, 2)


def test_a_predictor_with_a_smaller_vocabulary_is_refused_before_any_work(model):
    from expertflow.prediction import CombinedPredictor, HistoryPredictor, PathPredictor

    # It failed on the first prompted or generated id past its vocabulary, after prefilling.
    small = PathPredictor(2, 8, 2, vocab_size=40, d_model=16, heads=2, depth=1, context=8)
    both = CombinedPredictor([HistoryPredictor(2, 8, 2), small], [1.0, 1.0])
    for predictor in (small, both):
        with pytest.raises(ValueError, match=r"predictor reads token ids in \[0, 40\), .* 96"):
            call(model, [[1, 2], [3, 4]], schedule="expertflow", active_batches=2,
                 predictor=predictor)  # fmt: skip
    fits = PathPredictor(2, 8, 2, vocab_size=96, d_model=16, heads=2, depth=1, context=8)
    out = call(model, [[1, 2], [3, 95]], schedule="expertflow", active_batches=2, predictor=fits)
    assert out.finish_reasons == ["length", "length"]
    assert call(model, [[1, 2]], predictor=small).errors == {}  # fifo does not run it


def test_without_the_models_vocabulary_prompts_are_checked_against_the_predictors():
    from expertflow.prediction import PathPredictor
    from expertflow.serving.generation import _check_predictor_vocab

    small = PathPredictor(2, 8, 2, vocab_size=40, d_model=16, heads=2, depth=1, context=8)
    requests = [_Request(0, [1, 2]), _Request(1, [3, 50])]
    with pytest.raises(ValueError, match=r"prompts\[1\] has token id 50, outside the pred"):
        _check_predictor_vocab(small, None, requests)
    _check_predictor_vocab(small, 40, requests[:1])
    _check_predictor_vocab(None, 96, requests)
