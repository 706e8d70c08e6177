"""Several threads on one offloaded model: every call gets what it gets alone, never a crash.

The model's forward calls are serialised by ``OffloadState.lock``; the prefetcher follows each
thread's rows on their own, and batched generation's routing tap reads only its own thread's
calls."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest
import torch

import expertflow
from expertflow.demo.model import load_demo_model, load_demo_predictor, load_demo_tokenizer
from expertflow.prediction import HistoryPredictor, Predictor
from tests.modules.test_offload import build

pytest.importorskip("transformers")

THREADS = 3
SLOTS = 6 * 3  # 3 of a layer's 16 experts at once (top-2): prompts run in groups


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    """Switch threads every 10 us (default 5 ms) so that the calls surely interleave."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(interval)


@pytest.fixture(scope="module")
def tokenizer():
    return load_demo_tokenizer()


def offloaded(predictor=None):
    model, _ = load_demo_model()
    return expertflow.offload(model, device="cpu", slots=SLOTS, policy="lru", predictor=predictor)


def prompts(tokenizer) -> list[list[int]]:
    texts = ["def main():\n    return", "To be, or not to", "The theorem follows from the lemma"]
    return [tokenizer.encode(t) for t in texts]


def in_threads(work, count: int) -> list:
    """Runs ``work(i)`` for i in range(count), each on its own thread, all starting together;
    returns the results in order (re-raising the first error)."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001  (re-raised on the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread never finished (deadlock?)"
    if errors:
        raise errors[0]
    return results


def forwards(model, ids: torch.Tensor, repeats: int = 3) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids).logits for _ in range(repeats)]


@pytest.mark.parametrize("with_predictor", [False, True], ids=["lru", "predictor"])
def test_forward_calls_from_threads_give_the_single_thread_logits(tokenizer, with_predictor):
    model = offloaded(load_demo_predictor() if with_predictor else None)
    inputs = [torch.tensor([p]) for p in prompts(tokenizer)]
    alone = [forwards(model, ids, 1)[0] for ids in inputs]
    together = in_threads(lambda i: forwards(model, inputs[i]), THREADS)
    for expected, got in zip(alone, together, strict=True):
        for logits in got:
            torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def generate(model, prompt: list[int], new: int = 5) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_generate_from_two_threads_gives_each_its_own_tokens(tokenizer):
    model = offloaded(load_demo_predictor())
    texts = prompts(tokenizer)[:2]
    alone = [generate(model, p) for p in texts]
    assert in_threads(lambda i: generate(model, texts[i]), 2) == alone


def test_generate_batch_from_two_threads_gives_each_its_own_tokens(tokenizer):
    model = offloaded(load_demo_predictor())
    texts = prompts(tokenizer)
    requests = [texts, [t[::-1] for t in texts]]

    def batch(i: int):
        out = expertflow.generate_batch(
            model,
            requests[i],
            max_new_tokens=4,
            batch_size=1,
            schedule="expertflow",
            active_batches=2,
            eos_token_id=[],
        )
        return out.sequences

    alone = [batch(i) for i in range(2)]
    assert in_threads(batch, 2) == alone


class RecordingPredictor(Predictor):
    """Scores nothing; keeps every history it is asked to predict from."""

    def __init__(self, layers: int, experts: int, top_k: int):
        super().__init__(layers, experts, top_k)
        self.asked: list[list[int]] = []
        self._asked_lock = threading.Lock()

    def predict_step(self, histories, previous):
        with self._asked_lock:
            self.asked += [list(h) for h in histories]
        return np.zeros((len(histories), self.num_layers, self.num_experts), np.float32)


def tiny_with_recording_predictor():
    model = build("mixtral")
    model.generation_config.eos_token_id = None
    config = model.config
    predictor = RecordingPredictor(
        config.num_hidden_layers, config.num_local_experts, config.num_experts_per_tok
    )
    return expertflow.offload(model, device="cpu", slots=8, policy="lru", predictor=predictor)


def test_the_prefetcher_follows_each_threads_rows_and_never_mixes_histories():
    model = tiny_with_recording_predictor()
    predictor = model._expertflow.prefetcher.predictor
    texts = [list(range(1, 8)), list(range(50, 55))]
    alone = [generate(model, p, 6) for p in texts]
    together = in_threads(lambda i: generate(model, texts[i], 6), 2)
    assert together == alone
    sequences = [p + a for p, a in zip(texts, alone, strict=True)]
    steps = [h for h in predictor.asked[len(predictor.asked) // 2 :]]  # the threads' steps
    # Every step planned from one thread's own sequence so far: each step of each sequence once.
    expected = sorted(
        s[: len(p) + n] for s, p in zip(sequences, texts, strict=True) for n in range(1, 6)
    )
    assert sorted(steps) == expected


def test_a_call_that_does_not_continue_the_rows_followed_starts_a_new_sequence():
    model = tiny_with_recording_predictor()
    prefetcher = model._expertflow.prefetcher
    generate(model, [3, 4, 5], 3)
    steps = prefetcher.steps
    with torch.no_grad():
        model(input_ids=torch.tensor([[7]]))  # one position, same batch size, but no KV cache
    assert prefetcher.steps == steps  # a prompt of one token, not a decode step of [3, 4, 5, ...]
    assert generate(model, [3, 4, 5], 3) == generate(model, [3, 4, 5], 3)
    assert prefetcher.steps == steps + 2 * 2  # generate's own steps are still followed


def test_a_forward_that_raises_releases_the_lock():
    model = expertflow.offload(build("mixtral"), device="cpu", slots=8, policy="lru")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad(), pytest.raises(IndexError):
        model(input_ids=torch.tensor([[10_000]]))  # outside the vocabulary
    done = []
    thread = threading.Thread(target=lambda: done.append(forwards(model, ids, 1)), daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert done, "another thread's forward never got the lock"


def test_restore_removes_the_lock_hooks():
    model = build("mixtral")
    hooks = (len(model._forward_pre_hooks), len(model._forward_hooks))
    expertflow.offload(
        model, device="cpu", slots=8, policy="lru", predictor=HistoryPredictor(2, 8, 2)
    )
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) != hooks
    expertflow.restore(model)
    assert (len(model._forward_pre_hooks), len(model._forward_hooks)) == hooks
