"""Predictors on traces whose routing is a known function of the tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertflow.prediction import (
    HistoryPredictor,
    PathPredictor,
    load_predictor,
    multi_hot,
    topk_recall_precision,
)
from expertflow.prediction.evaluation import decode_groups, evaluate_predictor
from expertflow.traces.format import Trace

LAYERS, EXPERTS, VOCAB = 3, 8, 40


def token_routed_trace(seed, sequences=30, length=24, sources=None):
    """Each token id has a fixed top-2 path through the layers (as real early layers nearly
    do), so a predictor that knows the id knows the routing."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(123).permuted(
        np.tile(np.arange(EXPERTS), (VOCAB, LAYERS, 1)), axis=-1
    )[:, :, :2]
    tokens = rng.integers(0, VOCAB, size=sequences * length)
    meta = {
        "model": "synthetic",
        "num_experts": EXPERTS,
        "top_k": 2,
        "expert_bytes": 10,
        "vocab_size": VOCAB,
    }
    if sources:
        meta["sequence_sources"] = [sources[s % len(sources)] for s in range(sequences)]
    return Trace(
        expert_ids=table[tokens],
        token_ids=tokens,
        sequence_ids=np.repeat(np.arange(sequences), length),
        meta=meta,
    )


def test_multi_hot_and_recall_precision_by_hand():
    hot = multi_hot(np.array([[0, 2], [-1, 3]]), 4)
    assert hot.tolist() == [[1, 0, 1, 0], [0, 0, 0, 1]]
    scores = np.array([[[0.9, 0.1, 0.8, 0.0]], [[0.0, 0.9, 0.0, 0.8]]])  # [T=2, L=1, E=4]
    routed = np.array([[[0, 2]], [[1, 2]]])
    recall, precision = topk_recall_precision(scores, routed, [np.array([0]), np.array([1])], 2)
    assert recall.tolist() == [0.75] and precision.tolist() == [0.75]
    recall, precision = topk_recall_precision(scores, routed, [np.array([0, 1])], 2)
    assert recall.tolist() == [1.0] and precision.tolist() == [0.75]  # {0,1,2,3} vs {0,1,2}


def test_decode_groups_batch_sequences_step_by_step():
    trace = token_routed_trace(0, sequences=5, length=3)
    groups = decode_groups(trace, 2)
    assert [g.tolist() for g in groups[:3]] == [[0, 3], [1, 4], [2, 5]]
    assert [g.tolist() for g in groups[-3:]] == [[12], [13], [14]]


@pytest.mark.parametrize("kind", ["history", "path"])
def test_predictors_learn_token_determined_routing(kind, tmp_path):
    train, held = token_routed_trace(1, sequences=120), token_routed_trace(2)
    if kind == "history":
        predictor = HistoryPredictor(LAYERS, EXPERTS, 2).fit([train])
    else:
        predictor = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=32, context=16)
        predictor.fit([train], epochs=20, lr=1e-2, log=None)
    result = evaluate_predictor(predictor, held, batch_sizes=(1, 4))
    single = next(r for r in result["results"] if r["batch_size"] == 1 and r["multiple"] == 1)
    assert single["mean_recall"] >= 0.95
    # An untrained predictor of the same kind does much worse: the test can fail.
    if kind == "path":
        blank = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=32, context=16)
        base = evaluate_predictor(blank, held, batch_sizes=(1,))["results"][0]["mean_recall"]
        assert base < 0.6
    predictor.save(tmp_path)
    again = load_predictor(tmp_path)
    np.testing.assert_allclose(again.predict_trace(held), predictor.predict_trace(held), atol=1e-6)


