"""expertflow serve's errors (OpenAI's JSON, the server up after each) and cancellation: a
client that disconnects, streaming or not, has its request taken out."""

from __future__ import annotations

import time
from contextlib import ExitStack

import pytest

openai = pytest.importorskip("openai", reason="the serving tests drive the server with openai")
httpx = pytest.importorskip("httpx", reason="the serving tests send raw requests with httpx")
pytest.importorskip("fastapi", reason="expertflow serve needs the 'serve' extra")


def client_for(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=60)


def still_serving(live) -> None:
    out = client_for(live).completions.create(model="demo", prompt="The", max_tokens=2)
    assert out.usage.completion_tokens == 2


def error_of(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"model": "demo", "prompt": ', "not valid JSON"),
        ('{"model": "demo", "prompt": "x", "max_tokens": "5"}', "max_tokens"),
        ('{"model": "demo", "prompt": 5}', "prompt"),
        ('{"model": "demo"}', "prompt"),
        ('{"model": "demo", "prompt": "x", "temperature": -1}', "temperature"),
        ('{"model": "demo", "prompt": "x", "n": 2}', "n"),
        ('{"model": "demo", "prompt": "x", "stream": "yes"}', "stream"),
        ('{"model": "demo", "prompt": [5, 10000000]}', "vocabulary"),
        ('{"model": "demo", "prompt": ""}', "no tokens"),
        ('[1, 2]', "body"),
    ],
)  # fmt: skip
def test_malformed_completion_bodies_are_400(live, body, says):
    response = httpx.post(f"{live.url}/v1/completions", content=body,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 400
    assert says in error_of(response)["message"] + str(error_of(response)["param"])


def test_malformed_chat_bodies_are_400(live):
    client = client_for(live)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="demo", messages=[])
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="demo", messages=[{"role": "wizard", "content": "x"}])
    still_serving(live)


def test_unknown_model_is_404(live):
    with pytest.raises(openai.NotFoundError) as caught:
        client_for(live).chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_found"
    still_serving(live)


def test_prompt_and_max_tokens_past_the_context_is_400(live):
    with pytest.raises(openai.BadRequestError) as caught:
        client_for(live).completions.create(model="demo", prompt="The city", max_tokens=1023)
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="context"):
        client_for(live).completions.create(model="demo", prompt=[5] * 1024)
    still_serving(live)


def test_a_full_queue_is_503(live):
    """capacity 8 (4 x 2 batches) and max_queue 2: the 11th request in flight is refused."""
    live.wait_idle()
    long = {"model": "demo", "prompt": "The", "max_tokens": 900, "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as client, ExitStack() as streams:
        for _ in range(10):
            streams.enter_context(client.stream("POST", "/v1/completions", json=long))
        assert live.worker.in_flight() == 10
        response = client.post("/v1/completions", json={**long, "stream": False})
        assert response.status_code == 503
        assert error_of(response)["code"] == "queue_full"
    live.wait_idle()  # the 10 streams closed: cancelled
    still_serving(live)


def cancelled(live) -> int:
    return live.worker.metrics.finished.get("cancelled", 0)


def test_a_streaming_client_that_disconnects_cancels_its_request(live):
    live.wait_idle()
    before = cancelled(live)
    long = {"model": "demo", "prompt": "The", "max_tokens": 900, "stream": True}
    with httpx.Client(base_url=live.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=long) as response:
            next(response.iter_lines())  # one chunk, then hang up
    live.wait_idle()
    assert cancelled(live) == before + 1


def test_a_waiting_client_that_disconnects_cancels_its_request(live):
    live.wait_idle()
    before = cancelled(live)
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", timeout=1.0,
                   json={"model": "demo", "prompt": "The", "max_tokens": 1000})  # fmt: skip
    live.wait_idle()
    assert cancelled(live) == before + 1
    assert live.worker.metrics.generated_tokens > 0
    assert time.monotonic() - started < 20
    still_serving(live)
