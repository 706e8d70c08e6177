"""Recording the routing of a real model into a :class:`~expertflow.traces.format.Trace`.

The recorder hooks the same modules :func:`expertflow.offload` replaces (transformers' experts
modules, or the :class:`~expertflow.OffloadedExperts` standing in for them): each receives
``(hidden_states, top_k_index, top_k_weights)`` from its family's router, so one hook serves
every supported family, offloaded or not.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from expertflow.runtime.experts import expert_tensors
from expertflow.runtime.offloaded import OffloadedExperts
from expertflow.runtime.routing import (
    RoutedCall,
    hook_routed_calls,
    routed_modules,
    routers_beside,
)
from expertflow.traces.format import Trace

__all__ = ["RoutingRecorder", "record_routing"]


def _expert_bytes(module: nn.Module) -> int:
    if isinstance(module, OffloadedExperts):
        tensors = module.cache.host_expert(module.layer, 0)
    else:
        tensors = expert_tensors(module, 0)
    return sum(t.numel() * t.element_size() for t in tensors)


class RoutingRecorder:
    """Context manager recording, for every forward call of the model, each MoE layer's
    ``top_k_index`` and ``top_k_weights`` (moved to the host).

    ``calls()`` returns one ``(expert_ids [rows, L, K], gate_probs [rows, L, K])`` per forward.
    """

    def __init__(self, model: nn.Module, lookahead: bool = False):
        self.modules = routed_modules(model)
        if not self.modules:
            raise ValueError(
                f"recording: {type(model).__name__} has no MoE experts module that expertflow "
                "supports (transformers' use_experts_implementation experts, or OffloadedExperts)"
            )
        self._records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.modules]
        self._lookahead: list[list[torch.Tensor]] = [[] for _ in self.modules]
        self._routers = routers_beside(model, self.modules) if lookahead else None
        self._handles = []

    def _on_call(self, layer: int, call: RoutedCall) -> None:
        index, weights = call.top_k_index, call.top_k_weights
        self._records[layer].append((index.detach().cpu(), weights.detach().float().cpu()))
        if self._routers is not None and layer + 1 < len(self._routers):
            hidden = call.hidden_states
            with torch.no_grad():
                _, _, ahead = self._routers[layer + 1](hidden.reshape(-1, hidden.shape[-1]))
            self._lookahead[layer + 1].append(ahead.detach().cpu())

    def __enter__(self) -> RoutingRecorder:
        # Another thread's forward on the same model is not this recording's.
        self._handles = hook_routed_calls(self.modules, self._on_call, only_this_thread=True)
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        for records in (*self._records, *self._lookahead):
            records.clear()

    def calls(self) -> list[tuple[np.ndarray, np.ndarray]]:
        counts = {len(r) for r in self._records}
        if len(counts) != 1:
            raise RuntimeError(f"recording: layers saw different numbers of calls {counts}")
        out = []
        for call, per_layer in enumerate(zip(*self._records, strict=True)):
            ids = torch.stack([index for index, _ in per_layer], dim=1).numpy()
            probs = torch.stack([w for _, w in per_layer], dim=1).numpy()
            out.append((ids, probs))
            if self._routers is not None:
                ahead = np.full_like(ids, -1)
                for layer in range(1, ids.shape[1]):
                    ahead[:, layer] = self._lookahead[layer][call].numpy()
                out[-1] = (ids, probs, ahead)
        return out


def _model_meta(model: nn.Module, modules: list[nn.Module]) -> dict:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or type(model).__name__
    return {
        "model": str(name),
        "family": getattr(config, "model_type", type(model).__name__),
        "num_experts": int(modules[0].num_experts),
        "expert_bytes": int(_expert_bytes(modules[0])),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
    }


def _left_padded(batch: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` [B, width] of prompts left-padded to the longest."""
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for b, p in enumerate(batch):
        input_ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return input_ids, mask