def test_history_predictor_learns_online_without_training():
    held = token_routed_trace(3, sequences=60)
    scores = HistoryPredictor(LAYERS, EXPERTS, 2).predict_trace(held)
    groups = [np.array([r]) for r in range(held.num_tokens)]
    early, _ = topk_recall_precision(scores[:100], held.expert_ids[:100], groups[:100], 2)
    late, _ = topk_recall_precision(scores, held.expert_ids, groups[-400:], 2)
    assert late.mean() > 0.9 and late.mean() > early.mean()


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("use_previous", [True, False])
def test_path_predictor_single_steps_match_the_whole_trace_scoring(use_previous, native):
    trace = token_routed_trace(4, sequences=2, length=40)
    predictor = PathPredictor(
        LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=16, use_previous=use_previous
    )
    predictor.native = native
    whole = predictor.predict_trace(trace)
    ids = trace.token_ids[:40].tolist()
    # Within the first window, step-by-step prediction sees exactly the same ids (and, once
    # each token's routing is observed, the same previous routing).
    predictor.reset()
    for i in range(16):
        np.testing.assert_allclose(predictor.predict(ids[: i + 1]), whole[i], atol=1e-5)
        predictor.observe(trace.expert_ids[i])


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_path_predictor_batched_cached_steps_match_the_whole_trace_scoring(native):
    """Rows of different lengths, reordered every step, past several windows: each step runs
    one token on cached keys/values and must score exactly as whole-trace scoring does."""
    trace = token_routed_trace(5, sequences=3, length=50)
    predictor = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=12)
    predictor.native = native
    gen = torch.Generator().manual_seed(0)
    for param in predictor.net.parameters():  # not trained: make every weight matter
        # bfloat16 values, as PathPredictor keeps them (the native decoder stores bfloat16)
        param.data.normal_(0, 0.3, generator=gen).copy_(param.data.bfloat16().float())
    whole = predictor.predict_trace(trace)
    rng = np.random.default_rng(0)
    rows = trace.sequence_rows()
    offsets = [0, 7, 19]  # the rows are at different lengths at every step
    for t in range(1, 50 - max(offsets)):
        order = rng.permutation(3)
        at = [rows[s][t + offsets[s]] for s in order]
        histories = [trace.token_ids[rows[s][: t + offsets[s] + 1]].tolist() for s in order]
        scores = predictor.predict_step(histories, trace.expert_ids[np.asarray(at) - 1])
        np.testing.assert_allclose(scores, whole[at], atol=2e-5)
    assert len(predictor._decoding.cache) <= 2 * 3  # grown windows' shorter selves are dropped


def markov_routed_trace(seed, sequences=60, length=24):
    """Routing that the ids say nothing about: each token takes the experts that follow its
    predecessor's in a fixed random permutation per layer (the first token starts anywhere)."""
    rng = np.random.default_rng(seed)
    step = np.random.default_rng(7).permuted(np.tile(np.arange(EXPERTS), (LAYERS, 1)), axis=-1)
    routing = np.zeros((sequences, length, LAYERS, 2), np.int64)
    routing[:, 0] = np.stack(
        [rng.choice(EXPERTS, (LAYERS, 2), replace=False) for _ in range(sequences)]
    )
    for t in range(1, length):
        routing[:, t] = step[np.arange(LAYERS)[None, :, None], routing[:, t - 1]]
    return Trace(
        expert_ids=routing.reshape(-1, LAYERS, 2),
        token_ids=rng.integers(0, VOCAB, size=sequences * length),
        sequence_ids=np.repeat(np.arange(sequences), length),
        meta={"model": "synthetic", "num_experts": EXPERTS, "top_k": 2, "expert_bytes": 10},
    )


def test_path_predictor_learns_from_the_previous_tokens_routing():
    train, held = markov_routed_trace(1, sequences=100), markov_routed_trace(2, sequences=30)
    recall = {}
    for use_previous in (True, False):
        predictor = PathPredictor(
            LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=32, context=16, use_previous=use_previous
        )
        predictor.fit([train], epochs=10, batch_size=8, lr=1e-2, log=None)
        result = evaluate_predictor(predictor, held, batch_sizes=(1,), multiples=(1.0,))
        recall[use_previous] = result["results"][0]["mean_recall"]
    # Only the previous routing tells: ids alone are no better than a guess (2 of 8 experts).
    assert recall[True] >= 0.9 and recall[False] < 0.5, recall


