"""A request's lifecycle in batched generation: its prompt checked, its prefill group, its
tokens accepted until it ends, and why it ended."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Request:
    """One request of a :func:`~expertflow.serving.generation.generate_batch` call."""

    index: int
    ids: list[int]  # prompt + generated; the last id is the next token to run
    generated: list[int] = field(default_factory=list)
    previous: np.ndarray | None = None  # [L, K] routing of the last token run
    scores: np.ndarray | None = None  # [L, E] predicted for the next step, if predicted
    reuse: np.ndarray | None = None  # [L, E] the predictor's reuse scores with them, if any
    generator: torch.Generator | None = None  # its own random stream, when sampling
    # Set by an engine serving requests that arrive one by one (serving.engine); None in
    # generate_batch, whose options hold for every request.
    max_new_tokens: int | None = None  # its own limit instead of the call's
    sampling: object = None  # its own _Sampling (its seed taken as is, not seed + index)
    notify: Callable[[_Request, str | None], None] | None = None  # per token, and at the end


def _prompt_ids(prompts, vocab: int | None, context: int | None) -> list[list[int]]:
    """Each prompt's token ids as ints, checked against the vocabulary size and the context
    length (when known); refuses anything else with a ValueError naming the prompt."""
    if isinstance(prompts, str | bytes):
        raise ValueError(
            "generate_batch: prompts must be a non-empty list of prompts, each a list or 1-D "
            f"tensor of token ids; got a {type(prompts).__name__} (text: tokenize it first)"
        )
    if isinstance(prompts, torch.Tensor | np.ndarray):
        if prompts.ndim != 2:
            raise ValueError(
                "generate_batch: prompts given as one tensor must be 2-D [prompts, tokens], "
                f"got shape {list(prompts.shape)}"
            )
        prompts = list(prompts)
    if not isinstance(prompts, Sequence) or not prompts:
        raise ValueError(
            "generate_batch: prompts must be a non-empty list of prompts, each a list or 1-D "
            f"tensor of token ids; got {type(prompts).__name__}"
            + (" of length 0" if isinstance(prompts, Sequence) else "")
        )
    if all(isinstance(t, int | np.integer) for t in prompts):
        raise ValueError(
            "generate_batch: prompts must be a non-empty list of prompts, each a list or 1-D "
            f"tensor of token ids; got one list of ints {prompts!r:.60} (one prompt? pass "
            "[prompt])"
        )
    return [_checked_prompt(i, prompt, vocab, context) for i, prompt in enumerate(prompts)]


def _checked_prompt(i: int, prompt, vocab: int | None, context: int | None) -> list[int]:
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor | np.ndarray) else prompt
    if (
        not isinstance(ids, list | tuple)
        or not ids
        or not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids)
    ):
        raise ValueError(
            f"generate_batch: prompts[{i}] must be a non-empty list or 1-D tensor of int "
            f"token ids, got {prompt!r:.80}"
        )
    ids = [int(t) for t in ids]
    if vocab is not None and not all(0 <= t < vocab for t in ids):
        bad = next(t for t in ids if not 0 <= t < vocab)
        raise ValueError(
            f"generate_batch: prompts[{i}] has token id {bad}, outside the model's "
            f"vocabulary [0, {vocab})"
        )
    if context is not None and len(ids) > context:
        raise ValueError(
            f"generate_batch: prompts[{i}] has {len(ids)} tokens, longer than the model's "
            f"context of {context} (config.max_position_embeddings)"
        )
    return ids


def _prefill_groups(requests: list[_Request], padding: float) -> list[list[_Request]]:
    """Requests grouped for prefilling: by prompt length, each group as long as padding every
    prompt to the group's longest adds at most ``padding`` of its real tokens (padded
    positions run through every layer like real ones: a 10-token prompt beside a 1000-token
    one is better prefilled on its own)."""
    groups: list[list[_Request]] = []
    for request in sorted(requests, key=lambda r: (len(r.ids), r.index)):
        group = groups[-1] if groups else None
        if group is not None:
            real = sum(len(r.ids) for r in group) + len(request.ids)
            if (len(group) + 1) * len(request.ids) <= (1 + padding) * real:
                group.append(request)
                continue
        groups.append([request])
    return groups


class _Outcomes:
    """When requests end and why: ``finish[index]`` is ``"stop"`` (an EOS id), ``"length"``
    (``max_new_tokens``), ``"context"`` (the model's context is full) or ``"error"`` (then
    ``errors[index]`` holds the exception)."""

    def __init__(self, max_new_tokens: int, eos: set[int], context: int | None):
        self.max_new_tokens, self.eos, self.context = max_new_tokens, eos, context
        self.finish: dict[int, str] = {}
        self.errors: dict[int, Exception] = {}

    def _finished(self, request: _Request) -> str | None:
        if request.generated[-1] in self.eos:
            return "stop"
        limit = request.max_new_tokens or self.max_new_tokens
        if len(request.generated) >= limit:
            return "length"
        if self.context is not None and len(request.ids) >= self.context:
            return "context"  # the next token would need a position past the context
        return None

    def accept(self, request: _Request, token: int, path: np.ndarray) -> bool:
        """Appends a generated token (``path`` ``[L, K]``: the routing of the token just run);
        True while the request goes on."""
        request.ids.append(token)
        request.generated.append(token)
        request.previous, request.scores, request.reuse = path, None, None
        reason = self._finished(request)
        if reason is not None:
            self.finish[request.index] = reason
        if request.notify is not None:
            request.notify(request, reason)
        return reason is None

    def fail(self, request: _Request, error: Exception) -> None:
        self.finish[request.index] = "error"
        self.errors[request.index] = error
        if request.notify is not None:
            request.notify(request, "error")
