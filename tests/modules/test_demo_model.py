"""The bundled demo model: ships, loads offline, generates, offloads exactly; its tooling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import expertflow
from expertflow import cli
from expertflow.demo.model import (
    DEMO_MODEL_DIR,
    domain_texts,
    load_demo_model,
    load_demo_tokenizer,
)
from expertflow.traces.format import load_trace

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo():
    return load_demo_model()


def test_asset_is_small_and_complete():
    files = {p.name: p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
        assert name in files
    assert sum(files.values()) <= 25 * 2**20


def test_loads_offline_and_generates_deterministically(demo, monkeypatch):
    model, tokenizer = demo
    assert type(model).__name__ == "MixtralForCausalLM" and model.dtype == torch.float32
    assert model.config.num_local_experts == 16 and model.config.num_hidden_layers == 6
    text = "def main():\n    return 0\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless
    ids = tokenizer("The king said", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert a.shape[1] == ids.shape[1] + 6 and torch.equal(a, b)


@pytest.mark.parametrize("budget,slots", [("per_layer", 12), ("global", 2), ("per_layer", 48)])
def test_offloaded_demo_model_matches_exactly(demo, budget, slots):
    model, tokenizer = demo
    tokenizer.padding_side = "left"
    batch = tokenizer(
        ["To be, or not", "import numpy as np\nx ="], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = model(**batch).logits
        expected_tokens = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    import copy

    offloaded = expertflow.offload(
        copy.deepcopy(model), device="cpu", slots=slots, budget=budget, policy="expertflow"
    )
    with torch.no_grad():
        got = offloaded(**batch).logits
        tokens = offloaded.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    mask = batch["attention_mask"].bool()
    assert (got - expected)[mask].abs().max().item() <= 1e-5
    assert torch.equal(tokens, expected_tokens)


def test_demo_command_runs_end_to_end(capsys):
    assert cli.main(["demo", "--max-new-tokens", "4", "--prompt", "Once upon"]) == 0
    out = capsys.readouterr().out
    assert "Once upon" in out and "same tokens as whole" in out and "NO" not in out
    assert "24 of 96" in out  # a quarter of the experts by default


def test_trace_and_routing_stats_commands(tmp_path, capsys):
    text = tmp_path / "shakespeare.txt"
    text.write_text("ROMEO:\nBut soft, what light through yonder window breaks?\n" * 40)
    out = tmp_path / "t.npz"
    args = [
        "trace",
        "--text",
        str(text),
        "--out",
        str(out),
        "--prompt-tokens",
        "16",
        "--max-sequences",
        "3",
        "--generate",
        "3",
        "--batch-size",
        "2",
    ]
    assert cli.main(args) == 0
    trace = load_trace(out)
    assert trace.meta["model"] == "expertflow-demo-moe"
    assert trace.meta["sequence_sources"] == ["shakespeare"] * 3
    assert trace.num_tokens == 3 * (16 + 2) and trace.num_layers == 6 and trace.top_k == 2
    assert (trace.expert_ids >= 0).all()
    assert cli.main(["routing-stats", "--trace", str(out), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert stats["tokens"] == trace.num_tokens


def test_trace_reads_only_the_given_part_of_each_file(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("alpha " * 400 + "omega " * 100)  # "omega" only in the last 20%
    out = tmp_path / "t.npz"
    common = ["trace", "--text", str(text), "--out", str(out), "--prompt-tokens", "16"]
    common += ["--max-sequences", "1000"]
    tokenizer = load_demo_tokenizer()
    assert cli.main([*common, "--end-fraction", "0.8"]) == 0
    before = load_trace(out)
    assert "omega" not in tokenizer.decode(before.token_ids.tolist())
    assert cli.main([*common, "--skip-fraction", "0.8"]) == 0
    after = load_trace(out)
    assert "alpha" not in tokenizer.decode(after.token_ids.tolist())
    assert after.num_tokens < before.num_tokens
    assert cli.main([*common, "--skip-fraction", "0.5", "--end-fraction", "0.5"]) == 2
    assert "skip < end" in capsys.readouterr().err


def test_trace_command_bad_input(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert cli.main(["trace", "--text", str(short), "--out", str(tmp_path / "t.npz")]) == 2
    assert "fewer than 128 tokens" in capsys.readouterr().err
    assert not (tmp_path / "t.npz").exists()
    not_a_model = ["trace", "--model", str(tmp_path), "--text", str(short), "--out", "t.npz"]
    assert cli.main(not_a_model) == 2
    assert "config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{}")
    assert cli.main(not_a_model) == 2
    assert "has no weights" in capsys.readouterr().err


def test_interrupted_trace_leaves_no_file(tmp_path, monkeypatch):
    import expertflow.traces.recording

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(expertflow.traces.recording, "record_routing", interrupted)
    text = tmp_path / "a.txt"
    text.write_text("word " * 400)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["trace", "--text", str(text), "--out", str(tmp_path / "t.npz")])
    assert list(tmp_path.iterdir()) == [text]


def test_corpus_split_and_bad_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    (tmp_path / "empty.txt").write_text("  \n")
    train, held = domain_texts(tmp_path, "train"), domain_texts(tmp_path, "held_out")
    assert list(train) == ["a"] and train["a"] + held["a"] == (tmp_path / "a.txt").read_text()
    assert held["a"].startswith("line 90\n") or held["a"].startswith("line 91\n")
    (tmp_path / "a.txt").unlink()
    with pytest.raises(ValueError, match="no non-empty"):
        domain_texts(tmp_path, "train")
    with pytest.raises(ValueError, match="not a directory"):
        domain_texts(tmp_path / "missing", "train")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_demo_model(path=tmp_path)


def test_training_script_runs_and_writes_a_loadable_model(tmp_path):
    from expertflow.demo import training as train_demo_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "(x)", "{", "}", "thou", "art"]
    for domain in ("one", "two"):
        (corpus / f"{domain}.txt").write_text(
            "\n".join(" ".join(rng.choice(words, 12)) for _ in range(300))
        )
    out = tmp_path / "model"
    train_demo_model.main(
        [
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--vocab-size",
            "300",
            "--log-every",
            "1",
            "--eval-every",
            "2",
            "--eval-windows",
            "2",
        ]
    )
    report = json.loads((out / "training.json").read_text())
    assert len(report["loss_curve"]) == 2 and set(report["held_out_perplexity"]) == {"one", "two"}
    model, tokenizer = load_demo_model(path=out)
    assert model.config.vocab_size == len(tokenizer) <= 300
    # A second phase from it: every expert of a 16-expert layer cannot be busy on 2 words, so
    # some are revived from the busiest one, and the result still loads.
    phase2 = tmp_path / "model2"
    train_demo_model.main(
        [
            "--corpus",
            str(corpus),
            "--out",
            str(phase2),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--init-from",
            str(out),
            "--aux-loss-coef",
            "0.05",
            "--revive-dead-experts",
            "--eval-windows",
            "2",
        ]
    )
    report = json.loads((phase2 / "training.json").read_text())
    assert report["init_from"] == str(out) and report["previous_phase"]["steps"] == 2
    assert report["router_aux_loss_coef"] == 0.05 and report["revived_experts"]
    layer, dead, donor = report["revived_experts"][0]
    again, _ = load_demo_model(path=phase2)
    assert again.config.vocab_size == model.config.vocab_size and dead != donor