def test_path_predictor_saved_before_use_previous_still_loads(tmp_path):
    import json

    old = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, use_previous=False)
    old.save(tmp_path)
    meta = json.loads((tmp_path / "predictor.json").read_text())
    del meta["hparams"]["use_previous"]
    (tmp_path / "predictor.json").write_text(json.dumps(meta))
    held = token_routed_trace(2, sequences=2)
    loaded = load_predictor(tmp_path)
    assert not loaded.uses_previous
    np.testing.assert_allclose(loaded.predict_trace(held), old.predict_trace(held), atol=1e-6)


def test_bad_input(tmp_path):
    trace = token_routed_trace(0, sequences=2, length=4)
    other = HistoryPredictor(LAYERS + 1, EXPERTS, 2)
    with pytest.raises(ValueError, match="4 layers x 8 experts, the trace has 3 layers x 8"):
        other.predict_trace(trace)
    no_ids = Trace(expert_ids=trace.expert_ids, meta=trace.meta)
    with pytest.raises(ValueError, match="no token_ids"):
        PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB).fit([no_ids])
    with pytest.raises(ValueError, match="vocab_size is 10"):
        PathPredictor(LAYERS, EXPERTS, 2, vocab_size=10).predict_trace(trace)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        HistoryPredictor(LAYERS, 0, 2)
    with pytest.raises(ValueError, match="no predictor.json"):
        load_predictor(tmp_path)


def test_select_sources_keeps_whole_sequences():
    trace = token_routed_trace(0, sequences=6, length=5, sources=["a", "b", "c"])
    only_b = trace.select_sources(lambda s: s == "b")
    assert only_b.meta["sequence_sources"] == ["b", "b"]
    assert only_b.num_tokens == 10 and only_b.sequence_ids.tolist() == [0] * 5 + [1] * 5
    want = np.concatenate([trace.token_ids[5:10], trace.token_ids[20:25]])  # sequences 1, 4
    np.testing.assert_array_equal(only_b.token_ids, want)


def test_combined_predictor_sums_its_parts_and_round_trips(tmp_path):
    from expertflow.prediction import CombinedPredictor

    train, held = token_routed_trace(1), token_routed_trace(2, sequences=4)
    path = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=8)
    history = HistoryPredictor(LAYERS, EXPERTS, 2).fit([train])
    history.save(tmp_path / "h")
    combined = CombinedPredictor([path, history], [1.0, 0.5])
    expected = path.predict_trace(held) + 0.5 * load_predictor(tmp_path / "h").predict_trace(held)
    combined.save(tmp_path / "c")
    np.testing.assert_allclose(
        load_predictor(tmp_path / "c").predict_trace(held), expected, atol=1e-5
    )
    # Step-by-step use gives the same scores as whole-trace scoring.
    fresh = load_predictor(tmp_path / "c")
    fresh.reset()
    ids = held.token_ids[:5].tolist()
    for i in range(5):
        np.testing.assert_allclose(fresh.predict(ids[: i + 1]), expected[i], atol=1e-5)
        fresh.observe(held.expert_ids[i])
    with pytest.raises(ValueError, match="parts disagree"):
        CombinedPredictor([path, HistoryPredictor(LAYERS + 1, EXPERTS, 2)], [1, 1])
    # Reuse scores: those of the part that has a reuse head.
    assert combined.reuse_trace(held) is None
    path.add_reuse_head(8)
    np.testing.assert_allclose(combined.reuse_trace(held), path.reuse_trace(held))
    scores, reuse = combined.predict_step_with_reuse([ids], None)
    np.testing.assert_allclose(reuse, path.predict_step_with_reuse([ids], None)[1], atol=1e-6)


