"""Picking each request's next token: greedy, or sampled from the request's own random stream;
and the token ids that end a request."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from expertflow.serving.arguments import _int_arg, _real_arg
from expertflow.serving.requests import _Request

# The seeds torch.Generator.manual_seed takes (negative ones wrap around).
SEED_RANGE = (-(2**63), 2**64 - 1)


@dataclass(frozen=True)
class _Sampling:
    """Greedy, or sampling with temperature / top-k / top-p from each request's own generator
    (seeded with ``seed + request index``), so a request's tokens never depend on its batch."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    @classmethod
    def checked(cls, do_sample, temperature, top_k, top_p, seed) -> _Sampling:
        """The options, each refused with a ValueError naming it unless valid (numpy scalars
        taken as the numbers they hold)."""
        if not isinstance(do_sample, bool | np.bool_):
            raise ValueError(f"generate_batch: do_sample must be a bool, got {do_sample!r}")
        # A finite temperature: the logits are divided by it (inf would make every logit 0 or
        # NaN); a tiny one is fine, pick() divides after subtracting each row's largest logit.
        temperature = _real_arg(
            "temperature", temperature, "> 0 (a finite number)", lambda t: 0 < t < math.inf
        )
        if top_k is not None:
            top_k = _int_arg("top_k", top_k, 1, optional=True)
        if top_p is not None:
            top_p = _real_arg("top_p", top_p, "None or in (0, 1] (a number)", lambda p: 0 < p <= 1)
        seed = _int_arg("seed", seed, SEED_RANGE[0], SEED_RANGE[1])
        return cls(bool(do_sample), temperature, top_k, top_p, seed)

    def check_seeds(self, requests: int) -> None:
        """Request i seeds its generator with ``seed + i``: all of them must be seeds torch
        takes (``torch.Generator.manual_seed``: ``[-2**63, 2**64)``), or the last requests of
        a batch would fail with an overflow."""
        if self.seed + requests - 1 > SEED_RANGE[1]:
            raise ValueError(
                f"generate_batch: seed must be at most 2**64 - {requests} with {requests} "
                f"prompts (request i is seeded seed + i, torch takes seeds below 2**64), "
                f"got {self.seed}"
            )

    def pick(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """The next token of each row of ``logits`` ``[B, vocab]``: by each request's own
        sampling where it has one (served requests), else by these options."""
        if any(r.sampling is not None for r in requests):
            return [
                (r.sampling or self)._pick(logits[i : i + 1], [r])[0]
                for i, r in enumerate(requests)
            ]
        return self._pick(logits, requests)

    def _pick(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        if not self.do_sample:
            return logits.argmax(dim=-1).tolist()
        logits = logits.float()
        # Largest logit first subtracted: a tiny temperature then gives 0 and -inf (greedy,
        # ties shared), not inf - inf = NaN.
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            sorted_probs = ordered.softmax(dim=-1)
            # Probability of the tokens ranked above each one: past top_p, it is not needed.
            beyond = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p
            drop = beyond.scatter(-1, order, beyond)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        tokens = []
        for row, request in zip(probs, requests, strict=True):
            if request.generator is None:
                # A request with its own options has its own seed; in generate_batch, request
                # i takes seed + i so that no two share a stream.
                own = request.sampling is not None
                request.generator = torch.Generator(device=row.device)
                request.generator.manual_seed(self.seed if own else self.seed + request.index)
            tokens.append(int(torch.multinomial(row, 1, generator=request.generator)))
        return tokens


def _eos_ids(model: nn.Module, eos_token_id, vocab: int | None = None) -> set[int]:
    """The ids that end a request: ``eos_token_id`` (an int or several, each a token id in
    ``[0, vocab)`` when the vocabulary size is known), by default the model's
    ``generation_config.eos_token_id``; none if neither is set."""
    if eos_token_id is None:
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if configured is None:
            return set()
        ids = [configured] if isinstance(configured, int | np.integer) else configured
        return {int(t) for t in ids}
    ids = eos_token_id.tolist() if isinstance(eos_token_id, torch.Tensor | np.ndarray) else None
    if ids is None:
        ids = [eos_token_id] if isinstance(eos_token_id, int | np.integer) else eos_token_id
    elif not isinstance(ids, list):
        ids = [ids]  # a 0-d tensor or array
    most = None if not isinstance(vocab, int) else vocab - 1
    if not isinstance(ids, list | tuple | set | frozenset):
        raise ValueError(
            "generate_batch: eos_token_id must be None, a token id or a list of token ids, got "
            f"{eos_token_id!r:.80}"
        )
    return {_int_arg("eos_token_id", t, 0, most) for t in ids}
