"""Fixtures of the serving tests: the demo model offloaded on the CPU, references decoded
alone by generate_batch on a plain (not offloaded) copy, and a live server in a thread."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """One intra-op thread: on a loaded 2-core machine two threads spin against each other
    (a demo decode step took 40x longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def loaded():
    from expertflow.serving.loading import OffloadChoices, load_model

    return load_model("demo", OffloadChoices(device="cpu"))


@pytest.fixture(scope="session")
def alone():
    """``alone(ids, max_new_tokens) -> tokens``: greedy, one request, the whole model."""
    import expertflow
    from expertflow.demo.model import load_demo_model

    model, _ = load_demo_model()
    cache: dict = {}

    def decode(ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(ids), max_new_tokens)
        if key not in cache:
            out = expertflow.generate_batch(
                model, [ids], max_new_tokens=max_new_tokens, batch_size=1
            )
            cache[key] = out.sequences[0]
        return cache[key]

    return decode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving the demo model in a thread of the test process."""

    def __init__(self, loaded, *, batch_size=4, active_batches=2, max_queue=2):
        import uvicorn

        from expertflow.serving.engine import Engine
        from expertflow.serving.server import create_app
        from expertflow.serving.worker import Worker

        engine = Engine(loaded.model, batch_size=batch_size, active_batches=active_batches,
                        eos_token_id=sorted(loaded.eos))  # fmt: skip
        self.worker = Worker(engine, capacity=batch_size * active_batches, max_queue=max_queue)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(loaded, self.worker), host="127.0.0.1",
                                port=self.port, log_level="warning")  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 60 s"
            assert self.thread.is_alive(), "the server thread died"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(60)

    def wait_idle(self, seconds: float = 20) -> None:
        """Until no request is in flight (a cancelled one leaves at a round boundary)."""
        deadline = time.monotonic() + seconds
        while self.worker.in_flight():
            assert time.monotonic() < deadline, f"{self.worker.in_flight()} requests in flight"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def live(loaded):
    pytest.importorskip("fastapi", reason="expertflow serve needs the 'serve' extra")
    pytest.importorskip("uvicorn", reason="expertflow serve needs the 'serve' extra")
    with LiveServer(loaded) as server:
        yield server
