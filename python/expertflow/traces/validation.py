"""What a :class:`~expertflow.traces.format.Trace` must satisfy, checked when one is built.

Every tool reads a trace's arrays as indices (into ``[L, E]`` tables, a sequence's source
label, a predictor's vocabulary), so a value out of range is either a crash deep inside a tool
or, worse, a silently wrong figure (a negative sequence id counted under the last source).
Each check raises :class:`TraceError` naming the field, what it must be and what it holds.

Sizes are capped before any tool allocates by them: a few bytes of JSON can otherwise ask for
``[L, num_experts]`` tables of gigabytes (``num_experts = 1e9`` in a 12 KB file).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "MAX_EXPERTS",
    "MAX_VOCAB",
    "TraceError",
    "check_arrays",
    "check_int_array",
    "check_meta",
]

# Routed experts per layer: released MoE models have at most 512 (Qwen3-Next; DeepSeek-V3 256,
# Kimi K2 384), so 2**16 leaves 128x headroom while keeping the tools' per-expert tables
# ([L, E] policy state, [T, L, E] scores) proportional to a real model, not to a typo.
MAX_EXPERTS = 2**16
# Routed experts of all layers together (num_layers x num_experts): the largest released
# models have under 50k (Qwen3-235B: 94 x 128; DeepSeek-V3: 58 x 256); 2**20 is 20x that.
# Every tool keeps state per (layer, expert), and a compressed file of a few KB can hold an
# expert_ids array of 10,000 layers.
MAX_LAYER_EXPERTS = 2**20
# Token ids: the largest tokenizers have about 262k entries (Gemma 3); 2**20 is 4x that and
# keeps the path predictor's embedding table (vocab x d_model) within a few hundred MB.
MAX_VOCAB = 2**20

_REQUIRED_META = {"model": str, "num_experts": int, "top_k": int, "expert_bytes": int}


class TraceError(ValueError):
    """A trace file or array that does not follow the format; the message names the field."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _value_range(values: np.ndarray) -> str:
    return f"[{values.min()}, {values.max()}]" if values.size else "[] (empty)"


def check_int_array(name: str, value: np.ndarray, ndim: int) -> None:
    if not isinstance(value, np.ndarray) or value.ndim != ndim:
        shape = getattr(value, "shape", type(value).__name__)
        raise TraceError(f"{name} must be a {ndim}-D integer array, got {shape}")
    if not np.issubdtype(value.dtype, np.integer):
        raise TraceError(f"{name} must hold integers, got dtype {value.dtype}")


def _check_range(name: str, values: np.ndarray, low: int, high: int, high_name: str) -> None:
    """Refuses a value of ``values`` outside ``[low, high)``."""
    if values.size and (values.min() < low or values.max() >= high):
        raise TraceError(
            f"{name} must be in [{low}, {high_name}={high}), got values in {_value_range(values)}"
        )


def check_shape(expert_ids: np.ndarray, experts: int) -> None:
    """At least one layer and one expert per token and layer (an empty trace, T = 0, is
    valid: a source filter can leave nothing), and not more (layer, expert) pairs than
    :data:`MAX_LAYER_EXPERTS`."""
    _, layers, k = expert_ids.shape
    if layers < 1 or k < 1:
        raise TraceError(
            f"expert_ids must be [T, L, K] with L >= 1 layers and K >= 1 experts per token, "
            f"got shape {expert_ids.shape}"
        )
    if layers * experts > MAX_LAYER_EXPERTS:
        raise TraceError(
            f"num_layers x meta.num_experts must be at most {MAX_LAYER_EXPERTS}, got "
            f"{layers} x {experts} = {layers * experts} (expert_ids has shape {expert_ids.shape})"
        )


