"""generate_batch: every request gets its tokens decoded alone, whatever batching and scheduling."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import expertflow
from expertflow.prediction import HistoryPredictor
from tests.modules.test_offload import FAMILIES, build

transformers = pytest.importorskip("transformers")


def random_prompts(seed: int, count: int, longest: int = 12) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest + 1, (count,), generator=gen).tolist()
    return [torch.randint(1, 96, (n,), generator=gen).tolist() for n in lengths]


def alone(model, prompt, max_new_tokens, eos=None):
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=eos,
    )
    return out[0, len(prompt) :].tolist()


def without_eos(family: str, seed: int = 0):
    model = build(family, seed)
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_request_decodes_as_it_would_alone(family):
    model = without_eos(family)
    # A stable seed per family (str hashes change from process to process).
    prompts = random_prompts(zlib.crc32(family.encode()) % 1000, 7)
    reference = [alone(model, p, 6) for p in prompts]
    plain = expertflow.generate_batch(model, prompts, max_new_tokens=6, batch_size=3)
    assert plain.sequences == reference
    assert plain.finish_reasons == ["length"] * 7
    # Offloaded with the tightest cache, regrouped every round: still the same tokens.
    expertflow.offload(model, device="cpu", slots=2 * 2, policy="lru")
    scheduled = expertflow.generate_batch(
        model, prompts, max_new_tokens=6, batch_size=3, schedule="expertflow", active_batches=3
    )
    assert scheduled.sequences == reference
    assert scheduled.stats["kv_rows_moved"] > 0  # the scheduler did move requests


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("schedule", ["fifo", "expertflow"])
def test_batch_sizes_eos_and_a_predictor(batch_size, schedule):
    model = without_eos("mixtral", seed=1)
    prompts = random_prompts(batch_size, 9)
    free = [alone(model, p, 8) for p in prompts]
    eos = free[4][2]  # some requests stop early, at different steps
    reference = [alone(model, p, 8, eos) for p in prompts]
    expertflow.offload(model, device="cpu", slots=6, policy="expertflow", budget="global")
    predictor = HistoryPredictor(2, 8, 2)
    out = expertflow.generate_batch(
        model,
        prompts,
        max_new_tokens=8,
        batch_size=batch_size,
        schedule=schedule,
        predictor=predictor if schedule == "expertflow" else None,
        eos_token_id=eos,
    )
    assert out.sequences == reference
    assert out.finish_reasons == ["stop" if eos in r else "length" for r in reference]
    stats = out.stats
    assert stats["decode_tokens"] == sum(len(r) for r in reference) - len(prompts)
    assert 1 <= stats["distinct_experts_per_layer"] <= min(8, 2 * batch_size)
    assert stats["cache"]["hits"] + stats["cache"]["misses"] > 0


def test_with_the_models_own_predictor_and_prefetching():
    model = without_eos("qwen3_moe", seed=2)
    prompts = random_prompts(5, 8)
    reference = [alone(model, p, 7) for p in prompts]
    expertflow.offload(
        model, device="cpu", slots=8, policy="expertflow", predictor=HistoryPredictor(2, 8, 2)
    )
    runs = [
        expertflow.generate_batch(model, prompts, max_new_tokens=7, batch_size=2, schedule=s)
        for s in ("fifo", "expertflow", "expertflow")
    ]
    assert all(r.sequences == reference for r in runs)
    prefetcher = model._expertflow.prefetcher
    assert prefetcher.steps >= sum(r.stats["decode_steps"] for r in runs)
    assert sum(r.stats["cache"]["prefetches"] for r in runs) > 0
    # After batched generation the model's own generate still works and matches.
    assert alone(model, prompts[0], 7) == reference[0]


def test_a_scheduled_step_plans_evictions_for_the_batch_that_goes_next():
    """With regrouping, each batch's step hands the prefetcher, as reuse scores, the predicted
    paths of the batch whose turn is next: it is the next to run each layer's experts."""
    model = without_eos("qwen3_moe", seed=2)
    expertflow.offload(
        model, device="cpu", slots=8, policy="expertflow", predictor=HistoryPredictor(2, 8, 2)
    )
    prefetcher = model._expertflow.prefetcher
    driven, drive = [], prefetcher.drive

    def spy(histories, previous, scores=None, reuse=None):
        driven.append((len(histories), scores, reuse))
        drive(histories, previous, scores, reuse)

    prefetcher.drive = spy
    prompts = random_prompts(6, 6)
    out = expertflow.generate_batch(
        model, prompts, max_new_tokens=4, batch_size=2, schedule="expertflow", active_batches=3
    )
    assert out.sequences == [alone(model, p, 4) for p in prompts]
    # The history predictor has no reuse head: a step's reuse rows are the paths of the next
    # step in the round (none for a round's last step).
    pairs = list(zip(driven, driven[1:], strict=False))
    followed = [(now, nxt) for now, nxt in pairs if now[2] is not None]
    assert followed and all(np.array_equal(now[2], nxt[1]) for now, nxt in followed)
    assert any(now[1] is not None and now[2] is None for now in driven)  # last of a round


