"""Predictors refuse bad construction, training and prediction arguments with a ValueError
naming the argument, what was expected and what was given (issue 21)."""

from __future__ import annotations

import numpy as np
import pytest

from expertflow.prediction import CombinedPredictor, HistoryPredictor, PathPredictor
from expertflow.traces.format import Trace
from tests.runtime.test_predictor import EXPERTS, LAYERS, VOCAB, token_routed_trace

SMALL = dict(vocab_size=VOCAB, d_model=16, heads=2, depth=1, context=8)


def path(**overrides) -> PathPredictor:
    return PathPredictor(LAYERS, EXPERTS, 2, **{**SMALL, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # train-predictor --d-model 15: an AssertionError from nn.MultiheadAttention.
        (dict(d_model=15, heads=4), "d_model must be a multiple of heads=4 .*got d_model=15"),
        (dict(d_model=0), r"d_model must be >= 1 \(an int\), got 0"),
        (dict(heads=0), r"heads must be >= 1 \(an int\), got 0"),
        (dict(depth=0), r"depth must be >= 1 \(an int\), got 0"),
        (dict(context=0), r"context must be >= 1 \(an int\), got 0"),
        (dict(vocab_size=0), r"vocab_size must be >= 1 \(an int\), got 0"),
        (dict(vocab_size=40.0), r"vocab_size must be >= 1 \(an int\), got 40.0"),
        (dict(d_model=True), r"d_model must be >= 1 \(an int\), got True"),
        (dict(reuse_hidden=-1), r"reuse_hidden must be >= 0 \(an int\), got -1"),
        (dict(use_previous="no"), "use_previous must be a bool, got 'no'"),
    ],
)
def test_path_predictor_construction_refuses_bad_sizes(overrides, message):
    with pytest.raises(ValueError, match=message):
        path(**overrides)


def test_path_predictor_takes_numpy_sizes():
    p = path(d_model=np.int64(16), context=np.int32(8))
    assert p.hparams["d_model"] == 16 and type(p.hparams["context"]) is int


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # train-predictor --batch-size 0: ZeroDivisionError in the step count.
        (dict(batch_size=0), r"batch_size must be >= 1 \(an int\), got 0"),
        (dict(batch_size=2.5), r"batch_size must be >= 1 \(an int\), got 2.5"),
        (dict(epochs=-1), r"epochs must be >= 0 \(an int\), got -1"),
        (dict(reuse_epochs=-1), r"reuse_epochs must be >= 0 \(an int\), got -1"),
        (dict(lr=0.0), "lr must be a finite number > 0, got 0.0"),
        (dict(lr=-1e-3), "lr must be a finite number > 0, got -0.001"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
    ],
)
def test_fit_refuses_bad_training_options(overrides, message):
    trace = token_routed_trace(0, sequences=2, length=4)
    p = path(reuse_hidden=4)
    with pytest.raises(ValueError, match=message):
        p.fit([trace], **{"epochs": 1, "log": None, **overrides})
    fit_reuse = {k: v for k, v in overrides.items() if k != "reuse_epochs"}
    if fit_reuse:
        with pytest.raises(ValueError, match=message):
            p.fit_reuse([trace], **{"epochs": 1, "log": None, **fit_reuse})


def test_fit_with_no_epochs_or_no_tokens():
    trace = token_routed_trace(0, sequences=2, length=4)
    p = path()
    before = p.predict_trace(trace)
    p.fit([trace], epochs=0, log=None)  # was: OneCycleLR refusing a schedule of 0 steps
    np.testing.assert_array_equal(p.predict_trace(trace), before)
    empty = Trace(
        expert_ids=np.zeros((0, LAYERS, 2), np.int64),
        token_ids=np.zeros(0, np.int64),
        meta=trace.meta,
    )
    for traces in ([], [empty]):  # was: np.stack of no windows
        with pytest.raises(ValueError, match="traces must be a non-empty list of traces holding"):
            p.fit(traces, log=None)
    with pytest.raises(ValueError, match="add_reuse_head"):
        p.fit_reuse([trace])
    with pytest.raises(ValueError, match=r"hidden must be >= 1 \(an int\), got 0"):
        p.add_reuse_head(0)


def negative_id_trace():
    trace = token_routed_trace(0, sequences=2, length=4)
    trace.token_ids = trace.token_ids.copy()
    trace.token_ids[5] = -3  # past the trace's own checks, as a caller's array could be
    return trace


