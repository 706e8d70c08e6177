"""Issue 21: every command refuses damaged inputs and bad arguments with one line,
``expertflow <command>: error: <what>``, and exit status 2; never a traceback.

Most cases run in-process through ``expertflow.cli.main`` (an import of expertflow costs seconds
per subprocess); the ones that once ran out of memory or time run in a subprocess under a
memory and a time limit (tests/runtime/test_cli_limits.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from expertflow.cli import main

TOKENS, LAYERS, EXPERTS, K = 24, 3, 8, 2


def good_fields() -> dict:
    """The arrays and meta of a valid trace (two sequences, sources, prompt flags, lookahead)."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(EXPERTS)[:K] for _ in range(TOKENS * LAYERS)])
    ids = ids.reshape(TOKENS, LAYERS, K).astype(np.int32)
    return {
        "expert_ids": ids,
        "lookahead_ids": ids.copy(),
        "token_ids": rng.integers(0, 50, TOKENS),
        "sequence_ids": np.repeat([0, 1], TOKENS // 2),
        "meta": {
            "model": "m",
            "num_experts": EXPERTS,
            "top_k": K,
            "expert_bytes": 100,
            "vocab_size": 50,
            "prefill": [True] * 4 + [False] * 8 + [True] * 4 + [False] * 8,
            "sequence_sources": ["a", "b"],
        },
    }


def write_raw(path: Path, **changes) -> str:
    """A trace file written without validation: ``changes`` replace fields (None drops one;
    ``meta`` entries are merged)."""
    fields = good_fields()
    fields["meta"].update(changes.pop("meta", {}))
    fields.update(changes)
    arrays = {k: v for k, v in fields.items() if v is not None and k != "meta"}
    np.savez(path, meta=np.array(json.dumps(fields["meta"])), **arrays)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("cli_errors")
    f = {"dir": str(d), "good": write_raw(d / "good.npz")}
    np.save(d / "plain.npy", good_fields()["expert_ids"])
    f["npy"] = str(d / "plain.npy")
    bad_traces = {
        "neg_seq": {"sequence_ids": np.repeat([0, -1], TOKENS // 2)},
        "prefill_no": {"meta": {"prefill": ["no"] * TOKENS}},
        "few_sources": {"meta": {"sequence_sources": ["a"]}},
        "str_sources": {"meta": {"sequence_sources": "ab"}},
        "seq_past_sources": {"sequence_ids": np.repeat([0, 5], TOKENS // 2)},
        "lookahead_big": {"lookahead_ids": np.full((TOKENS, LAYERS, K), EXPERTS)},
        "neg_tokens": {"token_ids": np.full(TOKENS, -3)},
        "str_vocab": {"meta": {"vocab_size": "50"}},
        "experts_1e9": {"meta": {"num_experts": 10**9}},
        "experts_float": {"meta": {"num_experts": 1e9}},
        "experts_200k": {"meta": {"num_experts": 200_000}},
    }
    for name, changes in bad_traces.items():
        f[name] = write_raw(d / f"{name}.npz", **changes)
    good = save_and_score(d)
    f.update(good)
    return f


def save_and_score(d: Path) -> dict[str, str]:
    """Predictions files (good, truncated, empty, plain .npy, NaN) and predictor folders (good,
    truncated weights, bad JSON)."""
    from expertflow.prediction import HistoryPredictor, PathPredictor

    out = {}
    scores = np.random.default_rng(1).random((TOKENS, LAYERS, EXPERTS), dtype=np.float32)
    np.savez_compressed(d / "scores.npz", scores=scores)
    data = (d / "scores.npz").read_bytes()
    for name, content in (("scores_cut", data[: len(data) // 2]), ("scores_empty", b"")):
        (d / f"{name}.npz").write_bytes(content)
        out[name] = str(d / f"{name}.npz")
    np.save(d / "scores_plain.npy", scores)
    out["scores_npy"] = str(d / "scores_plain.npy")
    np.savez(d / "scores_nan.npz", scores=np.full_like(scores, np.nan))
    out["scores_nan"] = str(d / "scores_nan.npz")
    predictor = PathPredictor(LAYERS, EXPERTS, K, vocab_size=50, d_model=8, depth=1, context=8)
    predictor.save(d / "pred")
    meta_text = (d / "pred" / "predictor.json").read_text()
    cut = d / "pred_cut"
    predictor.save(cut)
    weights = (cut / "path_predictor.pt").read_bytes()
    (cut / "path_predictor.pt").write_bytes(weights[: len(weights) // 2])
    other = d / "pred_other"  # weights of another size than its predictor.json says
    PathPredictor(LAYERS, EXPERTS, K, vocab_size=50, d_model=16, depth=1, context=8).save(other)
    (other / "path_predictor.pt").write_bytes((d / "pred" / "path_predictor.pt").read_bytes())
    bad_json = d / "pred_json"
    predictor.save(bad_json)
    (bad_json / "predictor.json").write_text("{not json")
    huge = d / "pred_huge"
    predictor.save(huge)
    meta = json.loads((huge / "predictor.json").read_text())
    meta["hparams"]["vocab_size"] = 10**12
    (huge / "predictor.json").write_text(json.dumps(meta))
    history = d / "hist_cut"
    HistoryPredictor(LAYERS, EXPERTS, K).save(history)
    table = (history / "history.npz").read_bytes()
    (history / "history.npz").write_bytes(table[: len(table) // 2])
    for name, change in (("pred_wide", {"num_experts": 10**9}), ("pred_list", None)):
        (d / name).mkdir()
        text = json.dumps([1, 2] if change is None else json.loads(meta_text) | change)
        (d / name / "predictor.json").write_text(text)
    (d / "a_file").write_text("x")
    out |= {
        k: str(d / k)
        for k in (
            "pred",
            "pred_cut",
            "pred_other",
            "pred_json",
            "pred_huge",
            "hist_cut",
            "pred_wide",
            "pred_list",
        )
    }
    out["a_file"] = str(d / "a_file")
    out["text"] = str(d / "a_file")
    return out


def _trace_commands(key: str) -> list[str]:
    """The same damaged trace given to every command that reads traces."""
    return [
        f"replay --trace {{{key}}} --policy lru --slots 8",
        f"routing-stats --trace {{{key}}}",
        f"train-predictor --kind history --traces {{{key}}} --out {{dir}}/p_{key}",
        f"eval-predictor --predictor history --traces {{{key}}}",
    ]


PRED = "replay --trace {good} --policy expertflow --slots 8 --predictions "
TRAIN = "train-predictor --traces {good} --out {dir}/p3 "
# (argv with {file} placeholders, a fragment the one-line message must hold)
CASES = [
    *[(argv, "a trace is an .npz archive") for argv in _trace_commands("npy")],
    *[(argv, "meta.num_experts must be in [1, 65536]") for argv in _trace_commands("experts_1e9")],
    *[(argv, "meta.num_experts must be in [1, 65536]") for argv in _trace_commands("experts_200k")],
    *[(argv, "meta.num_experts must be int") for argv in _trace_commands("experts_float")],
    ("routing-stats --trace {neg_seq}", "sequence_ids must be >= 0"),
    ("replay --trace {prefill_no} --policy lru --slots 8", "meta.prefill must be a list of"),
    ("routing-stats --trace {few_sources}", "meta.sequence_sources must label every sequence id"),
    ("routing-stats --trace {str_sources}", "meta.sequence_sources must be a list of strings"),
    ("routing-stats --trace {seq_past_sources}", "sequence_ids reach 5"),
    ("replay --trace {lookahead_big} --policy expertflow --slots 8 --lookahead", "lookahead_ids"),
    ("eval-predictor --predictor {pred} --traces {neg_tokens}", "token_ids must be in [0,"),
    ("train-predictor --traces {neg_tokens} --out {dir}/p1", "token_ids must be in [0,"),
    ("train-predictor --traces {str_vocab} --out {dir}/p2", "meta.vocab_size must be an integer"),
    (PRED + "{scores_cut}", "scores_cut"),
    (PRED + "{scores_empty}", "scores"),
    (PRED + "{scores_npy}", "bare array"),
    (PRED + "{scores_nan}", "finite"),
    ("replay --trace {good} --policy lru --slots -3", "num_slots"),
    ("eval-predictor --predictor {pred_cut} --traces {good}", "path_predictor.pt does not hold"),
    ("eval-predictor --predictor {pred_other} --traces {good}", "path_predictor.pt does not hold"),
    ("eval-predictor --predictor {pred_json} --traces {good}", "predictor.json is not valid JSON"),
    (
        "eval-predictor --predictor {pred_huge} --traces {good}",
        "hparams.vocab_size must be at most",
    ),
    ("eval-predictor --predictor {a_file} --traces {good}", "has no predictor.json"),
    ("eval-predictor --predictor {hist_cut} --traces {good}", "hist_cut: a damaged or incomplete"),
    ("eval-predictor --predictor {pred_wide} --traces {good}", "num_experts must be at most 65536"),
    ("eval-predictor --predictor {pred_list} --traces {good}", "must hold a JSON object"),
    ("eval-predictor --predictor history --traces {good} --write-scores {dir}", "is a folder"),
    (
        "eval-predictor --predictor history --traces {good} --write-scores {dir}/no/s.npz",
        "does not exist",
    ),
    ("train-predictor --traces {good} --out {a_file}", "--out: "),
    ("train-predictor --traces {good} --out {a_file}/sub", "is a file, not a folder"),
    (TRAIN + "--d-model 15", "--d-model must be a positive"),
    (TRAIN + "--batch-size 0", "--batch-size must be >= 1"),
    (TRAIN + "--epochs -1", "--epochs must be >= 0"),
    (TRAIN + "--context 0", "--context must be >= 1"),
    (TRAIN + "--lr nan", "--lr must be a finite"),
    (TRAIN + "--d-model 4000000", "at most 4096"),
    (TRAIN + "--vocab-size 10", "--vocab-size 10 is too"),
    (TRAIN + "--vocab-size 0", "--vocab-size must be >="),
    ("trace --text {text} --out {dir}/no/t.npz", "does not exist"),
    ("trace --text {text} --out {dir}", "is a folder"),
    ("trace --text {text} --out {dir}/t.npz --device bogus", "--device: expected 'cpu'"),
    ("trace --text {text} --out {dir}/t.npz --generate -1", "--generate must be >= 0, got -1"),
    ("trace --text {text} --out {dir}/t.npz --batch-size 0", "--batch-size must be >= 1, got 0"),
    ("demo --device bogus", "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'bogus'"),
    ("demo --device mps", "--device: expected 'cpu'"),
]
if not torch.cuda.is_available():
    CASES.append(("demo --device cuda", "asks for a GPU, but torch sees none"))
else:
    CASES.append((f"demo --device cuda:{torch.cuda.device_count()}", "but torch sees"))


@pytest.mark.parametrize("argv, fragment", CASES)
def test_refused_in_one_line(files, capsys, argv, fragment):
    command = argv.split()[0]
    code = main(argv.format(**files).split())
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"expertflow {command}: error: "), err
    assert fragment.format(**files) in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("slots", ["--slots 99999999999", "--slots-per-layer 99999999999"])
def test_budget_beyond_int32_is_clamped_not_overflowed(files, capsys, slots):
    """Issue 21: ``--slots 99999999999`` overflowed int32 in the native policy; a budget above
    every expert is replayed as every expert, with a note."""
    code = main(f"replay --trace {files['good']} --policy lru {slots} --json".split())
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["slots"] == LAYERS * EXPERTS
    assert "99999999999 is more than" in out["note"]


def test_timing_nan_is_refused(files, capsys):
    """Issue 21 (fixed before; verified): nan timing printed nonsense."""
    argv = f"replay --trace {files['good']} --policy lru --slots 8 --bandwidth-gbps nan"
    code = main([*argv.split(), "--layer-compute-ms", "nan"])
    err = capsys.readouterr().err
    assert code == 2 and "--bandwidth-gbps must be a finite number > 0, got nan" in err


def test_a_real_bug_still_shows_its_traceback(files, monkeypatch):
    """Only refusals become exit 2: an internal error (here: a stand-in bug) propagates."""
    import expertflow.traces.stats as stats

    def broken(trace, seed=0):
        raise IndexError("a bug")

    monkeypatch.setattr(stats, "routing_stats", broken)
    with pytest.raises(IndexError, match="a bug"):
        main(["routing-stats", "--trace", files["good"]])


def test_good_inputs_still_work(files, capsys, tmp_path):
    """The same fixtures, undamaged, run to the end (the refusals are not over-eager)."""
    good, pred = files["good"], files["pred"]
    assert main(["routing-stats", "--trace", good]) == 0
    scores = str(Path(files["dir"]) / "scores.npz")
    argv = (PRED + "{scores} --lookahead").format(good=good, scores=scores).split()
    assert main(argv) == 0
    scores = tmp_path / "s.npz"
    assert main(["eval-predictor", "--predictor", pred, "--traces", good,
                 "--write-scores", str(scores)]) == 0  # fmt: skip
    assert scores.is_file()
    out = tmp_path / "new" / "deeper"  # missing parents of a predictor folder are made
    assert main(["train-predictor", "--traces", good, "--out", str(out), "--epochs", "1",
                 "--d-model", "8", "--depth", "1", "--reuse-hidden", "0"]) == 0  # fmt: skip
    assert (out / "predictor.json").is_file()
    capsys.readouterr()


def test_os_errors_of_a_named_file_are_one_line(files, capsys, monkeypatch):
    """A full disk or a denied permission on a file the command names: one line, exit 2; an
    OSError that names no file is not the user's to fix and keeps its traceback."""
    import expertflow.traces.stats as stats

    def denied(trace, seed=0):
        raise PermissionError(13, "Permission denied", "/data/out.npz")

    monkeypatch.setattr(stats, "routing_stats", denied)
    assert main(["routing-stats", "--trace", files["good"]]) == 2
    err = capsys.readouterr().err
    assert err == "expertflow routing-stats: error: /data/out.npz: Permission denied\n"

    def anonymous(trace, seed=0):
        raise OSError("no file named")

    monkeypatch.setattr(stats, "routing_stats", anonymous)
    with pytest.raises(OSError, match="no file named"):
        main(["routing-stats", "--trace", files["good"]])
