"""The Engine behind chat, generate and serve: requests added and cancelled between rounds get
exactly generate_batch's tokens; streamed text is final and cut at stop strings."""

from __future__ import annotations

import pytest

import expertflow
from expertflow.serving.engine import Engine
from expertflow.serving.sampling import _Sampling
from expertflow.serving.streaming import Reply, TextStream, stream_reply

PROMPTS = ["The history of the city begins", "def main():", "ROMEO:", "In 1850 the"]


def ids_of(loaded, text: str) -> list[int]:
    return list(loaded.tokenizer.encode(text))


def test_streamed_reply_is_generate_batch_greedy(loaded, alone):
    with Engine(loaded.model, batch_size=1, active_batches=1) as engine:
        for text in PROMPTS[:2]:
            ids = ids_of(loaded, text)
            reply = Reply()
            tokens = list(stream_reply(engine, ids, reply, max_new_tokens=12))
            assert tokens == reply.tokens == alone(ids, 12)
            assert reply.finish == "length"
            assert reply.hit_ratio is not None and 0 <= reply.hit_ratio <= 1


def test_sampled_reply_is_generate_batch_sampled(loaded):
    ids = ids_of(loaded, PROMPTS[0])
    sampling = _Sampling(True, 0.8, None, 0.9, 1234)
    with Engine(loaded.model, batch_size=1, active_batches=1) as engine:
        reply = Reply()
        list(stream_reply(engine, ids, reply, max_new_tokens=10, sampling=sampling))
    # generate_batch seeds request i with seed + i: request 0 with the seed itself.
    reference = expertflow.generate_batch(
        loaded.model, [ids], max_new_tokens=10, batch_size=1, do_sample=True, temperature=0.8,
        top_p=0.9, seed=1234,
    )  # fmt: skip
    assert reply.tokens == reference.sequences[0]


def test_requests_join_and_leave_between_rounds(loaded, alone):
    """Requests arriving at different rounds, one cancelled midway, one sampled beside them:
    every greedy one still gets the tokens it gets alone."""
    prompts = [ids_of(loaded, t) for t in PROMPTS]
    made: dict[int, list] = {i: [] for i in range(len(prompts))}
    ends: dict[int, str] = {}

    def listener(i):
        def on_token(token, finish, error):
            assert error is None
            if token is not None:
                made[i].append(token)
            if finish:
                ends[i] = finish

        return on_token

    with Engine(loaded.model, batch_size=2, active_batches=2, schedule="expertflow") as engine:
        engine.add(prompts[0], max_new_tokens=9, on_token=listener(0))
        engine.step()
        engine.step()
        doomed = engine.add(prompts[1], max_new_tokens=40, on_token=listener(1))
        engine.add(prompts[2], max_new_tokens=6, on_token=listener(2),
                   sampling=_Sampling(True, 1.0, None, None, 7))  # fmt: skip
        engine.step()
        engine.step()
        assert engine.cancel(doomed)
        engine.add(prompts[3], max_new_tokens=7, on_token=listener(3))
        while engine.busy():
            engine.step()
        assert not engine.cancel(doomed)  # already out
    assert made[0] == alone(prompts[0], 9) and ends[0] == "length"
    assert made[3] == alone(prompts[3], 7) and ends[3] == "length"
    assert made[1] == alone(prompts[1], 40)[: len(made[1])] and 1 not in ends
    assert len(made[2]) == 6


def test_engine_refuses_bad_requests_naming_them(loaded):
    with Engine(loaded.model, batch_size=1, active_batches=1) as engine:
        on_token = lambda *_: None  # noqa: E731
        with pytest.raises(ValueError, match="ids must be a non-empty list"):
            engine.add([], max_new_tokens=1, on_token=on_token)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.add([10**9], max_new_tokens=1, on_token=on_token)
        with pytest.raises(ValueError, match="context of 1024"):
            engine.add([1] * 1025, max_new_tokens=1, on_token=on_token)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
            engine.add([1], max_new_tokens=0, on_token=on_token)
    with pytest.raises(RuntimeError, match="inside `with engine:`"):
        Engine(loaded.model).step()


class Chars:
    """A tokenizer whose tokens are characters, and two tokens make one 'é' (a multi-byte
    character split across tokens)."""

    def decode(self, ids, skip_special_tokens=True):
        text, i = "", 0
        while i < len(ids):
            if ids[i] == 1000:  # the first half of é: incomplete alone
                text += "é" if i + 1 < len(ids) and ids[i + 1] == 1001 else "\ufffd"
                i += 2 if text.endswith("é") else 1
            else:
                text += chr(ids[i])
                i += 1
        return text


def stream_of(text_ids, stop=()):
    stream = TextStream(Chars(), stop)
    pieces = [stream.push(t) for t in text_ids]
    return stream, pieces


def test_text_stream_holds_incomplete_characters_and_stop_prefixes():
    stream, pieces = stream_of([ord("a"), 1000, 1001, ord("b")])
    assert pieces == ["a", "", "é", "b"]
    stream, pieces = stream_of([ord(c) for c in "ab<|e"], stop=["<|end|>"])
    assert "".join(pieces) == "ab" and stream.finish() == "<|e"  # held, then given at the end
    stream, pieces = stream_of([ord(c) for c in "ab<|x"], stop=["<|end|>"])
    assert "".join(pieces) == "ab<|x"  # no longer the start of a stop string: given
    stream, pieces = stream_of([ord(c) for c in "hi<|end|>more"], stop=["<|end|>", "zz"])
    assert "".join(pieces) == "hi" and stream.stopped and stream.text == "hi"
    assert stream.finish() == ""