@pytest.mark.parametrize(
    "make", [lambda: HistoryPredictor(LAYERS, EXPERTS, 2), path], ids=["history", "path"]
)
def test_negative_token_ids_are_refused_naming_them(make):
    trace = negative_id_trace()
    predictor = make()
    with pytest.raises(ValueError, match="token_ids must be token ids >= 0, got -3"):
        predictor.fit([trace], **({} if isinstance(predictor, HistoryPredictor) else {"log": None}))
    with pytest.raises(ValueError, match="token_ids must be token ids >= 0, got -3"):
        predictor.predict_trace(trace)
    predictor.reset()
    with pytest.raises(ValueError, match="token_ids must be token ids .*got -1"):
        predictor.predict([4, -1])
    with pytest.raises(ValueError, match=r"token_ids must be a non-empty list of token ids"):
        predictor.predict([])


def test_path_predictor_steps_refuse_ids_outside_its_vocabulary_on_either_decoder():
    p = path()
    for native in (True, False):  # the torch one raised a bare IndexError
        p.native = native
        for bad in (-1, VOCAB):
            with pytest.raises(ValueError, match=rf"vocabulary \[0, {VOCAB}\), got {bad}"):
                p.predict_step([[1, 2], [3, bad]], None)
    with pytest.raises(ValueError, match="token_ids must be int token ids"):
        p.predict_step([[1, None]], None)


def test_history_predictor_learn_refuses_bad_ids_and_routing():
    h = HistoryPredictor(LAYERS, EXPERTS, 2)
    routing = np.zeros((1, LAYERS, 2), np.int64)
    with pytest.raises(ValueError, match="token_ids must be token ids >= 0, got -5"):
        h.learn([-5], routing)  # was learnt as a token of its own
    with pytest.raises(ValueError, match=r"routing must be int expert ids \[2, 3, K\]"):
        h.learn([1, 2], routing)
    with pytest.raises(ValueError, match=r"routing must hold expert ids in \[-1, 8\), got"):
        h.learn([1], routing + EXPERTS)
    with pytest.raises(ValueError, match="token_ids must be token ids >= 0, got -2"):
        h.predict_step([[1, -2]], None)
    h.learn([1, None], np.full((2, LAYERS, 2), -1))  # unknown ids and unrecorded experts
    assert h._token_count == {1: 1}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (dict(w_token=-1.0), r"HistoryPredictor: w_token must be a finite number >= 0, got -1.0"),
        (dict(w_previous=float("nan")), "w_previous must be a finite number >= 0, got nan"),
        (dict(w_frequency=float("inf")), "w_frequency must be a finite number >= 0, got inf"),
        (dict(w_token="1"), "w_token must be a finite number >= 0, got '1'"),
    ],
)
def test_history_predictor_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        HistoryPredictor(LAYERS, EXPERTS, 2, **weights)


def test_combined_predictor_weights_and_parts():
    parts = [HistoryPredictor(LAYERS, EXPERTS, 2), HistoryPredictor(LAYERS, EXPERTS, 2)]
    cases = [
        ((parts, [1.0]), r"CombinedPredictor: expected 2 weights .*got 1"),
        ((parts, [1.0, -0.5]), r"CombinedPredictor: weights\[1\] must be a finite number >= 0"),
        ((parts, [float("nan"), 1.0]), r"weights\[0\] must be a finite number >= 0, got nan"),
        ((parts, 0.5), "CombinedPredictor: weights must be a list of numbers, got 0.5"),
        (([], []), "CombinedPredictor: parts must be a non-empty list"),
        (([parts[0], "history"], [1.0, 1.0]), r"parts\[1\] must be a Predictor, got str"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            CombinedPredictor(*args)
    combined = CombinedPredictor(tuple(parts), (np.float32(1.0), 0.5))
    assert combined.weights == [1.0, 0.5]


def test_evaluate_scores_refuses_scores_and_options_it_cannot_read():
    from expertflow.prediction.evaluation import evaluate_scores

    trace = token_routed_trace(0, sequences=2, length=4)
    scores = np.zeros((trace.num_tokens, LAYERS, EXPERTS), np.float32)
    cases = [
        ((scores[:-1],), r"scores must be an array of shape \[8, 3, 8\], got \(7, 3, 8\)"),
        ((np.full_like(scores, np.nan),), "scores must not hold NaN"),
        ((scores, (1, 0)), r"batch_sizes must be >= 1 \(an int\), got 0"),
        ((scores, (1.5,)), r"batch_sizes must be >= 1 \(an int\), got 1.5"),
        ((scores, (1,), (1.0, -1.0)), "multiples must be a finite number > 0, got -1.0"),
        ((scores, (1,), (float("nan"),)), "multiples must be a finite number > 0, got nan"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            evaluate_scores(args[0], trace, *args[1:])
    assert evaluate_scores(scores, trace)["results"]
