"""expertflow generate, chat and serve as a user runs them (subprocesses): streamed text equal
to decoding alone, /reset and /exit, Ctrl-C stopping a reply and not the program, SIGTERM
letting the request in flight finish and exiting 0, and bad options refused before loading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import expertflow as package_under_test
from expertflow.cli import main
from expertflow.serving.chat_format import chat_ids
from tests.serving.conftest import free_port

# The subprocesses import the expertflow under test: the installed one in CI, the source tree
# (with its built extension copied in) in development.
PACKAGE_ROOT = Path(package_under_test.__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OMP_NUM_THREADS": "1"}


def expertflow(*args: str, stdin: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "expertflow", *args], input=stdin, env=ENV,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def text_alone(loaded, alone, ids: list[int], max_tokens: int) -> str:
    return loaded.tokenizer.decode(alone(ids, max_tokens), skip_special_tokens=True)


@pytest.mark.slow  # a subprocess loads the model
def test_generate_streams_the_greedy_continuation(loaded, alone):
    prompt = "The history of the city begins"
    done = expertflow("generate", "--prompt", prompt, "--max-tokens", "8", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    ids = list(loaded.tokenizer.encode(prompt))
    assert done.stdout == text_alone(loaded, alone, ids, 8) + "\n"
    assert "24 of 96 expert slots (per_layer)" in done.stderr
    assert "[8 tokens, " in done.stderr and "hit ratio" in done.stderr
    from_stdin = expertflow("generate", "--file", "-", "--max-tokens", "8", stdin=prompt)
    assert from_stdin.stdout == done.stdout


@pytest.mark.slow  # a subprocess loads the model
def test_chat_keeps_history_until_reset(loaded, alone):
    done = expertflow("chat", "--max-tokens", "6", "--device", "cpu",
                      stdin="Hello there\n/reset\nThe city\n/exit\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    first = chat_ids(loaded.tokenizer, [{"role": "user", "content": "Hello there"}])
    after_reset = chat_ids(loaded.tokenizer, [{"role": "user", "content": "The city"}])
    assert text_alone(loaded, alone, first, 6) + "\n" in done.stdout
    assert text_alone(loaded, alone, after_reset, 6) + "\n" in done.stdout
    assert "no chat template: plain text" in done.stderr
    assert "(conversation reset)" in done.stderr
    assert done.stderr.count("[6 tokens, ") == 2


@pytest.mark.slow  # a subprocess loads the model
def test_ctrl_c_stops_the_reply_not_the_chat():
    chat = subprocess.Popen(
        [sys.executable, "-m", "expertflow", "chat", "--max-tokens", "900", "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
    )  # fmt: skip
    seen = bytearray()
    reader = threading.Thread(target=lambda: [seen.extend(b) for b in iter(
        lambda: os.read(chat.stdout.fileno(), 256), b"")], daemon=True)  # fmt: skip
    reader.start()
    try:
        chat.stdin.write(b"The\n")
        chat.stdin.flush()
        deadline = time.monotonic() + 120
        while len(seen.decode(errors="replace").split("> ", 1)[-1]) < 5:  # the reply is running
            assert time.monotonic() < deadline and chat.poll() is None, seen
            time.sleep(0.05)
        chat.send_signal(signal.SIGINT)
        time.sleep(0.5)
        chat.stdin.write(b"/exit\n")
        chat.stdin.flush()
        assert chat.wait(60) == 0
    finally:
        if chat.poll() is None:
            chat.kill()
    err = chat.stderr.read().decode()
    assert "cancelled]" in err and "Traceback" not in err


@pytest.mark.slow  # a subprocess loads the model
def test_sigterm_finishes_the_request_in_flight_and_exits_0(loaded, alone):
    httpx = pytest.importorskip("httpx", reason="the serving tests send requests with httpx")
    pytest.importorskip("fastapi", reason="expertflow serve needs the 'serve' extra")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "expertflow", "serve", "--device", "cpu", "--port", str(port)],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        answer = {}
        body = {"model": "demo", "prompt": "The city", "max_tokens": 120, "temperature": 0}
        asking = threading.Thread(target=lambda: answer.update(
            httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()))  # fmt: skip
        asking.start()
        while httpx.get(f"{url}/health").json()["in_flight"] == 0:
            time.sleep(0.02)
        server.send_signal(signal.SIGTERM)
        asking.join(120)
        assert server.wait(60) == 0, server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
    ids = list(loaded.tokenizer.encode("The city"))
    assert answer["choices"][0]["text"] == text_alone(loaded, alone, ids, 120)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)


def test_bad_options_are_refused_before_loading(capsys):
    assert main(["generate", "--prompt", "x", "--slots", "0"]) == 2
    assert "expertflow generate: error: --slots must be >= 1" in capsys.readouterr().err
    assert main(["chat", "--temperature", "-1"]) == 2
    assert "temperature must be a number >= 0" in capsys.readouterr().err
    assert main(["generate", "--prompt", "x", "--model", "/nonexistent"]) == 2
    assert "neither 'demo' nor a folder" in capsys.readouterr().err
    assert main(["serve", "--schedule", "expertflow", "--active-batches", "1"]) == 2
    assert "--active-batches must be >= 2" in capsys.readouterr().err


def test_serve_without_the_extra_says_which_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now fails
    assert main(["serve"]) == 2
    assert "pip install 'expertflow[serve]'" in capsys.readouterr().err
