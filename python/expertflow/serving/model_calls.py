"""The forward calls of batched generation: prompts prefilled together, decode steps of a batch.

Each call also tells the offloaded model's prefetcher what it runs (a prompt: forget the rows
followed so far; a decode step: these rows' histories and predicted paths), and reads the
routing the call took."""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from expertflow.serving.cache_adapter import _as_cache, _prefilled_rows, _stepped_rows
from expertflow.serving.kv_rows import _Rows
from expertflow.serving.requests import _Request
from expertflow.serving.routing_tap import _RoutingTap
from expertflow.serving.sampling import _Sampling


class _ModelCalls:
    """Runs the model for :class:`~expertflow.serving.generation._Generator`.

    Args:
        model: the causal LM.
        tap: the routing tap entered on ``model``.
        sampling: picks each row's next token.
        prefetcher: the offloaded model's prefetcher, if any.
    """

    def __init__(self, model: nn.Module, tap: _RoutingTap, sampling: _Sampling, prefetcher):
        self.model, self.tap, self.sampling, self.prefetcher = model, tap, sampling, prefetcher
        self.device = next(model.parameters()).device
        forward = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    def prefill(self, requests: list[_Request]) -> tuple[list[int], np.ndarray, _Rows]:
        """Runs prompts together, shorter ones left-padded (masked, positions counted from their
        first real token, as the decode steps run padded rows).

        Returns:
            ``(tokens, paths, rows)``: each request's next token, the routing ``[B, L, K]`` of
            its last prompt token, and the requests' KV rows.
        """
        from transformers import DynamicCache

        if self.prefetcher is not None:
            self.prefetcher.reset()
        longest = max(len(r.ids) for r in requests)
        ids = torch.zeros((len(requests), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            ids[row, longest - len(request.ids) :] = torch.as_tensor(request.ids)
            mask[row, longest - len(request.ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        padded = bool((mask == 0).any())
        cache = DynamicCache()  # full layers: rows of any length can then be concatenated
        self.tap.clear()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(dim=1) - 1).clamp(min=0) if padded else None,
            past_key_values=cache,
            use_cache=True,
            **self.keep_last,
        )
        tokens = self.sampling.pick(out.logits[:, -1], requests)
        routing = self.tap.routing()
        paths = routing.reshape(len(requests), longest, *routing.shape[1:])[:, -1]
        return tokens, paths, _prefilled_rows(requests, cache, mask, padded)

    def decode(self, rows: _Rows, following: list[_Request]) -> tuple[list[int], np.ndarray, _Rows]:
        """One decode step of a batch; ``following``: the requests of the batch whose turn is
        next (their predicted paths become eviction scores).

        Returns:
            ``(tokens, routing, rows)``: each row's next token, the step's routing
            ``[B, L, K]``, and the rows one column longer (``rows`` itself is unchanged).
        """
        requests = rows.requests
        ids = torch.tensor([[r.ids[-1]] for r in requests], device=self.device)
        positions = torch.tensor([[len(r.ids) - 1] for r in requests], device=self.device)
        mask = torch.cat([rows.mask, torch.ones_like(ids)], dim=1)
        if self.prefetcher is not None:
            self._drive(requests, following)
        cache = _as_cache(rows)
        self.tap.clear()
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            **self.keep_last,
        )
        tokens = self.sampling.pick(out.logits[:, -1], requests)
        return tokens, self.tap.routing(), _stepped_rows(rows, cache, mask)

    def _drive(self, requests: list[_Request], following: list[_Request]) -> None:
        """Declares the step to the prefetcher, with the scores already predicted, if any."""
        scores = reuse = None
        if all(r.scores is not None for r in requests):
            scores = np.stack([r.scores for r in requests])
            if all(r.reuse is not None for r in requests):
                reuse = np.stack([r.reuse for r in requests])
            reuse = _with_following(reuse, following)
        self.prefetcher.drive(
            [r.ids for r in requests], np.stack([r.previous for r in requests]), scores, reuse
        )


def _with_following(reuse: np.ndarray | None, following: list[_Request]) -> np.ndarray | None:
    """Reuse scores for a batch's step, ``[rows, L, E]``: its requests' own (their next tokens,
    a turn of every active batch away) and the predicted paths of the batch that takes the next
    turn, which uses a layer's experts next after this batch has run it."""
    scores = [r.scores for r in following if r.scores is not None]
    if not scores or len(scores) != len(following):
        return reuse  # no batch follows this round, or its paths were not predicted
    nxt = np.stack(scores)
    return nxt if reuse is None else np.concatenate([reuse, nxt])
