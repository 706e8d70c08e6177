"""Issue 21: small inputs that once blew up (``replay`` killed at 24 GB for a 12 KB trace with
``meta.num_experts = 1e9``; ``train-predictor`` killed and ``eval-predictor`` running past
120 s at 200,000 experts) run as real commands under a 4 GiB address-space limit and a time
limit (30 s a command): refused in one line with exit 2, or (at the largest expert count
allowed) done.

Each subprocess imports torch (seconds), so one subprocess runs all of a test's commands
through ``expertflow.cli.main`` and reports each one's exit status and stderr as JSON; the
other refusals run in-process in test_cli_errors.py.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

import expertflow
from expertflow.traces.validation import MAX_EXPERTS

MEMORY_LIMIT = 4 * 2**30  # bytes of address space (torch alone maps about 1.5 GiB)
# Seconds: importing torch (up to ~15 s on two busy cores), then each command; the blow-ups
# this guards against ran for minutes.
IMPORT_TIME, COMMAND_TIME = 30, 30
# The subprocess imports the expertflow this test imported (the installed package in CI, the
# source tree with a copied extension in development).
PYTHON_DIR = Path(expertflow.__file__).resolve().parents[1]

_RUNNER = """
import contextlib, io, json, sys
from expertflow.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_commands(commands: list[list[str]]) -> list[dict]:
    """Each command's exit status and stderr, all run in one limited subprocess (a traceback
    there fails the test with it)."""
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR), CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=IMPORT_TIME + COMMAND_TIME * len(commands),
        preexec_fn=_limit_memory,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def small_trace(path: Path, experts: int, layers: int = 3, spread: int = 1) -> str:
    """A trace of 2 sequences x 32 tokens, top-2 (a few KB), with ``meta.num_experts`` as
    given; the ids (below 8) multiplied by ``spread``."""
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(8)[:2] for _ in range(64 * layers)]) * spread
    meta = {"model": "m", "num_experts": experts, "top_k": 2, "expert_bytes": 1000}
    meta |= {"vocab_size": 64, "sequence_sources": ["a", "b"]}
    np.savez_compressed(
        path,
        expert_ids=ids.reshape(64, layers, 2).astype(np.int32),
        token_ids=rng.integers(0, 64, 64),
        sequence_ids=np.repeat([0, 1], 32),
        meta=np.array(json.dumps(meta)),
    )
    assert path.stat().st_size < 12_000
    return str(path)


def test_absurd_expert_counts_are_refused_within_limits(tmp_path):
    commands = []
    for experts in (10**9, 200_000):
        t = small_trace(tmp_path / f"t{experts}.npz", experts)
        commands += [
            ["replay", "--trace", t, "--policy", "lru", "--slots", "8"],
            ["routing-stats", "--trace", t],
            ["train-predictor", "--traces", t, "--out", str(tmp_path / "p")],
            ["eval-predictor", "--predictor", "history", "--traces", t],
        ]
    for argv, result in zip(commands, run_commands(commands), strict=True):
        lines = result["stderr"].strip().splitlines()
        assert result["code"] == 2, (argv, result)
        assert len(lines) == 1 and lines[0].startswith(f"expertflow {argv[0]}: error: "), lines
        assert f"meta.num_experts must be in [1, {MAX_EXPERTS}]" in lines[0]


def test_largest_expert_count_runs_within_limits(tmp_path):
    """At MAX_EXPERTS, ids spread over all of them: every command finishes in the limits (the
    tables stay proportional to the trace's routing, not to num_experts squared)."""
    t = small_trace(tmp_path / "t.npz", MAX_EXPERTS, layers=1, spread=MAX_EXPERTS // 8)
    out = str(tmp_path / "p")
    commands = [
        ["replay", "--trace", t, "--policy", "lru", "--slots", "64"],
        ["routing-stats", "--trace", t],
        [
            "train-predictor",
            "--traces",
            t,
            "--out",
            out,
            "--epochs",
            "1",
            "--d-model",
            "8",
            "--depth",
            "1",
            "--reuse-hidden",
            "0",
            "--kind",
            "combined",
        ],  # fmt: skip
        ["eval-predictor", "--predictor", out, "--traces", t],
    ]
    for argv, result in zip(commands, run_commands(commands), strict=True):
        assert result["code"] == 0, (argv, result)