def test_sampling_gives_each_request_its_own_stream_whatever_the_batching():
    model = without_eos("mixtral", seed=4)
    expertflow.offload(model, device="cpu", slots=4, policy="lrfu")
    prompts = random_prompts(8, 7)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95, seed=11)
    alone_each = [
        expertflow.generate_batch(model, [p], batch_size=1, **kwargs).sequences[0] for p in prompts
    ]
    batched = expertflow.generate_batch(
        model, prompts, batch_size=3, schedule="expertflow", active_batches=2, **kwargs
    )
    # Request i draws from seed + i: alone it would be request 0, so shift the seed to match.
    shifted = [
        expertflow.generate_batch(model, [p], batch_size=1, **{**kwargs, "seed": 11 + i}).sequences[
            0
        ]
        for i, p in enumerate(prompts)
    ]
    assert batched.sequences == shifted
    assert alone_each[1:] != shifted[1:]  # other seeds, other draws (8 tokens, 96 ids)
    greedy = expertflow.generate_batch(model, prompts, max_new_tokens=8, batch_size=3)
    for narrow in (dict(top_k=1), dict(top_p=1e-9)):
        only_best = expertflow.generate_batch(
            model, prompts, max_new_tokens=8, batch_size=3, do_sample=True, **narrow
        )
        assert only_best.sequences == greedy.sequences


def test_deterministic():
    model = without_eos("olmoe")
    expertflow.offload(model, device="cpu", slots=4, policy="lru")
    prompts = random_prompts(7, 10)
    a, b = (
        expertflow.generate_batch(
            model, prompts, max_new_tokens=5, batch_size=2, schedule="expertflow"
        )
        for _ in range(2)
    )
    assert a.sequences == b.sequences
    for key in ("kv_rows_moved", "regroups", "decode_steps", "distinct_experts_per_layer"):
        assert a.stats[key] == b.stats[key]


def test_the_context_ends_a_request():
    model = without_eos("mixtral")
    context = model.config.max_position_embeddings
    long_prompt = random_prompts(3, 1, longest=1)[0] * (context - 3)
    reference = alone(model, long_prompt, 3)
    out = expertflow.generate_batch(model, [long_prompt, [5, 6]], max_new_tokens=10, batch_size=2)
    assert out.sequences[0] == reference
    assert out.finish_reasons == ["context", "length"]


