"""Batched generation: many requests decoded in turns of batches, optionally regrouped.

:func:`generate_batch` keeps ``active_batches`` batches of up to ``batch_size`` requests and
lets them take one decode step each in turn (continuous batching: a finished request leaves its
batch and the next waiting one is prefilled into its place; prompts of equal length are
prefilled together, unpadded). Every request owns its rows of its batch's KV cache: rows of
different lengths are left-padded with zeros and masked, and each row gets its own positions,
so a request decodes exactly as it would alone.

With ``schedule="expertflow"`` (ExpertFlow's token scheduler), before every round (one decode
step of each active batch) the requests of the active batches are regrouped, keeping the batch
sizes, so that the batches need as few distinct (layer, expert) pairs as possible by their
predicted routing paths: every pair of batches is re-split with the native two-batch split
(:func:`~expertflow.serving.scheduler.regroup`). Their KV rows move with them. With two active
batches this is ExpertFlow's re-split of two consecutive batches; more active batches give the
scheduler more requests to match (measured in ``bench/bench_generate_batch.py``). The round
then runs each batch after the one it shares most predicted experts with, starting from the
batch that ran last, so that the slots one batch filled serve the next."""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from expertflow.prediction import Predictor, multi_hot
from expertflow.runtime.routing import RoutedCall, hook_routed_calls, routed_modules
from expertflow.serving.scheduler import paths_from_scores, regroup

__all__ = ["BatchGeneration", "generate_batch"]

SCHEDULES = ("fifo", "expertflow")


@dataclass
class BatchGeneration:
    """What :func:`generate_batch` returns.

    ``sequences[i]``: the new tokens of request i (ending with the EOS token if it stopped
    there). ``finish_reasons[i]``: ``"stop"`` (EOS), ``"length"`` (max_new_tokens),
    ``"context"`` (the model's context is full) or ``"error"`` (then ``errors[i]`` holds the
    exception and ``sequences[i]`` the tokens made before it). ``stats``: see
    :func:`generate_batch`.
    """

    sequences: list[list[int]]
    finish_reasons: list[str]
    errors: dict[int, Exception] = field(default_factory=dict)
    stats: dict = field(default_factory=dict)


@dataclass
class _Request:
    index: int
    ids: list[int]  # prompt + generated; the last id is the next token to run
    generated: list[int] = field(default_factory=list)
    previous: np.ndarray | None = None  # [L, K] routing of the last token run
    scores: np.ndarray | None = None  # [L, E] predicted for the next step, if predicted
    reuse: np.ndarray | None = None  # [L, E] the predictor's reuse scores with them, if any
    generator: torch.Generator | None = None  # its own random stream, when sampling


class _Rows:
    """A batch: its requests and their KV rows, ``[B, heads, S, dim]`` per attention layer,
    left-padded to a common length S; ``mask`` ``[B, S]`` is 1 on real positions."""

    def __init__(self, requests, keys, values, mask):
        self.requests: list[_Request] = requests
        self.keys: list[torch.Tensor] = keys
        self.values: list[torch.Tensor] = values
        self.mask: torch.Tensor = mask

    def __len__(self) -> int:
        return len(self.requests)

    @staticmethod
    def concat(parts: list[_Rows]) -> _Rows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return _Rows([], [], [], torch.zeros(0, 0, dtype=torch.long))
        length = max(p.mask.shape[1] for p in parts)
        parts = [p.left_padded(length) for p in parts]
        return _Rows(
            [r for p in parts for r in p.requests],
            [torch.cat(layer) for layer in zip(*(p.keys for p in parts), strict=True)],
            [torch.cat(layer) for layer in zip(*(p.values for p in parts), strict=True)],
            torch.cat([p.mask for p in parts]),
        )

    def select(self, rows: list[int]) -> _Rows:
        """The given rows, without the columns that are padding in all of them."""
        if not rows:
            return _Rows.concat([])
        index = torch.as_tensor(rows, device=self.mask.device)
        return _Rows(
            [self.requests[r] for r in rows],
            [k.index_select(0, index) for k in self.keys],
            [v.index_select(0, index) for v in self.values],
            self.mask.index_select(0, index),
        ).trimmed()

    def trimmed(self) -> _Rows:
        """Without the leading columns that are padding in every row (views, no copy)."""
        if not len(self) or not self.mask.shape[1]:
            return self
        start = int(self.mask.any(dim=0).to(torch.uint8).argmax())
        if start == 0:
            return self
        return _Rows(
            self.requests,
            [k[:, :, start:] for k in self.keys],
            [v[:, :, start:] for v in self.values],
            self.mask[:, start:],
        )

    def left_padded(self, length: int) -> _Rows:
        """The rows left-padded to ``length`` columns (a copy; only when they need to grow)."""
        pad = length - self.mask.shape[1]
        if pad <= 0:
            return self
        return _Rows(
            self.requests,
            [F.pad(k, (0, 0, pad, 0)) for k in self.keys],
            [F.pad(v, (0, 0, pad, 0)) for v in self.values],
            F.pad(self.mask, (pad, 0)),
        )


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