class _TraceRows:
    """The trace's rows as recorded batches add them: routing, token and sequence ids."""

    def __init__(self, lookahead: bool):
        self.ids, self.probs, self.ahead, self.tokens, self.seqs = [], [], [], [], []
        self.prefill: list[bool] = []
        self.lookahead = lookahead

    def _add(self, call, rows, tokens, seq: int, prefill: bool) -> None:
        self.ids.append(call[0][rows])
        self.probs.append(call[1][rows])
        if self.lookahead:
            self.ahead.append(call[2][rows])
        self.tokens.append(np.asarray(tokens))
        self.seqs.append(np.full(len(tokens), seq))
        self.prefill += [prefill] * len(tokens)

    def add_batch(self, batch, first_seq: int, calls, out, eos_token_id) -> None:
        """One batch's prompts (``calls[0]``, left-padded) and their generated tokens (one call
        each after it), a sequence's tokens ending after its first ``eos_token_id``."""
        width = max(len(p) for p in batch)
        prompt = [c.reshape(len(batch), width, *c.shape[1:]) for c in calls[0]]
        for b, p in enumerate(batch):
            self._add(prompt, (b, slice(width - len(p), None)), p, first_seq + b, True)
            generated = out[b, width:].tolist()
            for j in range(1, len(calls)):
                if eos_token_id is not None and eos_token_id in generated[: j - 1]:
                    break
                self._add(calls[j], slice(b, b + 1), [generated[j - 1]], first_seq + b, False)

    def trace(self, meta: dict) -> Trace:
        return Trace(
            expert_ids=np.concatenate(self.ids).astype(np.int16),
            gate_probs=np.concatenate(self.probs).astype(np.float16),
            token_ids=np.concatenate(self.tokens).astype(np.int32),
            sequence_ids=np.concatenate(self.seqs).astype(np.int32),
            lookahead_ids=np.concatenate(self.ahead).astype(np.int16) if self.lookahead else None,
            meta=meta,
        )


def _run_batch(model, recorder, batch, generate, pad_token_id, eos_token_id):
    """Runs one batch (prompt forward, then greedy generation) and returns its recorded calls
    and the output ids [B, width + new tokens]."""
    device = next(model.parameters()).device
    input_ids, mask = _left_padded(batch, pad_token_id)
    recorder.clear()
    if generate:
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=generate,
            min_new_tokens=generate if eos_token_id is None else 0,
            do_sample=False,
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
        ).cpu()
    else:
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        out = input_ids
    calls = recorder.calls()
    expected = 1 + (out.shape[1] - input_ids.shape[1] - 1 if generate else 0)
    if len(calls) != expected:
        raise RuntimeError(
            f"recording: expected {expected} forward calls for this batch, saw "
            f"{len(calls)} (does the model generate in an unusual way?)"
        )
    return calls, out


def _check_record_arguments(prompts, generate, batch_size, sources) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if generate < 0:
        raise ValueError(f"generate must be >= 0, got {generate}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token id lists")
    if sources is not None and len(sources) != len(prompts):
        raise ValueError(f"sources must have one label per prompt ({len(prompts)})")


@torch.no_grad()
def record_routing(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    generate: int = 0,
    batch_size: int = 8,
    pad_token_id: int = 0,
    eos_token_id: int | None = None,
    sources: Sequence[str] | None = None,
    progress: Callable | None = None,
    lookahead: bool = False,
) -> Trace:
    """Runs ``prompts`` (lists of token ids) through ``model`` and records their routing.

    Prompts run ``batch_size`` at a time, left-padded (padding is not recorded). With
    ``generate=N`` each prompt is continued greedily by N tokens with ``model.generate``; the
    trace then holds the prompt tokens (``meta.prefill`` true) and every generated token the
    model processed (the N-1 fed back; the last one is never an input). A sequence stops being
    recorded after it produced ``eos_token_id``.

    Args:
        sources: optional label per prompt (e.g. its corpus domain), kept in
            ``meta.sequence_sources``.
        progress: optional ``progress(done, total)`` called after every batch.
        lookahead: also record ``lookahead_ids``: each layer's router applied to the previous
            layer's hidden states (what gate lookahead would prefetch).
    """
    _check_record_arguments(prompts, generate, batch_size, sources)
    rows = _TraceRows(lookahead)
    recorder = RoutingRecorder(model, lookahead=lookahead)
    with recorder:
        for start in range(0, len(prompts), batch_size):
            batch = [list(map(int, p)) for p in prompts[start : start + batch_size]]
            calls, out = _run_batch(model, recorder, batch, generate, pad_token_id, eos_token_id)
            rows.add_batch(batch, start, calls, out, eos_token_id)
            if progress is not None:
                progress(min(start + batch_size, len(prompts)), len(prompts))
    meta = _model_meta(model, recorder.modules)
    meta.update(top_k=int(rows.ids[0].shape[-1]), prefill=rows.prefill, generate=generate)
    if sources is not None:
        meta["sequence_sources"] = [str(s) for s in sources]
    json.dumps(meta)  # fails here, not at save time, if a label is not serialisable
    return rows.trace(meta)