def test_train_and_eval_predictor_commands(tmp_path, capsys):
    import json

    from expertflow import cli
    from expertflow.traces.format import save_trace

    save_trace(token_routed_trace(1, sources=["a", "b", "c"]), tmp_path / "train.npz")
    save_trace(token_routed_trace(2, sources=["a", "b", "c"]), tmp_path / "held.npz")
    for kind in ("history", "path", "combined"):
        args = [
            "train-predictor",
            "--kind",
            kind,
            "--traces",
            str(tmp_path / "train.npz"),
            "--out",
            str(tmp_path / kind),
            "--epochs",
            "1",
            "--d-model",
            "16",
            "--context",
            "8",
            "--exclude-source",
            "c",
        ]
        assert cli.main(args) == 0
        assert f"wrote {kind} predictor" in capsys.readouterr().out
        args = [
            "eval-predictor",
            "--predictor",
            str(tmp_path / kind),
            "--traces",
            str(tmp_path / "held.npz"),
            "--only-source",
            "c",
            "--json",
            "--write-scores",
            str(tmp_path / f"{kind}.npz"),
        ]
        assert cli.main(args) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["tokens"] == 10 * 24  # the 10 sequences of source c
        assert {r["batch_size"] for r in result["results"]} == {1, 4, 16}
        assert np.load(tmp_path / f"{kind}.npz")["scores"].shape == (240, LAYERS, EXPERTS)
    bad = token_routed_trace(0)
    save_trace(
        Trace(
            expert_ids=bad.expert_ids[:, :2],
            token_ids=bad.token_ids,
            sequence_ids=bad.sequence_ids,
            meta=bad.meta,
        ),
        tmp_path / "other.npz",
    )
    args = [
        "eval-predictor",
        "--predictor",
        str(tmp_path / "path"),
        "--traces",
        str(tmp_path / "other.npz"),
    ]
    assert cli.main(args) == 2
    assert "3 layers x 8 experts, the trace has 2 layers" in capsys.readouterr().err
    args = [
        "eval-predictor",
        "--predictor",
        "history",
        "--traces",
        str(tmp_path / "held.npz"),
        "--only-source",
        "nope",
    ]
    assert cli.main(args) == 2
    assert "no tokens left" in capsys.readouterr().err