def _right_aligned(t: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """``t`` with ``length`` columns along ``dim``, right-aligned: leading padding cut or added."""
    have = t.shape[dim]
    if have >= length:
        return t.narrow(dim, have - length, length)
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [length - have, 0])


def _regroup_moves(sizes: list[int], current: list[int], new: list[int]):
    """The ``(source, row, destination, slot)`` moves that take requests from batch
    ``current[i]`` to ``new[i]`` (requests listed batch after batch, ``sizes`` rows each):
    each moving request takes a slot that another one leaves in its new batch, as a
    regrouping keeps batch sizes."""
    row_in_batch = [r for size in sizes for r in range(size)]
    leaving: dict[int, list[int]] = {k: [] for k in range(len(sizes))}
    for i, (old, g) in enumerate(zip(current, new, strict=True)):
        if old != g:
            leaving[old].append(row_in_batch[i])
    arriving = [sum(1 for o, n in zip(current, new, strict=True) if n == g != o) for g in leaving]
    if [len(leaving[g]) for g in leaving] != arriving:
        raise ValueError("a regrouping must keep every batch's size")
    return [
        (old, row_in_batch[i], g, leaving[g].pop(0))
        for i, (old, g) in enumerate(zip(current, new, strict=True))
        if old != g
    ]


