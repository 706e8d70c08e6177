"""Issue 19, item 4: the command line explains itself, and ``demo`` checks its options first.

``expertflow --help`` is a plain description and one line per command; every option of every
command has a help text naming its default; ``--version`` prints expertflow's and torch's
versions and whether CUDA kernels are built, without touching CUDA; ``demo`` refuses a bad
budget, policy list or other option before it loads the model (and a ``--gpu-memory`` too small
for the model before the whole model's run), naming the option, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex

import pytest
import torch

import expertflow
from expertflow import cli
from expertflow.cli import build_parser
from expertflow.demo import model as demo_model
from expertflow.demo import run as demo_run
from expertflow.demo.run import run_demo


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def _options():
    """``(command, action)`` for every option of every command, --help aside."""
    for name, parser in _commands(build_parser()).items():
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                yield name, action


def _formatted_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_every_command_is_walked():
    names = set(_commands(build_parser()))
    assert names == {
        "chat", "generate", "serve", "demo", "replay", "trace", "train-predictor",
        "eval-predictor", "routing-stats",
    }  # fmt: skip


@pytest.mark.parametrize("command, action", list(_options()), ids=lambda x: getattr(x, "dest", x))
def test_every_option_has_a_help_text_with_its_default(command, action):
    """A help text for every option; one with a default (not None or off) names it."""
    where = f"expertflow {command} {'/'.join(action.option_strings)}"
    assert action.help and action.help is not argparse.SUPPRESS, f"{where} has no help"
    assert action.help.strip(), f"{where} has an empty help"
    parser = _commands(build_parser())[command]
    text = _formatted_help(parser, action)  # a stray '%' in a help text fails here
    assert "``" not in text, f"{where}: rST markup in its help"
    if action.default not in (None, False, argparse.SUPPRESS):
        assert "default" in text, f"{where} defaults to {action.default!r}; its help must say so"


@pytest.mark.parametrize("command", sorted(_commands(build_parser())))
def test_each_command_help_is_plain_and_fits_80_columns(monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    text = _commands(build_parser())[command].format_help()
    assert "``" not in text
    description = text.split("\n\n")[1]
    assert not description.startswith("options:"), f"{command} --help has no description"
    assert max(map(len, text.splitlines())) <= 80, text


def test_top_level_help_lists_each_command_on_one_line(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "{chat," not in text, text
    assert max(map(len, text.splitlines())) <= 80, text
    assert "Run Mixture-of-Experts models larger than GPU memory" in text
    for name in _commands(build_parser()):
        # The name, then what it does, on the same line.
        assert re.search(rf"^  {re.escape(name)} +\w", text, re.MULTILINE), (name, text)
    assert "--version" in text


def test_version_names_expertflow_torch_and_the_kernels_without_touching_cuda(monkeypatch, capsys):
    def no_cuda(*args, **kwargs):
        raise AssertionError("--version initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "init", no_cuda)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    try:
        version = importlib.metadata.version("expertflow")
    except importlib.metadata.PackageNotFoundError:
        version = expertflow.__version__
    assert lines[0] == f"expertflow {version}"
    assert re.fullmatch(r"expertflow \d+\.\d+\.\d+\S*", lines[0])
    assert lines[1] == f"torch {torch.__version__}"
    built = expertflow.build_info()["cuda_kernels"]
    assert lines[2].startswith("CUDA kernels built" if built else "no CUDA kernels"), lines


# --- demo: every option checked before the model loads ------------------------------------

BAD_DEMO = [
    ("--slots 1", "--slots must be at least 12 for the demo model with --budget per_layer"),
    ("--slots 0 --budget global", "--slots must be at least 2 for the demo model with --budget"),
    ("--slots -4", "--slots must be at least 12"),
    ("--gpu-memory lots", "--gpu-memory must be a positive number of bytes"),
    ("--gpu-memory 0", "--gpu-memory must be a positive number of bytes"),
    ("--gpu-memory=-5GiB", "--gpu-memory must be a positive number of bytes"),
    ("--policies lru,nope", "--policies must name policies of lru, "),
    ("--policies lru,nope", "got 'nope'"),
    ("--policies LRU", "got 'LRU'"),
    ("--policies lru,", "got ''"),
    ("--policies=", "got ''"),
    ("--prefetch-threshold -0.5", "--prefetch-threshold must be a finite number >= 0"),
    ("--prefetch-threshold nan", "--prefetch-threshold must be a finite number >= 0, got nan"),
    ("--max-new-tokens 1", "--max-new-tokens must be an integer >= 2, got 1"),
    ("--max-new-tokens -3", "--max-new-tokens must be an integer >= 2"),
    ("--prompt=", "--prompt must be a non-empty text"),
    ("--device nonsense", "--device: expected 'cpu', 'cuda' or 'cuda:N'"),
]


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(demo_model, "load_demo_model", refuse)


@pytest.mark.parametrize("argv, fragment", BAD_DEMO)
def test_demo_refuses_bad_options_before_loading_the_model(no_loading, capsys, argv, fragment):
    assert cli.main(["demo", *shlex.split(argv)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("expertflow demo: error: ") and fragment in err[0], err


def test_run_demo_checks_its_keywords_before_loading(no_loading):
    with pytest.raises(ValueError, match=r"^policies must name policies of .*got 'nope'"):
        run_demo(policies=("lru", "nope"))
    with pytest.raises(ValueError, match=r"^policies must name .*got none"):
        run_demo(policies=())
    with pytest.raises(ValueError, match=r"^slots must be at least 12"):
        run_demo(slots=3)
    with pytest.raises(ValueError, match=r"^slots must be a positive int, got float 24.0"):
        run_demo(slots=24.0)
    with pytest.raises(ValueError, match=r"^gpu_memory must be a positive number of bytes"):
        run_demo(gpu_memory="1.5 bytes")
    with pytest.raises(ValueError, match=r"^budget must be one of per_layer, global"):
        run_demo(budget="per_model")
    with pytest.raises(ValueError, match=r"^give at most one of slots and gpu_memory"):
        run_demo(slots=24, gpu_memory="20MiB")
    with pytest.raises(ValueError, match=r"^device must be 'cpu', 'cuda' or 'cuda:N'"):
        run_demo(device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_demo_refuses_cuda_it_cannot_use_before_loading(no_loading):
    """Without a GPU (or without CUDA kernels): offload's own device check, named."""
    with pytest.raises(ValueError, match=r"^device: "):
        run_demo(device="cuda")


def test_a_budget_too_small_for_the_model_fails_before_the_whole_model_runs(monkeypatch, capsys):
    """The minimum needs the model's resident bytes: it is loaded (a few seconds), but nothing
    is generated before the refusal."""

    def no_generation(*args, **kwargs):
        raise AssertionError("the demo generated before checking --gpu-memory")

    monkeypatch.setattr(demo_run, "_generate", no_generation)
    assert cli.main(["demo", "--gpu-memory", "10MiB", "--policies", "lru"]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # transformers' loading bar, then ours
    assert sum("error" in line for line in err) == 1, err
    assert err[-1].startswith("expertflow demo: error: --gpu-memory '10MiB' is below the minimum")
