"""A batch's KV rows: each request's keys/values per attention layer, left-padded to a common
length, and the in-place moves that regroup requests between batches with their rows.

A regrouping keeps every batch's size (:func:`_regroup_moves`), so each moving request takes a
slot that another one leaves; :func:`_exchange_rows` then copies only the moving rows."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from expertflow.serving.requests import _Request


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
