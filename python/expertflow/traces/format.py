"""Routing traces: the ``.npz`` format every expertflow tool reads and writes.

A trace records which experts a real model's routers chose, token by token:

=================  ================  ==========================================================
field              dtype, shape      meaning
=================  ================  ==========================================================
``expert_ids``     int ``[T, L, K]``  experts of token t at MoE layer l; -1 = not recorded
``gate_probs``     float ``[T,L,K]``  optional: the router weights of those experts
``lookahead_ids``  int ``[T, L, K]``  optional: layer l's experts as layer l's router picks them
                                      from layer l-1's hidden states (gate lookahead); -1 at
                                      layer 0
``token_ids``      int ``[T]``        optional: the token ids
``sequence_ids``   int ``[T]``        optional: which sequence each token belongs to (>= 0; the
                                      index of its ``sequence_sources`` label); the tokens of one
                                      sequence appear in time order (default: one sequence)
``meta``           JSON string        ``model`` (str), ``num_experts`` (int), ``top_k`` (int),
                                      ``expert_bytes`` (int, bytes of one expert's weights),
                                      optional ``prefill`` (list of T JSON true/false: prompt
                                      tokens), ``vocab_size`` (int, 0: unknown; token ids below it),
                                      ``sequence_sources`` (a label per sequence id, e.g. the
                                      corpus domain), ``family`` (transformers model_type) and
                                      ``generate`` (greedy tokens per prompt when recorded)
=================  ================  ==========================================================

Limits (:mod:`~expertflow.traces.validation`, checked when a Trace is built): ids in range of
``num_experts`` (at most 2**16) and ``vocab_size``, L, K >= 1, num_layers x num_experts at
most 2**20; every refusal is a :class:`TraceError` naming the field.

Steps: a sequence's prompt (its leading prefill tokens) is one step, then each generated token is
one step. A batched trace (several sequences) runs step s of every sequence together, so one
batched step needs the union of their experts at each layer.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from expertflow.traces.validation import (
    TraceError,
    check_arrays,
    check_int_array,
    check_meta,
    check_shape,
)

__all__ = ["Trace", "TraceError", "load_trace", "save_trace"]


@dataclasses.dataclass
class Trace:
    """One routing trace; validated on construction (raises TraceError)."""

    expert_ids: np.ndarray
    meta: dict[str, Any]
    gate_probs: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    sequence_ids: np.ndarray | None = None
    lookahead_ids: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_int_array("expert_ids", self.expert_ids, 3)
        check_meta(self.meta, self.expert_ids.shape[2])
        check_shape(self.expert_ids, self.meta["num_experts"])
        check_arrays(self)

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def num_experts(self) -> int:
        return self.meta["num_experts"]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    def select_sources(self, keep) -> Trace:
        """The sub-trace of the sequences whose ``meta.sequence_sources`` label satisfies
        ``keep(label)`` (sequence ids and labels renumbered)."""
        sources = self.meta.get("sequence_sources")
        if sources is None or self.sequence_ids is None:
            raise TraceError("select_sources needs sequence_ids and meta.sequence_sources")
        kept = [s for s, label in enumerate(sources) if keep(label)]
        rows = np.flatnonzero(np.isin(self.sequence_ids, kept))
        renumber = np.full(len(sources), -1, dtype=np.int64)
        renumber[kept] = np.arange(len(kept))
        meta = dict(self.meta, sequence_sources=[sources[s] for s in kept])
        if self.meta.get("prefill") is not None:
            meta["prefill"] = [self.meta["prefill"][r] for r in rows.tolist()]

        def pick(a):
            return None if a is None else a[rows]

        return Trace(
            expert_ids=self.expert_ids[rows],
            meta=meta,
            gate_probs=pick(self.gate_probs),
            token_ids=pick(self.token_ids),
            sequence_ids=renumber[self.sequence_ids[rows]].astype(self.sequence_ids.dtype),
            lookahead_ids=pick(self.lookahead_ids),
        )

    def sequence_rows(self) -> list[np.ndarray]:
        """Token rows of each sequence, sequences in first-appearance order, rows in time
        order (one sequence when there are no sequence_ids)."""
        if self.sequence_ids is None:
            return [np.arange(self.num_tokens)]
        # One stable sort groups each sequence's rows, still in time order: O(T log T) where
        # a scan of all T rows per sequence took minutes on a 15k-sequence trace.
        order = np.argsort(self.sequence_ids, kind="stable")
        starts = np.flatnonzero(np.diff(self.sequence_ids[order])) + 1
        groups = np.split(order, starts) if len(order) else []
        return sorted(groups, key=lambda rows: rows[0])  # by each sequence's first token

    def steps(self) -> list[np.ndarray]:
        """Token indices of each step, in order (see the module docstring)."""
        sequences = self.sequence_rows()
        rows = np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.intp)
        if not len(rows):
            return []
        prefill = np.asarray(self.meta.get("prefill") or [False] * self.num_tokens, dtype=bool)
        lengths = np.array([len(s) for s in sequences])
        start = np.repeat(np.cumsum(lengths) - lengths, lengths)  # its sequence's first index
        position = np.arange(len(rows)) - start  # within its sequence
        # The prompt: a sequence's leading prefill tokens (no generated token before them).
        generated = np.cumsum(~prefill[rows])
        generated_before_start = np.r_[0, generated][start]
        in_prompt = generated == generated_before_start
        prompt_len = np.repeat(np.add.reduceat(in_prompt, np.cumsum(lengths) - lengths), lengths)
        # The prompt is step 0, then one step per generated token.
        step = np.where(in_prompt, 0, position - prompt_len + (prompt_len > 0))
        # A stable sort on the step keeps sequences in order, each one's tokens in time order.
        order = np.argsort(step, kind="stable")
        bounds = np.cumsum(np.bincount(step))[:-1]
        return np.split(rows[order], bounds)


def save_trace(trace: Trace, path: str | os.PathLike) -> None:
    """Writes ``trace`` to ``path`` atomically: an interrupted write leaves no partial file."""
    path = Path(path)
    arrays = {"expert_ids": trace.expert_ids, "meta": np.array(json.dumps(trace.meta))}
    for name in ("gate_probs", "token_ids", "sequence_ids", "lookahead_ids"):
        if getattr(trace, name) is not None:
            arrays[name] = getattr(trace, name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_trace(path: str | os.PathLike) -> Trace:
    """Reads and validates a trace file; raises TraceError naming what is wrong."""
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                fields = {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as exc:
        raise TraceError(f"{path}: not a readable .npz trace ({exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):  # a plain .npy: one bare array
        raise TraceError(
            f"{path}: a trace is an .npz archive of named arrays (expert_ids, meta, ...), "
            f"got one bare {type(data).__name__} (a .npy file?)"
        )
    if "expert_ids" not in fields or "meta" not in fields:
        raise TraceError(f"{path}: a trace needs 'expert_ids' and 'meta', found {sorted(fields)}")
    try:
        meta = json.loads(str(fields.pop("meta")))
    except json.JSONDecodeError as exc:
        raise TraceError(f"{path}: meta is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise TraceError(f"{path}: meta must be a JSON object")
    known = {"expert_ids", "gate_probs", "token_ids", "sequence_ids", "lookahead_ids"}
    try:
        return Trace(meta=meta, **{k: v for k, v in fields.items() if k in known})
    except TraceError as exc:
        raise TraceError(f"{path}: {exc}") from exc  # which file, when several are read
