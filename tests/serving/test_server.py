"""expertflow serve, live on a free port, driven by the real openai client: chat and text
completions, streamed and not, stop strings, several prompts, seeds, and 8 concurrent clients
whose greedy answers are those each gets decoded alone."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from expertflow.serving.chat_format import chat_ids

openai = pytest.importorskip("openai", reason="the serving tests drive the server with openai")
pytest.importorskip("fastapi", reason="expertflow serve needs the 'serve' extra")

PROMPTS = ["The history of the city begins", "def main():", "ROMEO:", "In 1850 the",
           "The river", "import numpy as np", "KING HENRY:", "Mathematics is"]  # fmt: skip


def client_for(live):
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)


def expected(loaded, alone, ids: list[int], max_tokens: int) -> str:
    return loaded.tokenizer.decode(alone(ids, max_tokens), skip_special_tokens=True)


def test_models_lists_the_demo_model(live):
    models = client_for(live).models.list()
    assert [m.id for m in models.data] == ["demo"]


def test_chat_completion_is_greedy_decoding_alone(live, loaded, alone):
    messages = [{"role": "user", "content": "The history of the city begins"}]
    out = client_for(live).chat.completions.create(
        model="demo", messages=messages, max_tokens=8, temperature=0
    )
    ids = chat_ids(loaded.tokenizer, messages)
    assert out.choices[0].message.content == expected(loaded, alone, ids, 8)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 8)
    assert out.usage.total_tokens == len(ids) + 8


def test_streamed_chat_and_completion_equal_the_whole_answers(live, loaded, alone):
    client = client_for(live)
    messages = [{"role": "user", "content": "ROMEO:"}]
    chunks = list(client.chat.completions.create(
        model="demo", messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected(loaded, alone, chat_ids(loaded.tokenizer, messages), 6)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 6
    ids = list(loaded.tokenizer.encode("In 1850 the"))
    stream = client.completions.create(
        model="demo", prompt="In 1850 the", max_tokens=6, temperature=0, stream=True
    )
    pieces = list(stream)
    assert "".join(p.choices[0].text for p in pieces) == expected(loaded, alone, ids, 6)
    whole = client.completions.create(model="demo", prompt=ids, max_tokens=6, temperature=0)
    assert whole.choices[0].text == expected(loaded, alone, ids, 6)


def test_stop_strings_cut_the_text_and_end_the_request(live, loaded, alone):
    ids = list(loaded.tokenizer.encode(PROMPTS[0]))
    full = expected(loaded, alone, ids, 12)
    stop = full[3:6]  # inside the answer: it must end there
    out = client_for(live).completions.create(
        model="demo", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop, "@@never"]
    )
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 12
    live.wait_idle()


def test_several_prompts_are_several_choices(live, loaded, alone):
    out = client_for(live).completions.create(
        model="demo", prompt=PROMPTS[:3], max_tokens=5, temperature=0
    )
    ids = [list(loaded.tokenizer.encode(p)) for p in PROMPTS[:3]]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.text for c in out.choices] == [expected(loaded, alone, i, 5) for i in ids]
    assert out.usage.prompt_tokens == sum(len(i) for i in ids)


def test_a_seed_repeats_a_sampled_answer(live):
    client = client_for(live)
    ask = dict(model="demo", prompt="The river", max_tokens=8, temperature=1.0, top_p=0.9)
    first = client.completions.create(seed=5, **ask).choices[0].text
    assert client.completions.create(seed=5, **ask).choices[0].text == first


def test_eight_concurrent_clients_get_their_answers_alone(live, loaded, alone):
    """Eight clients at once (half streaming) share the batches; each greedy answer is the
    one decoded alone."""
    live.wait_idle()

    def ask(i: int) -> str:
        client = client_for(live)
        if i % 2:
            stream = client.completions.create(
                model="demo", prompt=PROMPTS[i], max_tokens=6 + i, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in stream)
        out = client.completions.create(
            model="demo", prompt=PROMPTS[i], max_tokens=6 + i, temperature=0
        )
        return out.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    wanted = [
        expected(loaded, alone, list(loaded.tokenizer.encode(p)), 6 + i)
        for i, p in enumerate(PROMPTS)
    ]
    assert answers == wanted


def test_health_and_metrics(live):
    import httpx

    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"
    text = httpx.get(f"{live.url}/metrics").text
    for name in ("tokens_per_second", "queue_length", "cache_hit_ratio",
                 "cache_bytes_copied_total", "generation_tokens_total"):  # fmt: skip
        assert f"# TYPE expertflow_{name} " in text
    assert 'expertflow_requests_total{model="demo",status="200"}' in text
    ratio = next(line for line in text.splitlines() if line.startswith("expertflow_cache_hit"))
    assert 0 < float(ratio.split()[-1]) <= 1
