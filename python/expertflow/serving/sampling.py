"""Picking each request's next token: greedy, or sampled from the request's own random stream;
and the token ids that end a request."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from expertflow.serving.requests import _Request


@dataclass(frozen=True)
class _Sampling:
    """Greedy, or sampling with temperature / top-k / top-p from each request's own generator
    (seeded with ``seed + request index``), so a request's tokens never depend on its batch."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def check(self) -> None:
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise ValueError(f"generate_batch: temperature must be > 0, got {self.temperature!r}")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ValueError(
                f"generate_batch: top_k must be None or an int >= 1, got {self.top_k!r}"
            )
        if self.top_p is not None and (
            not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1
        ):
            raise ValueError(f"generate_batch: top_p must be None or in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"generate_batch: seed must be an int, got {self.seed!r}")

    def pick(self, logits: torch.Tensor, requests: list[_Request]) -> list[int]:
        """The next token of each row of ``logits`` ``[B, vocab]``."""
        if not self.do_sample:
            return logits.argmax(dim=-1).tolist()
        logits = logits.float() / self.temperature
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
                request.generator = torch.Generator(device=row.device)
                request.generator.manual_seed(self.seed + request.index)
            tokens.append(int(torch.multinomial(row, 1, generator=request.generator)))
        return tokens


def _eos_ids(model: nn.Module, eos_token_id) -> set[int]:
    """The ids that end a request: ``eos_token_id`` (an int or several), by default the
    model's ``generation_config.eos_token_id``; none if neither is set."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int | np.integer):
        return {int(eos_token_id)}
    return {int(t) for t in eos_token_id}
