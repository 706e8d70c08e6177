"""Evaluation where a trace cannot show everything: no token ids (routing-only prediction),
and fewer sequences than a decode batch."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from expertflow import cli
from expertflow.prediction import (
    CombinedPredictor,
    HistoryPredictor,
    PathPredictor,
    Predictor,
)
from expertflow.prediction.evaluation import evaluate_predictor, format_evaluation
from expertflow.traces.format import Trace, save_trace
from tests.runtime.test_predictor import EXPERTS, LAYERS, VOCAB, token_routed_trace


def without_ids(trace: Trace) -> Trace:
    return Trace(expert_ids=trace.expert_ids, sequence_ids=trace.sequence_ids, meta=trace.meta)


def test_history_predictor_runs_from_routing_alone_without_token_ids():
    train, held = token_routed_trace(1), token_routed_trace(2, sequences=6)
    # Without ids the per-token-id term drops out: the scores are those of a predictor that
    # gives that term no weight, on the same trace with its ids.
    routing_only = HistoryPredictor(LAYERS, EXPERTS, 2, w_token=0.0).fit([train])
    fitted = HistoryPredictor(LAYERS, EXPERTS, 2).fit([without_ids(train)])
    np.testing.assert_allclose(
        fitted.predict_trace(without_ids(held)), routing_only.predict_trace(held), atol=1e-6
    )
    assert not fitted._token_sum  # nothing learned per id: there were none
    # The previous token's routing is scored: the second token of a sequence sees the first's.
    scores = HistoryPredictor(LAYERS, EXPERTS, 2).predict_trace(without_ids(held))
    first = held.expert_ids[0]
    for layer in range(LAYERS):
        assert set(np.argsort(-scores[1, layer])[:2]) == set(first[layer])


def test_predictors_that_read_token_ids_refuse_a_trace_without_them():
    held = without_ids(token_routed_trace(2, sequences=4))
    path = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=8)
    with pytest.raises(ValueError, match="the path predictor reads token ids: this trace has no"):
        path.predict_trace(held)
    with pytest.raises(ValueError, match="nothing of the path predictor scores from routing"):
        evaluate_predictor(path, held)
    other = PathPredictor(LAYERS + 1, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=8)
    with pytest.raises(ValueError, match="4 layers x 8 experts, the trace has 3 layers"):
        evaluate_predictor(other, held)  # the other model, before the missing ids

    class Constant(Predictor):  # a kind of its own: assumed to read ids, as before
        def predict_step(self, histories, previous):
            return np.zeros((len(histories), LAYERS, EXPERTS), np.float32)

    with pytest.raises(ValueError, match="Constant reads token ids: this trace has no"):
        Constant(LAYERS, EXPERTS, 2).predict_trace(held)


def test_evaluation_without_token_ids_says_what_it_lacks():
    train, held = token_routed_trace(1), token_routed_trace(2, sequences=6)
    history = HistoryPredictor(LAYERS, EXPERTS, 2).fit([train])
    path = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=8)
    combined = CombinedPredictor([path, copy.deepcopy(history)], [1.0, 0.5])  # it learns online
    result = evaluate_predictor(combined, without_ids(held), batch_sizes=(1,))
    (note,) = result["notes"]
    assert note.startswith("the trace has no token_ids: part 0 (path) left out")
    assert "history predictor scores from the previous token's routing" in note
    # What was scored: the history part alone (its weight does not change the ranking).
    alone = evaluate_predictor(copy.deepcopy(history), without_ids(held), batch_sizes=(1,))
    assert result["results"] == alone["results"]
    assert f"note: {note}" in format_evaluation(result).splitlines()
    assert evaluate_predictor(history, held, batch_sizes=(1,))["notes"] == []


def test_eval_and_train_predictor_commands_on_a_trace_without_token_ids(tmp_path, capsys):
    save_trace(without_ids(token_routed_trace(1, sequences=20)), tmp_path / "t.npz")
    traces = ["--traces", str(tmp_path / "t.npz")]
    assert cli.main(["eval-predictor", "--predictor", "history", *traces]) == 0
    out = capsys.readouterr().out
    assert "note: the trace has no token_ids: the history predictor scores from" in out
    train = ["train-predictor", *traces, "--out", str(tmp_path / "h"), "--kind", "history"]
    assert cli.main(train) == 0
    assert "480 without token ids: routing only" in capsys.readouterr().out
    assert cli.main(["eval-predictor", "--predictor", str(tmp_path / "h"), *traces, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["notes"][0].startswith("the trace has no token_ids")
    path = ["train-predictor", *traces, "--out", str(tmp_path / "p"), "--kind", "path"]
    assert cli.main(path) == 2
    assert "1 of 1 traces have no token_ids, and --kind path" in capsys.readouterr().err


def test_batch_sizes_above_the_number_of_sequences_are_not_applicable():
    trace = token_routed_trace(3, sequences=1, length=30)
    result = evaluate_predictor(HistoryPredictor(LAYERS, EXPERTS, 2), trace)
    assert result["sequences"] == 1
    by_batch = {}
    for row in result["results"]:
        by_batch.setdefault(row["batch_size"], []).append(row)
    assert all(r["mean_recall"] is not None and "not_applicable" not in r for r in by_batch[1])
    for batch in (4, 16):
        for r in by_batch[batch]:
            assert r["not_applicable"] == "the trace has 1 sequence"
            assert r["recall"] is r["mean_recall"] is r["precision"] is r["mean_precision"] is None
    lines = format_evaluation(result).splitlines()
    assert "    4  not applicable (the trace has 1 sequence)" in lines
    assert "   16  not applicable (the trace has 1 sequence)" in lines
    assert sum("not applicable" in line for line in lines) == 2  # once per batch size
    # As many sequences as the batch: applicable (every step is the union of all of them).
    four = evaluate_predictor(HistoryPredictor(LAYERS, EXPERTS, 2), token_routed_trace(3, 4, 5))
    rows = {r["batch_size"]: r for r in four["results"] if r["multiple"] == 1.0}
    assert rows[4]["mean_recall"] is not None and rows[16]["mean_recall"] is None
    assert rows[16]["not_applicable"] == "the trace has 4 sequences"


def test_eval_predictor_json_has_null_figures_for_a_single_sequence(tmp_path, capsys):
    save_trace(token_routed_trace(3, sequences=1, length=30), tmp_path / "one.npz")
    argv = ["eval-predictor", "--predictor", "history", "--traces", str(tmp_path / "one.npz")]
    assert cli.main(argv + ["--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    sixteen = [r for r in result["results"] if r["batch_size"] == 16]
    assert len(sixteen) == 3 and all(r["mean_recall"] is None for r in sixteen)
    assert cli.main(argv) == 0
    assert "   16  not applicable (the trace has 1 sequence)" in capsys.readouterr().out