def check_meta(meta: dict[str, Any], top_k: int) -> None:
    """The required keys with their types and ranges, and the optional ``vocab_size``."""
    if not isinstance(meta, dict):
        raise TraceError(f"meta must be a JSON object, got {type(meta).__name__}")
    for key, kind in _REQUIRED_META.items():
        if key not in meta:
            raise TraceError(f"meta.{key} is missing (required: {sorted(_REQUIRED_META)})")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise TraceError(f"meta.{key} must be {kind.__name__}, got {type(meta[key]).__name__}")
    experts = meta["num_experts"]
    if not 1 <= experts <= MAX_EXPERTS:
        raise TraceError(
            f"meta.num_experts must be in [1, {MAX_EXPERTS}] (experts per layer), got {experts}"
        )
    if meta["top_k"] != top_k:
        raise TraceError(f"meta.top_k={meta['top_k']} but expert_ids has K={top_k}")
    if meta["top_k"] > experts:
        raise TraceError(f"meta.top_k={meta['top_k']} exceeds meta.num_experts={experts}")
    if meta["expert_bytes"] < 0:
        raise TraceError(f"meta.expert_bytes must be >= 0, got {meta['expert_bytes']}")
    vocab = meta.get("vocab_size")
    # 0: not known (recording writes it when the model's config has none).
    if vocab is not None and (not _is_int(vocab) or not 0 <= vocab <= MAX_VOCAB):
        raise TraceError(
            f"meta.vocab_size must be an integer in [0, {MAX_VOCAB}] (0: unknown), got {vocab!r}"
        )


def check_arrays(trace) -> None:
    """Shapes, dtypes and value ranges of the arrays, against each other and ``meta``."""
    tokens, experts = trace.expert_ids.shape[0], trace.meta["num_experts"]
    _check_range("expert_ids", trace.expert_ids, -1, experts, "num_experts")
    if trace.gate_probs is not None:
        if trace.gate_probs.shape != trace.expert_ids.shape:
            raise TraceError(
                f"gate_probs must have expert_ids' shape {trace.expert_ids.shape}, "
                f"got {trace.gate_probs.shape}"
            )
        if not np.issubdtype(trace.gate_probs.dtype, np.floating):
            raise TraceError(f"gate_probs must be floating point, got {trace.gate_probs.dtype}")
    if trace.lookahead_ids is not None:
        check_int_array("lookahead_ids", trace.lookahead_ids, 3)
        if trace.lookahead_ids.shape != trace.expert_ids.shape:
            raise TraceError(
                f"lookahead_ids must have expert_ids' shape {trace.expert_ids.shape}, "
                f"got {trace.lookahead_ids.shape}"
            )
        _check_range("lookahead_ids", trace.lookahead_ids, -1, experts, "num_experts")
    for name in ("token_ids", "sequence_ids"):
        value = getattr(trace, name)
        if value is not None:
            check_int_array(name, value, 1)
            if value.shape[0] != tokens:
                raise TraceError(f"{name} must have T={tokens} entries, got {value.shape[0]}")
    if trace.token_ids is not None:
        vocab = trace.meta.get("vocab_size") or MAX_VOCAB
        name = "meta.vocab_size" if trace.meta.get("vocab_size") else "the largest vocabulary"
        _check_range("token_ids", trace.token_ids, 0, vocab, name)
    _check_prefill(trace.meta.get("prefill"), tokens)
    _check_sequences(trace.sequence_ids, trace.meta.get("sequence_sources"), tokens)


def _check_prefill(prefill: Any, tokens: int) -> None:
    if prefill is None:
        return
    if not isinstance(prefill, list) or len(prefill) != tokens:
        raise TraceError(f"meta.prefill must be a list of T={tokens} bools")
    # A JSON string such as "no" is truthy: read as a bool it would mark a generated token
    # as prompt. Only true/false say what they mean.
    bad = next((i for i, v in enumerate(prefill) if not isinstance(v, bool | np.bool_)), None)
    if bad is not None:
        raise TraceError(
            f"meta.prefill must be a list of T={tokens} bools (true/false), got "
            f"{prefill[bad]!r} at index {bad}"
        )


def _check_sequences(sequence_ids: np.ndarray | None, sources: Any, tokens: int) -> None:
    """Sequence ids are >= 0 and, with ``meta.sequence_sources``, index into it: one string
    label per sequence id (a negative id would pick the last label from the end)."""
    if sequence_ids is not None and sequence_ids.size and sequence_ids.min() < 0:
        raise TraceError(f"sequence_ids must be >= 0, got values in {_value_range(sequence_ids)}")
    if sources is None:
        return
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise TraceError("meta.sequence_sources must be a list of strings (one label per sequence)")
    if sequence_ids is None:
        needed = 1 if tokens else 0  # every token is sequence 0's
    else:
        needed = int(sequence_ids.max()) + 1 if sequence_ids.size else 0
    if len(sources) < needed:
        raise TraceError(
            f"meta.sequence_sources must label every sequence id: sequence_ids reach "
            f"{needed - 1}, so it needs at least {needed} labels, got {len(sources)}"
        )