def test_bad_input():
    model = without_eos("mixtral")
    ok = [[1, 2, 3]]
    cases = [
        (dict(prompts=[]), "prompts must be a non-empty list"),
        (dict(prompts="hello"), "prompts must be a non-empty list"),
        (dict(prompts=[[1, 2], []]), r"prompts\[1\] must be a non-empty list"),
        (dict(prompts=[[1, 2.5]]), r"prompts\[0\] must be a non-empty list"),
        (dict(prompts=[[1, 96]]), r"prompts\[0\] has token id 96, outside .* \[0, 96\)"),
        (dict(prompts=[ok[0], [1] * 65]), r"prompts\[1\] has 65 tokens, longer than .* 64"),
        (dict(prefill_padding=-0.1), "prefill_padding must be a finite number >= 0"),
        (dict(prefill_padding=float("nan")), "prefill_padding must be a finite number >= 0"),
        (dict(batch_size=0), "batch_size must be an int >= 1, got 0"),
        (dict(regroup_every=0), "regroup_every must be an int >= 1, got 0"),
        (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
        (dict(schedule="random"), "schedule must be one of"),
        (dict(schedule="expertflow", active_batches=1), "needs active_batches >= 2"),
        (dict(predictor=HistoryPredictor(3, 8, 2)), "predictor is for 3 layers x 8 experts"),
        (dict(do_sample=True, temperature=0), "temperature must be > 0"),
        (dict(do_sample=True, top_k=0), "top_k must be None or an int >= 1"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(seed="x"), "seed must be an int"),
    ]
    for overrides, message in cases:
        kwargs = {"prompts": ok, "max_new_tokens": 2, "batch_size": 1, **overrides}
        with pytest.raises(ValueError, match=message):
            expertflow.generate_batch(model, kwargs.pop("prompts"), **kwargs)


def test_a_failing_request_does_not_corrupt_the_others():
    model = without_eos("granitemoe")
    prompts = random_prompts(11, 6)
    reference = [alone(model, p, 6) for p in prompts]
    # A token made by request 2 only (and in nobody's prompt): feeding it back fails.
    others = {t for i, r in enumerate(reference) if i != 2 for t in r} | {
        t for p in prompts for t in p
    }
    poison = next(t for t in reference[2] if t not in others)
    at = reference[2].index(poison)
    prompts[4] = prompts[4] + [poison]  # request 4 fails at once, in its prompt
    reference[4] = None

    def refuse(module, args, kwargs):
        ids = kwargs.get("input", args[0] if args else None)
        if bool((ids == poison).any()):
            raise RuntimeError("poisoned token")

    model.get_input_embeddings().register_forward_pre_hook(refuse, with_kwargs=True)
    expertflow.offload(model, device="cpu", slots=4, policy="lru")
    out = expertflow.generate_batch(
        model, prompts, max_new_tokens=6, batch_size=3, schedule="expertflow", active_batches=2
    )
    assert sorted(out.errors) == [2, 4]
    assert all(isinstance(e, RuntimeError) for e in out.errors.values())
    assert out.finish_reasons[2] == out.finish_reasons[4] == "error"
    assert out.sequences[2] == reference[2][: at + 1] and out.sequences[4] == []
    for i in (0, 1, 3, 5):
        assert out.sequences[i] == reference[i]
        assert out.finish_reasons[i] == "length"
    # Every request failing raises the first error.
    with pytest.raises(RuntimeError, match="poisoned token"):
        expertflow.generate_batch(model, [prompts[4]], max_new_tokens=2, batch_size=1)


def test_equal_length_prompts_are_prefilled_together_and_a_bad_one_fails_alone():
    model = without_eos("qwen2_moe")
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(1, 90, (6, 5), generator=gen).tolist()
    reference = [alone(model, p, 4) for p in prompts]
    poison = 95  # in no prompt above (ids < 90)
    prompts[3][2] = poison

    def refuse(module, args, kwargs):
        if bool((args[0] == poison).any()):
            raise RuntimeError("poisoned token")

    model.get_input_embeddings().register_forward_pre_hook(refuse, with_kwargs=True)
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    out = expertflow.generate_batch(model, prompts, max_new_tokens=4, batch_size=6)
    assert out.finish_reasons[3] == "error" and out.sequences[3] == []
    for i in (0, 1, 2, 4, 5):
        assert out.sequences[i] == reference[i]
    # One prefill of all six (it fails), then each prompt alone, then decode steps of five rows.
    assert calls[0] == (6, 5) and calls[1:7] == [(1, 5)] * 6
    assert all(shape == (5, 1) for shape in calls[7:])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompts_of_different_lengths_are_prefilled_together_padded(family):
    model = without_eos(family, seed=1)
    gen = torch.Generator().manual_seed(zlib.crc32(family.encode()))
    prompts = [torch.randint(1, 96, (n,), generator=gen).tolist() for n in (7, 9, 8, 10)]
    reference = [alone(model, p, 5) for p in prompts]
    calls = []
    model.register_forward_pre_hook(
        lambda m, a, k: calls.append(tuple(k["input_ids"].shape)), with_kwargs=True
    )
    out = expertflow.generate_batch(model, prompts, max_new_tokens=5, batch_size=4)
    assert out.sequences == reference
    # One prefill of all four, padded to 10 (34 real tokens: 18% padding), then decode steps.
    assert calls[0] == (4, 10) and all(shape == (4, 1) for shape in calls[1:])
    assert out.stats["prefill_tokens"] == 40


def test_prefill_groups_cap_the_padding():
    from expertflow.serving.requests import _prefill_groups, _Request

    lengths = [10, 1000, 11, 12, 990, 1, 400, 12]
    requests = [_Request(index=i, ids=[1] * n) for i, n in enumerate(lengths)]
    groups = [[r.index for r in g] for g in _prefill_groups(requests, 0.25)]
    assert groups == [[5], [0, 2, 3, 7], [6], [4, 1]]
    for padding in (0.0, 0.1, 0.25, 1.0):
        for group in _prefill_groups(requests, padding):
            real = sum(len(r.ids) for r in group)
            assert len(group) * max(len(r.ids) for r in group) <= (1 + padding) * real
    equal = [[r.index for r in g] for g in _prefill_groups(requests, 0.0)]
    assert equal == [[5], [0], [2], [3, 7], [6], [4], [1]]  # equal lengths only


def two_kinds_model_and_prompts(count: int):
    """A Mixtral whose routers read one hidden unit, set by the token's half of the vocabulary:
    tokens < 48 use experts 0-3, the others 4-7, and generation stays in the prompt's half.
    Prompts alternate between the halves."""
    model = without_eos("mixtral", seed=3)
    with torch.no_grad():  # layer routers that read one hidden unit: its sign picks the half
        for layer in model.model.layers:
            gate = layer.mlp.gate.weight
            gate.zero_()
            gate[:4, 0], gate[4:, 0] = 5.0, -5.0
            gate[:, 1:] = 0.01 * torch.randn_like(gate[:, 1:])
            layer.self_attn.o_proj.weight.zero_()  # keep the token's own unit 0 sign
            layer.mlp.experts.down_proj.zero_()
        embed = model.model.embed_tokens.weight
        embed[:, 0] = torch.where(torch.arange(96) < 48, 3.0, -3.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[:48, 0] = 1.0  # argmax stays in the prompt's half
        model.lm_head.weight[48:, 0] = -1.0
    low = random_prompts(1, count, longest=6)
    prompts = [
        [t % 48 for t in p] if i % 2 == 0 else [48 + t % 48 for t in p] for i, p in enumerate(low)
    ]
    return model, prompts


def test_regrouping_cuts_the_experts_a_batch_runs_on_clustered_requests():
    """Two kinds of prompt whose tokens route to disjoint experts, interleaved: FIFO batches
    mix them, the scheduler separates them, and each decode step runs fewer experts."""
    model, prompts = two_kinds_model_and_prompts(8)
    runs = {
        s: expertflow.generate_batch(
            model, prompts, max_new_tokens=4, batch_size=4, schedule=s, active_batches=2
        )
        for s in ("fifo", "expertflow")
    }
    assert runs["fifo"].sequences == runs["expertflow"].sequences
    fifo = runs["fifo"].stats["distinct_experts_per_layer"]
    ours = runs["expertflow"].stats["distinct_experts_per_layer"]
    # FIFO batches mix both kinds at every step; separated batches run half the experts.
    assert ours <= 0.5 * fifo + 1e-9, (fifo, ours)


def test_batches_of_a_kind_take_their_turns_one_after_another():
    """Four batches, two of each kind once regrouped: each round runs both batches of one kind,
    then both of the other (the slots one fills serve the next), never alternating kinds."""
    model, prompts = two_kinds_model_and_prompts(8)
    kinds = []
    model.register_forward_pre_hook(
        lambda m, a, k: kinds.append({int(t) >= 48 for t in k["input_ids"][:, -1]}),
        with_kwargs=True,
    )
    expertflow.generate_batch(
        model, prompts, max_new_tokens=5, batch_size=2, schedule="expertflow", active_batches=4
    )
    decode = kinds[-16:]  # the last four rounds: four single-kind steps each
    assert all(len(k) == 1 for k in decode)
    for start in range(0, 16, 4):
        turn = [k.pop() for k in decode[start : start + 4]]
        switches = sum(a != b for a, b in zip(turn, turn[1:], strict=False))
        assert switches == 1, turn


def test_top_k_and_top_p_keep_the_right_tokens():
    from expertflow.serving.requests import _Request
    from expertflow.serving.sampling import _Sampling

    probs = torch.tensor([[0.05, 0.5, 0.3, 0.15]])
    logits = probs.log()

    def draws(sampling, n=4000):
        request = _Request(0, [1])
        counts = torch.zeros(4)
        for _ in range(n):
            counts[sampling.pick(logits, [request])[0]] += 1
        return counts / n

    # top_p=0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it: tokens 1 and 2, renormalised.
    nucleus = draws(_Sampling(do_sample=True, top_p=0.7))
    assert nucleus[0] == 0 and nucleus[3] == 0
    assert abs(nucleus[1] - 0.5 / 0.8) < 0.04
    top2 = draws(_Sampling(do_sample=True, top_k=2))
    assert top2[0] == 0 and top2[3] == 0
    hot = draws(_Sampling(do_sample=True, temperature=0.25))  # sharper: token 1 dominates
    assert hot[1] > 0.85
    plain = draws(_Sampling(do_sample=True))
    assert (plain - probs[0]).abs().max() < 0.04


def random_rows(gen: torch.Generator, size: int, length: int, first_index: int):
    """A batch of ``size`` requests, keys/values of 2 layers left-padded to ``length``."""
    from expertflow.serving.kv_rows import _Rows
    from expertflow.serving.requests import _Request

    real = torch.randint(1, length + 1, (size,), generator=gen)
    mask = (torch.arange(length)[None] >= length - real[:, None]).long()
    keys = [torch.randn(size, 2, length, 3, generator=gen) * mask[:, None, :, None] for _ in "ab"]
    values = [torch.randn(size, 2, length, 3, generator=gen) * mask[:, None, :, None] for _ in "ab"]
    requests = [_Request(first_index + r, [0]) for r in range(size)]
    return _Rows(requests, keys, values, mask)


def real_rows(batches) -> dict[int, tuple]:
    """Each request's real (unpadded) keys, values and batch, by request index."""
    found = {}
    for b, rows in enumerate(batches):
        for r, request in enumerate(rows.requests):
            real = rows.mask[r].bool()
            assert real.flip(0).cumprod(0).sum() == real.sum()  # left padding only
            found[request.index] = (
                b,
                [k[r][:, real] for k in rows.keys],
                [v[r][:, real] for v in rows.values],
            )
    return found


@pytest.mark.parametrize("seed", range(6))
def test_exchanging_rows_in_place_moves_each_request_with_its_kv(seed):
    """Batches of different lengths, requests moved along random size-keeping regroupings
    (cycles through three batches, longer rows into shorter batches): every request ends in
    its new batch with exactly its keys/values, and only moving rows' slots change."""
    from expertflow.serving.kv_rows import _exchange_rows, _regroup_moves

    gen = torch.Generator().manual_seed(seed)
    sizes = [4, 3, 4]
    batches = [
        random_rows(gen, size, int(torch.randint(1, 9, (1,), generator=gen)), 10 * b)
        for b, size in enumerate(sizes)
    ]
    before = real_rows(batches)
    current = [b for b, size in enumerate(sizes) for _ in range(size)]
    new = [current[i] for i in torch.randperm(len(current), generator=gen).tolist()]
    moves = _regroup_moves(sizes, current, new)
    assert len(moves) == sum(o != n for o, n in zip(current, new, strict=True))
    staying = {
        (b, r): rows.requests[r].index
        for b, rows in enumerate(batches)
        for r in range(len(rows))
        if (b, r) not in {(m[0], m[1]) for m in moves}
    }
    _exchange_rows(batches, moves)
    after = real_rows(batches)
    requests = [rows.requests[r].index for rows in batches for r in range(len(rows))]
    assert sorted(requests) == sorted(before) and [len(b) for b in batches] == sizes
    listed = [i for b in range(3) for i in sorted(before) if before[i][0] == b]  # as `current`
    for position, index in enumerate(listed):
        assert after[index][0] == new[position]
    for index, (_, keys, values) in before.items():
        for got, expected in zip(after[index][1] + after[index][2], keys + values, strict=True):
            assert torch.equal(got, expected)
    for (b, r), index in staying.items():
        assert batches[b].requests[r].index == index


def test_a_regrouping_that_changes_batch_sizes_is_refused():
    from expertflow.serving.kv_rows import _regroup_moves

    with pytest.raises(ValueError, match="keep every batch's size"):
        _regroup_moves([2, 2], [0, 0, 1, 1], [0, 1, 1, 1])


def test_regrouping_every_few_rounds_keeps_every_output_and_regroups_less():
    model = without_eos("mixtral", seed=2)
    prompts = random_prompts(11, 12)
    reference = [alone(model, p, 9) for p in prompts]
    runs = {
        every: expertflow.generate_batch(
            model,
            prompts,
            max_new_tokens=9,
            batch_size=3,
            schedule="expertflow",
            active_batches=3,
            regroup_every=every,
        )
        for every in (1, 3)
    }
    for out in runs.values():
        assert out.sequences == reference
    assert 0 < runs[3].stats["regroups"] < runs[1].stats["regroups"]
