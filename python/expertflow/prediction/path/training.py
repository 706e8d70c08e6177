"""Training the path network: windows of ids with their routing, the next-step loss over the
whole network, then the reuse head alone on the frozen network's features."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from expertflow.prediction._checks import checked_int, checked_rate
from expertflow.prediction.base import REUSE_HORIZONS, multi_hot, uses_within
from expertflow.prediction.path.net import PathNet

__all__ = [
    "checked_schedule",
    "previous_routing",
    "reuse_training_set",
    "train_paths",
    "train_reuse",
    "windows",
]


def checked_schedule(traces, epochs, batch_size, lr, **more_epochs) -> tuple[int, int, float]:
    """A training's options checked before any work, each refused with a ValueError naming it:
    ``epochs`` (and any ``more_epochs``) >= 0, ``batch_size`` >= 1 (0 divided by zero deep in
    the step count), ``lr`` finite and > 0; and traces that hold at least one token."""
    for name, value in more_epochs.items():
        checked_int(name, value, 0)
    if not isinstance(traces, list | tuple) or not sum(t.num_tokens for t in traces):
        raise ValueError("traces must be a non-empty list of traces holding at least one token")
    return (
        checked_int("epochs", epochs, 0),
        checked_int("batch_size", batch_size, 1),
        checked_rate("lr", lr),
    )


def previous_routing(hot: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``hot [T, L, E]`` and one sequence's ``rows`` -> ``[len(rows), L * E]``: for each row,
    the routing of the row before it (zeros for the sequence's first token)."""
    flat = hot[rows].reshape(len(rows), -1)
    return np.concatenate([np.zeros_like(flat[:1]), flat[:-1]])


def windows(traces, context: int, num_experts: int):
    """Training windows ``(ids [N, C], previous [N, C, L * E], targets [N, C, L, E],
    valid [N, C])``: every sequence cut into consecutive windows of ``context`` tokens, the
    last one padded. The traces must have ``token_ids`` (checked by the caller)."""
    ids, previous, targets, valid = [], [], [], []
    c = context
    for trace in traces:
        hot = multi_hot(trace.expert_ids, num_experts)
        for rows in trace.sequence_rows():
            before = previous_routing(hot, rows)
            for start in range(0, len(rows), c):
                r = rows[start : start + c]
                pad = c - len(r)
                ids.append(np.pad(trace.token_ids[r], (0, pad)))
                previous.append(np.pad(before[start : start + c], ((0, pad), (0, 0))))
                targets.append(np.pad(hot[r], ((0, pad), (0, 0), (0, 0))))
                valid.append(np.arange(c) < len(r))
    return (
        torch.from_numpy(np.stack(ids).astype(np.int64)),
        torch.from_numpy(np.stack(previous)),
        torch.from_numpy(np.stack(targets)),
        torch.from_numpy(np.stack(valid)),
    )


def _run_epochs(
    optim, sched, count: int, batch_size: int, epochs: int, batch_loss, on_epoch
) -> None:
    """The loop both trainings share: ``epochs`` passes over ``count`` examples in a seeded
    random order, ``batch_loss(indices)`` a scalar loss per batch; ``on_epoch(epoch, mean
    loss, seconds since the start)`` after each pass."""
    gen = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(count, generator=gen)
        total = 0.0
        for i in range(0, count, batch_size):
            b = order[i : i + batch_size]
            loss = batch_loss(b)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            total += loss.item() * len(b)
        on_epoch(epoch, total / max(1, count), round(time.perf_counter() - started, 1))


def train_paths(
    net: PathNet,
    data,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    history: list[dict],
    log: Callable[[str], None] | None,
) -> None:
    """Trains the whole network on :func:`windows`' ``data`` with binary cross-entropy on the
    multi-hot routing (padding masked out); appends one entry per epoch to ``history``."""
    ids, previous, targets, valid = data
    if not epochs:
        return  # OneCycleLR refuses a schedule of 0 steps
    optim = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * math.ceil(len(ids) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps, pct_start=0.1)

    def batch_loss(b):
        logits = net(ids[b], previous[b])
        loss = F.binary_cross_entropy_with_logits(logits, targets[b], reduction="none")
        loss = loss.mean(dim=(2, 3))
        return (loss * valid[b]).sum() / valid[b].sum()

    def on_epoch(epoch, loss, seconds):
        history.append({"epoch": epoch + 1, "loss": loss, "seconds": seconds})
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}  bce {loss:.4f}  {seconds:.0f} s")

    net.train()
    _run_epochs(optim, sched, len(ids), batch_size, epochs, batch_loss, on_epoch)
    net.eval()


def reuse_training_set(net: PathNet, traces, context: int, num_experts: int):
    """The network's head inputs ``[N, d]`` for every token of the traces (in windows, as
    training sees them) and, as uint8 ``[N, H, L * E]``, whether each (layer, expert) is
    used within each of :data:`REUSE_HORIZONS` tokens after it, in the same sequence."""
    ids, previous, _, valid = windows(traces, context, num_experts)
    fused = []
    with torch.no_grad():
        for i in range(0, len(ids), 256):
            x = net.head_input(net.features(ids[i : i + 256]), previous[i : i + 256])
            fused.append(x[valid[i : i + 256]])
    targets = []
    for trace in traces:
        hot = multi_hot(trace.expert_ids, num_experts).reshape(trace.num_tokens, -1)
        for rows in trace.sequence_rows():
            targets.append(uses_within(hot[rows].astype(np.uint8), REUSE_HORIZONS))
    return torch.cat(fused), torch.from_numpy(np.concatenate(targets))


def train_reuse(
    net: PathNet,
    features: torch.Tensor,
    targets: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    history: list[dict],
    log: Callable[[str], None] | None,
) -> None:
    """Trains the reuse head alone on :func:`reuse_training_set`'s ``features`` and
    ``targets`` with binary cross-entropy; appends one entry per epoch to ``history``."""
    if not epochs:
        return
    optim = torch.optim.AdamW(net.reuse.parameters(), lr=lr, weight_decay=0.01)
    steps = max(1, epochs * math.ceil(len(features) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps)

    def batch_loss(b):
        logits = net.reuse(features[b])
        return F.binary_cross_entropy_with_logits(logits, targets[b].flatten(1).float())

    def on_epoch(epoch, loss, seconds):
        history.append({"reuse_epoch": epoch + 1, "loss": loss, "seconds": seconds})
        if log is not None:
            log(f"reuse epoch {epoch + 1}/{epochs}  bce {loss:.4f}")

    _run_epochs(optim, sched, len(features), batch_size, epochs, batch_loss, on_epoch)
