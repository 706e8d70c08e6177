"""Issue 18: ``offload(..., cpu_experts="always")`` computes every expert on the CPU from the
host store (``ops.cpu_expert``): the same logits (fp32, within 1e-5) and greedy tokens as the
model itself, for every family, float and packed; bad values are refused naming the argument."""

from __future__ import annotations

import pytest
import torch

import expertflow
from expertflow.runtime.experts import find_experts_modules

pytest.importorskip("transformers")

from tests.modules.test_offload import FAMILIES, batch, build  # noqa: E402


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    return logits, tokens


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_always_matches_the_model(family):
    model = build(family)
    ids, mask = batch()
    want, want_tokens = _run(model, ids, mask)
    slots = len(find_experts_modules(model)) * model.config.num_experts_per_tok
    expertflow.offload(model, device="cpu", slots=slots, policy="lru", cpu_experts="always")
    got, got_tokens = _run(model, ids, mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got_tokens, want_tokens)
    stats = model._expertflow.cache.stats()
    assert stats["hits"] == stats["misses"] == stats["bytes_copied"] == 0  # no slot used
    expertflow.restore(model)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_always_on_packed_experts_matches_never(fmt):
    outs = []
    for mode in ("never", "always"):
        model = build("mixtral")
        ids, mask = batch()
        expertflow.offload(
            model, device="cpu", slots=8, policy="lru", expert_format=fmt, cpu_experts=mode
        )
        outs.append(_run(model, ids, mask))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1][1], outs[0][1])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sometimes", r"^cpu_experts must be one of \('never', 'always', 'auto'\)"),
        (True, r"^cpu_experts must be one of"),
        ("auto", r"^cpu_experts='auto' needs the expert cache to pin its hits"),
    ],
)
def test_bad_values_are_refused_and_the_model_is_untouched(value, message):
    model = build("mixtral")
    ids, mask = batch()
    want, _ = _run(model, ids, mask)
    with pytest.raises(ValueError, match=message):
        expertflow.offload(model, device="cpu", slots=8, cpu_experts=value)
    assert not hasattr(model, "_expertflow")
    torch.testing.assert_close(_run(model, ids, mask)[0], want)