def _exchange_rows(batches: list[_Rows], moves: list[tuple[int, int, int, int]]) -> list[_Rows]:
    """Moves rows between batches in place: each ``(source, row, destination, slot)`` puts row
    ``row`` of batch ``source`` into slot ``slot`` of batch ``destination``, a slot that its
    own row leaves by another move (sizes are kept). Only the moving rows' keys/values are
    copied (once out, once in), not every row of every batch involved; a destination grows
    (one copy of it) only when an arriving row is longer than it. Returns the batches."""
    out: dict[int, tuple[list[int], list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = {}
    for source in sorted({m[0] for m in moves}):  # copied out first: their slots get written
        rows = [m[1] for m in moves if m[0] == source]
        b = batches[source]
        index = torch.as_tensor(rows, device=b.mask.device)
        out[source] = (
            rows,
            [k.index_select(0, index) for k in b.keys],
            [v.index_select(0, index) for v in b.values],
            b.mask.index_select(0, index),
        )
    requests = {(m[0], m[1]): batches[m[0]].requests[m[1]] for m in moves}
    for dest in sorted({m[2] for m in moves}):
        arriving = [m for m in moves if m[2] == dest]
        longest = max(int(out[src][3][out[src][0].index(row)].sum()) for src, row, _, _ in arriving)
        b = batches[dest].left_padded(longest)
        length = b.mask.shape[1]
        for src in sorted({m[0] for m in arriving}):
            group = [m for m in arriving if m[0] == src]
            rows, keys, values, mask = out[src]
            take = torch.as_tensor([rows.index(m[1]) for m in group], device=mask.device)
            slots = torch.as_tensor([m[3] for m in group], device=mask.device)
            for target, moved in zip(b.keys, keys, strict=True):
                target.index_copy_(0, slots, _right_aligned(moved.index_select(0, take), 2, length))
            for target, moved in zip(b.values, values, strict=True):
                target.index_copy_(0, slots, _right_aligned(moved.index_select(0, take), 2, length))
            b.mask.index_copy_(0, slots, _right_aligned(mask.index_select(0, take), 1, length))
            for m in group:
                b.requests[m[3]] = requests[(m[0], m[1])]
        batches[dest] = b
    for dest in {m[2] for m in moves}:
        batches[dest] = batches[dest].trimmed()
    return batches


def _as_cache(rows: _Rows):
    """A transformers DynamicCache over the rows' tensors (no copy)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache()
    for k, v in zip(rows.keys, rows.values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
        cache.layers.append(layer)
    return cache


class _RoutingTap:
    """Hooks on the model's MoE layers keeping each layer's ``top_k_index`` of the last call."""

    def __init__(self, model: nn.Module):
        self.modules = routed_modules(model)
        if not self.modules:
            raise ValueError(
                f"generate_batch: {type(model).__name__} has no MoE experts module that "
                "expertflow supports"
            )
        self._index: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = []

    def __enter__(self) -> _RoutingTap:
        def keep(layer: int, call: RoutedCall) -> None:
            self._index[layer] = call.top_k_index.detach()

        self._handles = hook_routed_calls(self.modules, keep)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()

    def clear(self) -> None:
        self._index = [None] * len(self.modules)

    def routing(self) -> np.ndarray:
        """``[tokens, L, K]`` expert ids of the last forward call."""
        return torch.stack(self._index, dim=1).cpu().numpy()


def _prompt_ids(prompts, vocab: int | None, context: int | None) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor | np.ndarray):
        prompts = list(prompts)
    if not isinstance(prompts, Sequence) or isinstance(prompts, str | bytes) or not prompts:
        raise ValueError(
            "generate_batch: prompts must be a non-empty list of prompts, each a list or 1-D "
            f"tensor of token ids; got {type(prompts).__name__}"
            + (" of length 0" if isinstance(prompts, Sequence) else "")
        )
    out = []
    for i, prompt in enumerate(prompts):
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
        out.append(ids)
    return out


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
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int | np.integer):
        return {int(eos_token_id)}
    return {int(t) for t in eos_token_id}


class _Generator:
    """The state of one generate_batch call."""

    def __init__(self, model, requests, *, max_new_tokens, batch_size, schedule, active_batches,
                 regroup_every, prefill_padding, predictor, eos, context, tap,
                 sampling):  # fmt: skip
        self.model, self.tap = model, tap
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.schedule, self.predictor, self.eos, self.context = schedule, predictor, eos, context
        self.sampling = sampling
        self.device = next(model.parameters()).device
        self.waiting = deque(requests)
        self.batches = [_Rows.concat([]) for _ in range(active_batches)]
        self.regroup_every, self.prefill_padding = regroup_every, prefill_padding
        self._following: list[_Request] = []  # the batch that takes the next turn
        self.finish: dict[int, str] = {}
        self.errors: dict[int, Exception] = {}
        state = getattr(model, "_expertflow", None)
        self.prefetcher = state.prefetcher if state is not None else None
        forward = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self.stats = {
            "prefill_seconds": 0.0,
            "prefill_tokens": 0,  # positions run by prefill calls, padding included
            "decode_seconds": 0.0,
            "schedule_seconds": 0.0,
            "decode_steps": 0,
            "decode_tokens": 0,
            "kv_rows_moved": 0,
            "regroups": 0,
        }
        self._distinct: list[float] = []  # per decode step: mean distinct experts per layer
        self._last_union: np.ndarray | None = None  # [L, E] experts of the last decode step
        self._order: list[int] = []  # the batches' turns this round

    # -- requests ---------------------------------------------------------------------------

    def _finished(self, request: _Request) -> str | None:
        if request.generated[-1] in self.eos:
            return "stop"
        if len(request.generated) >= self.max_new_tokens:
            return "length"
        if self.context is not None and len(request.ids) >= self.context:
            return "context"  # the next token would need a position past the context
        return None

    def _accept(self, request: _Request, token: int, path: np.ndarray) -> bool:
        """Appends a generated token; True while the request goes on."""
        request.ids.append(token)
        request.generated.append(token)
        request.previous, request.scores, request.reuse = path, None, None
        reason = self._finished(request)
        if reason is not None:
            self.finish[request.index] = reason
        return reason is None

    def _fail(self, request: _Request, error: Exception) -> None:
        self.finish[request.index] = "error"
        self.errors[request.index] = error

    # -- model calls ------------------------------------------------------------------------

    def _prefill(self, requests: list[_Request]) -> _Rows:
        """Runs prompts together, shorter ones left-padded (masked, positions counted from
        their first real token, as the decode steps run padded rows); returns the rows of those
        that go on. A failing group is retried one prompt at a time, so that only the prompts
        that fail alone fail."""
        from transformers import DynamicCache

        started = time.perf_counter()
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
        self.stats["prefill_tokens"] += ids.numel()
        cache = DynamicCache()  # full layers: rows of any length can then be concatenated
        self.tap.clear()
        try:
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
            paths = routing.reshape(len(requests), ids.shape[1], *routing.shape[1:])[:, -1]
        except Exception as error:  # noqa: BLE001  (one request's failure must not stop the rest)
            self.stats["prefill_seconds"] += time.perf_counter() - started
            if len(requests) == 1:
                self._fail(requests[0], error)
                return _Rows.concat([])
            return _Rows.concat([self._prefill([r]) for r in requests])
        self.stats["prefill_seconds"] += time.perf_counter() - started
        keep = mask[:, None, :, None].to(cache.layers[0].keys.dtype) if padded else None
        rows = _Rows(
            requests,
            # Padding positions' keys/values are zeroed: masked, but whatever a padding
            # position computed (a query that sees no key) must not reach a later step.
            [layer.keys if keep is None else layer.keys * keep for layer in cache.layers],
            [layer.values if keep is None else layer.values * keep for layer in cache.layers],
            mask,
        )
        going_on = [
            i
            for i, (request, token, path) in enumerate(zip(requests, tokens, paths, strict=True))
            if self._accept(request, token, path)
        ]
        return rows if len(going_on) == len(requests) else rows.select(going_on)

    def _step(self, rows: _Rows) -> _Rows:
        """One decode step of a batch; returns the rows still going on. A failing step is
        retried one request at a time, so that only the requests that fail alone fail."""
        started = time.perf_counter()
        try:
            tokens, routing, cache, mask = self._forward(rows)
        except Exception as error:  # noqa: BLE001
            self.stats["decode_seconds"] += time.perf_counter() - started
            if len(rows) == 1:
                self._fail(rows.requests[0], error)
                return _Rows.concat([])
            return _Rows.concat([self._step(rows.select([r])) for r in range(len(rows))])
        self.stats["decode_seconds"] += time.perf_counter() - started
        self.stats["decode_steps"] += 1
        self.stats["decode_tokens"] += len(rows)
        self._distinct.append(
            float(np.mean([len(np.unique(routing[:, layer])) for layer in range(routing.shape[1])]))
        )
        if self.schedule == "expertflow":  # the next round's turn order starts from it
            self._last_union = multi_hot(routing, self.tap.modules[0].num_experts).any(axis=0) > 0
        rows.keys = [layer.keys for layer in cache.layers]
        rows.values = [layer.values for layer in cache.layers]
        rows.mask = mask
        going_on = [
            r
            for r, (request, token) in enumerate(zip(rows.requests, tokens, strict=True))
            if self._accept(request, token, routing[r])
        ]
        return rows if len(going_on) == len(rows) else rows.select(going_on)

    def _forward(self, rows: _Rows):
        requests = rows.requests
        ids = torch.tensor([[r.ids[-1]] for r in requests], device=self.device)
        positions = torch.tensor([[len(r.ids) - 1] for r in requests], device=self.device)
        mask = torch.cat([rows.mask, torch.ones_like(ids)], dim=1)
        if self.prefetcher is not None:
            scores = reuse = None
            if all(r.scores is not None for r in requests):
                scores = np.stack([r.scores for r in requests])
                if all(r.reuse is not None for r in requests):
                    reuse = np.stack([r.reuse for r in requests])
                reuse = self._with_following(reuse)
            self.prefetcher.drive(
                [r.ids for r in requests], np.stack([r.previous for r in requests]), scores, reuse
            )
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
        return tokens, self.tap.routing(), cache, mask

    def _with_following(self, reuse: np.ndarray | None) -> np.ndarray | None:
        """Reuse scores for a batch's step, ``[rows, L, E]``: its requests' own (their next
        tokens, a turn of every active batch away) and the predicted paths of the batch that
        takes the next turn, which uses a layer's experts next after this batch has run it."""
        following = [r.scores for r in self._following if r.scores is not None]
        if not following or len(following) != len(self._following):
            return reuse  # no batch follows this round, or its paths were not predicted
        nxt = np.stack(following)
        return nxt if reuse is None else np.concatenate([reuse, nxt])

    # -- scheduling -------------------------------------------------------------------------

    def _admit(self, batch: int) -> None:
        """Fills the batch with waiting requests, prefilling their prompts together in groups
        of similar length (:func:`_prefill_groups`)."""
        while len(self.batches[batch]) < self.batch_size and self.waiting:
            free = self.batch_size - len(self.batches[batch])
            admitted = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
            groups = _prefill_groups(admitted, self.prefill_padding)
            new = [self._prefill(group) for group in groups]
            self.batches[batch] = _Rows.concat([self.batches[batch], *new])

    def _paths(self, requests: list[_Request]) -> np.ndarray:
        """Predicted paths ``[N, L, E]`` of each request's next step: the predictor's top-k, or
        without one the experts the request's previous token chose (routing repeats often)."""
        previous = np.stack([r.previous for r in requests])
        num_experts = self.tap.modules[0].num_experts
        if self.predictor is None:
            return multi_hot(previous, num_experts).astype(bool)
        scores, reuse = self.predictor.predict_step_with_reuse([r.ids for r in requests], previous)
        for i, request in enumerate(requests):  # reused by the prefetcher at the request's step
            request.scores, request.reuse = scores[i], None if reuse is None else reuse[i]
        return paths_from_scores(scores, previous.shape[-1])

    def _regroup(self) -> None:
        """Regroups the requests of all active batches by predicted paths (sizes kept)."""
        live = [b for b, rows in enumerate(self.batches) if len(rows)]
        if len(live) < 2:
            return
        started = time.perf_counter()
        requests = [r for b in live for r in self.batches[b].requests]
        current = [k for k, b in enumerate(live) for _ in self.batches[b].requests]
        paths = self._paths(requests)
        new = regroup(paths, current, len(live))
        changed = sorted({g for old, g in zip(current, new, strict=True) if old != g})
        if changed:
            self._move(live, current, new)
            self.stats["kv_rows_moved"] += sum(
                1 for old, g in zip(current, new, strict=True) if old != g
            )
            self.stats["regroups"] += 1
        # Order the round: each batch after the one whose experts it shares most with, starting
        # from the batch that ran last, so that slots filled by one batch serve the next.
        unions = {live[k]: paths[np.asarray(new) == k].any(axis=0) for k in range(len(live))}
        previous = self._last_union
        order = []
        while unions:
            best = max(
                unions, key=lambda b: -1 if previous is None else int((unions[b] & previous).sum())
            )
            order.append(best)
            previous = unions.pop(best)
        self._order = order
        self.stats["schedule_seconds"] += time.perf_counter() - started

    def _move(self, live: list[int], current: list[int], new: list[int]) -> None:
        """Carries out a regrouping of the live batches in place."""
        moves = _regroup_moves([len(self.batches[b]) for b in live], current, new)
        _exchange_rows(self.batches, [(live[a], r, live[b], slot) for a, r, b, slot in moves])

    def run(self) -> None:
        rounds = 0
        while self.waiting or any(len(b) for b in self.batches):
            for batch in range(len(self.batches)):
                self._admit(batch)
            self._order = list(range(len(self.batches)))
            if self.schedule == "expertflow" and rounds % self.regroup_every == 0:
                self._regroup()
            rounds += 1
            live = [b for b in self._order if len(self.batches[b])]
            for i, batch in enumerate(live):
                # The last batch's follower already ran this round: its paths are gone.
                following = self.batches[live[i + 1]] if i + 1 < len(live) else None
                self._following = following.requests if following is not None else []
                self.batches[batch] = self._step(self.batches[batch])

    def distinct_experts_per_layer(self) -> float | None:
        return float(np.mean(self._distinct)) if self._distinct else None


def generate_batch(
    model: nn.Module,
    prompts,
    *,
    max_new_tokens: int,
    batch_size: int,
    schedule: str = "fifo",
    active_batches: int = 4,
    regroup_every: int = 1,
    prefill_padding: float = 0.25,
    predictor: Predictor | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
) -> BatchGeneration:
    """Generation for many requests, ``batch_size`` at a time: greedy, or sampled.

    Every request's tokens are those it would get decoded alone, whatever the batching and
    scheduling: greedy on the model's logits, or sampled from its own random stream.

    Args:
        model: a transformers causal LM, offloaded by :func:`expertflow.offload` or not.
        prompts: token ids per request (lists or 1-D tensors), in arrival order.
        max_new_tokens: at most this many new tokens per request.
        batch_size: requests per decode batch.
        schedule: ``"fifo"`` (batches keep their requests in arrival order) or
            ``"expertflow"`` (consecutive batches regrouped by predicted routing, see module).
        active_batches: batches decoding in turn; their requests' KV caches are all held.
            The scheduler regroups among all of them: more gives it more requests to match
            (4 by default; on the demo model at batch 16, 2 active batches cut distinct
            experts per step by about 10%, 4 by about 19%).
        regroup_every: with ``"expertflow"``, regroup every this many rounds (1: each round,
            as ExpertFlow does). Requests' paths drift slowly, so a grouping stays good for a
            few rounds, and each regrouping costs KV row moves (README, "Batched generation").
        prefill_padding: prompts admitted together are prefilled in one forward call, the
            shorter ones left-padded, in groups of similar length whose padding adds at most
            this share of their real tokens (padded positions cost as much as real ones);
            0: only prompts of equal length share a call.
        predictor: predicts the routing paths the scheduler groups by; default: the offloaded
            model's predictor, or else each request's previous routing.
        eos_token_id: ends a request; default: the model's ``generation_config``.
        do_sample: sample instead of taking the most likely token; ``temperature`` divides the
            logits, ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set whose
            probability reaches p. Request i samples from a generator seeded ``seed + i``.

    Returns:
        A :class:`BatchGeneration`. Its ``stats``: ``seconds``, ``tokens_per_second`` (all new
        tokens over all time), ``prefill_seconds``, ``prefill_tokens`` (positions prefilled,
        padding included), ``decode_seconds``, ``schedule_seconds``
        (predictions, splits and KV moves), ``decode_steps``, ``decode_tokens``,
        ``distinct_experts_per_layer`` (mean over decode steps of the distinct experts a step
        ran per MoE layer), ``kv_rows_moved``, ``regroups`` and, for an offloaded model, the
        cache's counters over the call (``hits``, ``misses``, ``prefetches``,
        ``bytes_copied``, ...). If every request fails, the first error is raised.
    """
    for name, value, least in (
        ("max_new_tokens", max_new_tokens, 1),
        ("batch_size", batch_size, 1),
        ("active_batches", active_batches, 1),
        ("regroup_every", regroup_every, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"generate_batch: {name} must be an int >= {least}, got {value!r}")
    if not isinstance(prefill_padding, (int, float)) or not 0 <= prefill_padding < math.inf:
        raise ValueError(
            f"generate_batch: prefill_padding must be a finite number >= 0, got {prefill_padding!r}"
        )
    sampling = _Sampling(bool(do_sample), temperature, top_k, top_p, seed)
    sampling.check()
    if schedule not in SCHEDULES:
        raise ValueError(f"generate_batch: schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "expertflow" and active_batches < 2:
        raise ValueError(
            "generate_batch: schedule='expertflow' regroups batches and needs "
            f"active_batches >= 2, got {active_batches}"
        )
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    requests = [
        _Request(i, ids)
        for i, ids in enumerate(_prompt_ids(prompts, getattr(config, "vocab_size", None), context))
    ]
    state = getattr(model, "_expertflow", None)
    if predictor is None and state is not None and state.prefetcher is not None:
        predictor = state.prefetcher.predictor
    elif predictor is not None and not isinstance(predictor, Predictor):
        from expertflow.prediction import load_predictor

        predictor = load_predictor(predictor)
    cache = state.cache if state is not None else None
    before = cache.stats() if cache is not None else None
    started = time.perf_counter()
    with torch.no_grad(), _RoutingTap(model) as tap:
        if predictor is not None and (predictor.num_layers, predictor.num_experts) != (
            len(tap.modules),
            tap.modules[0].num_experts,
        ):
            raise ValueError(
                f"generate_batch: predictor is for {predictor.num_layers} layers x "
                f"{predictor.num_experts} experts, the model has {len(tap.modules)} MoE layers "
                f"x {tap.modules[0].num_experts} experts"
            )
        run = _Generator(
            model,
            requests,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            schedule=schedule,
            active_batches=active_batches,
            regroup_every=regroup_every,
            prefill_padding=float(prefill_padding),
            predictor=predictor,
            eos=_eos_ids(model, eos_token_id),
            context=context,
            tap=tap,
            sampling=sampling,
        )
        try:
            run.run()
        finally:
            if run.prefetcher is not None:
                run.prefetcher.reset()
    seconds = time.perf_counter() - started
    if len(run.errors) == len(requests):
        raise run.errors[min(run.errors)]
    generated = sum(len(r.generated) for r in requests)
    stats = {
        "seconds": seconds,
        "tokens_per_second": generated / seconds if seconds else None,
        **run.stats,
        "distinct_experts_per_layer": run.distinct_experts_per_layer(),
    }
    if cache is not None:
        after = cache.stats()
        stats["cache"] = {k: after[k] - before[k] for k in after}
    return BatchGeneration(
        sequences=[r.generated for r in requests],
        finish_reasons=[run.finish[r.index] for r in requests],
        errors=run.errors,
        stats=stats,
    )