def topic_routed_trace(seed, sequences=40, length=40):
    """Each sequence has a topic (0 or 1) that its ids show (topic t draws ids from its own half
    of the vocabulary) and that routes every token to a random pair of the topic's four experts
    per layer: the next token's pair is a guess, but the experts of the next 16 tokens are not."""
    rng = np.random.default_rng(seed)
    topics = rng.integers(0, 2, sequences)
    experts = np.stack([rng.permuted(np.arange(4)) for _ in range(sequences * length * LAYERS)])
    experts = experts[:, :2].reshape(sequences, length, LAYERS, 2) + 4 * topics[:, None, None, None]
    ids = rng.integers(0, VOCAB // 2, (sequences, length)) + (VOCAB // 2) * topics[:, None]
    return Trace(
        expert_ids=experts.reshape(-1, LAYERS, 2),
        token_ids=ids.ravel(),
        sequence_ids=np.repeat(np.arange(sequences), length),
        meta={"model": "synthetic", "num_experts": EXPERTS, "top_k": 2, "expert_bytes": 10},
    ), topics


def test_reuse_head_learns_which_experts_come_back_beyond_the_next_token():
    train, _ = topic_routed_trace(1)
    held, topics = topic_routed_trace(2, sequences=6)
    predictor = PathPredictor(
        LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=16, reuse_hidden=32
    )
    predictor.fit([train], epochs=3, batch_size=8, lr=1e-2, reuse_epochs=0, log=None)
    predictor.fit_reuse([train], epochs=10, batch_size=64, log=None)
    scores, reuse = predictor.predict_trace(held), predictor.reuse_trace(held)
    early = np.concatenate([rows[4:-16] for rows in held.sequence_rows()])  # full horizons
    topic = np.repeat(topics, 40)[early]
    mine = np.zeros((len(early), EXPERTS), bool)
    for t in (0, 1):
        mine[topic == t, 4 * t : 4 * t + 4] = True
    mine = np.repeat(mine[:, None], LAYERS, axis=1)
    # The next step: one pair of four, 0.5 each. Within 1, 2, 4, 8, 16 tokens: 1 - 0.5^h, a
    # mean of 0.84; the other topic's experts: 0.
    assert 0.3 < scores[early][mine].mean() < 0.7
    assert abs(reuse[early][mine].mean() - 0.84) < 0.06 and reuse[early][~mine].mean() < 0.05
    assert predictor.predict_step_with_reuse([[1, 2]], None)[1].shape == (1, LAYERS, EXPERTS)


@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_reuse_scores_of_steps_match_the_trace_and_survive_saving(native, tmp_path):
    held, _ = topic_routed_trace(3, sequences=3, length=20)
    predictor = PathPredictor(
        LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16, context=8, reuse_hidden=16
    )
    predictor.fit([held], epochs=1, reuse_epochs=1, log=None)
    predictor.save(tmp_path)
    loaded = load_predictor(tmp_path)
    assert loaded.has_reuse and loaded.hparams["reuse_hidden"] == 16
    loaded.native = native
    want = predictor.reuse_trace(held)
    np.testing.assert_allclose(loaded.reuse_trace(held), want, atol=1e-6)
    rows = held.sequence_rows()[1]
    ids = held.token_ids[rows].tolist()
    for i in range(len(rows)):  # windows of 8 overlapping by half, as the trace scoring
        previous = held.expert_ids[rows[i - 1]][None] if i else None
        scores, reuse = loaded.predict_step_with_reuse([ids[: i + 1]], previous)
        np.testing.assert_allclose(reuse[0], want[rows[i]], atol=2e-5)
        np.testing.assert_allclose(scores[0], predictor.predict_trace(held)[rows[i]], atol=2e-5)


def test_predictors_without_a_reuse_head_say_so(tmp_path):
    trace = token_routed_trace(0, sequences=2, length=6)
    path = PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, d_model=16)
    history = HistoryPredictor(LAYERS, EXPERTS, 2)
    for predictor in (path, history):
        assert predictor.predict_step_with_reuse([[1, 2]], None)[1] is None
        assert predictor.reuse_trace(trace) is None
    with pytest.raises(ValueError, match="no reuse head: add_reuse_head"):
        path.fit_reuse([trace])
    with pytest.raises(ValueError, match="reuse_hidden must be >= 0"):
        PathPredictor(LAYERS, EXPERTS, 2, vocab_size=VOCAB, reuse_hidden=-1)
    before = path.predict_trace(trace)
    path.add_reuse_head(8).fit_reuse([trace], epochs=1, log=None)
    np.testing.assert_allclose(path.predict_trace(trace), before, atol=1e-6)  # head untouched
    assert path.reuse_trace(trace).shape == before.shape


def test_train_predictor_from_a_saved_one_adds_and_trains_only_the_reuse_head(tmp_path, capsys):
    from expertflow import cli
    from expertflow.traces.format import save_trace

    held, _ = topic_routed_trace(4, sequences=8, length=20)
    save_trace(held, tmp_path / "t.npz")
    common = ["train-predictor", "--traces", str(tmp_path / "t.npz"), "--d-model", "16"]
    plain = common + ["--out", str(tmp_path / "plain"), "--epochs", "1", "--reuse-hidden", "0"]
    assert cli.main(plain) == 0
    assert not load_predictor(tmp_path / "plain").has_reuse
    grown = common + ["--out", str(tmp_path / "grown"), "--epochs", "0"]
    assert cli.main(grown + ["--from", str(tmp_path / "plain")]) == 0
    before, after = load_predictor(tmp_path / "plain"), load_predictor(tmp_path / "grown")
    assert after.has_reuse and after.hparams["reuse_hidden"] == 128
    np.testing.assert_array_equal(after.predict_trace(held), before.predict_trace(held))
    argv = ["eval-predictor", "--predictor", str(tmp_path / "grown"), "--traces"]
    argv += [str(tmp_path / "t.npz"), "--write-scores", str(tmp_path / "s.npz")]
    assert cli.main(argv) == 0
    with np.load(tmp_path / "s.npz") as saved:
        np.testing.assert_allclose(saved["reuse"], after.reuse_trace(held), atol=1e-6)
    capsys.readouterr()
    assert cli.main(grown + ["--from", str(tmp_path / "plain"), "--kind", "history"]) == 2
    assert "--from starts from a path predictor" in capsys.readouterr().err
