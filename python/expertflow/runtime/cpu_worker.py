"""Running a layer's CPU experts beside its device work (``offload(cpu_experts=...)``).

The CPU experts of a layer call start on one worker thread before the device experts of the
same call, so that the CPU computes while the device computes the cached experts and the copies
of the others arrive (``ops.cpu_expert`` releases the GIL). Rows are returned, not written: the
caller writes them once both sides are done, so the outputs do not depend on the timing."""

from __future__ import annotations

import concurrent.futures
import os
import threading

import torch

__all__ = ["CpuExpertJob"]

_worker: concurrent.futures.ThreadPoolExecutor | None = None
_worker_lock = threading.Lock()


def _forget_worker_after_fork() -> None:
    # A forked child inherits the executor but not its thread: submitting to it would wait
    # forever. The child starts its own worker when it first needs one.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_worker_after_fork)


def _cpu_worker() -> concurrent.futures.ThreadPoolExecutor:
    """One process-wide worker: a model's forward lock already serialises its layers, and
    two models computing experts at once would only share the same cores."""
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="expertflow-cpu-experts"
            )
        return _worker


class CpuExpertJob:
    """The experts ``experts`` of one OffloadedExperts call, computed on the CPU from the host
    store: started at construction (on the worker, or at once with ``inline``, when the call
    has no device work to overlap), their output rows given by :meth:`result`."""

    def __init__(self, module, hidden_states, tokens, bounds, experts, inline: bool):
        self._rows: list[torch.Tensor] = []
        self._future = None
        if not experts:
            return
        # Gathered here, on the caller's thread: one transfer of every CPU token's activations.
        pieces = [tokens[bounds[e] : bounds[e + 1]] for e in experts]
        xs = hidden_states[torch.cat(pieces)].to("cpu").split([p.numel() for p in pieces])
        stores = [module.cache.host_expert(module.layer, e) for e in experts]
        work = (module._cpu, module.packing, xs, stores)
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        if inline:
            self._rows = self._compute(*work)
        else:
            self._future = _cpu_worker().submit(self._compute_in, modes, *work)

    @staticmethod
    def _compute(spec, packing, xs, stores) -> list[torch.Tensor]:
        return [spec.run(x, store, packing) for x, store in zip(xs, stores, strict=True)]

    @classmethod
    def _compute_in(cls, modes, *work) -> list[torch.Tensor]:
        # Autograd's modes are per thread: the worker takes the caller's.
        inference, grad = modes
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return cls._compute(*work)

    def result(self) -> list[torch.Tensor]:
        """The experts' output rows (CPU tensors) in order; waits for the worker, and raises
        what the CPU side raised."""
        if self._future is not None:
            self._rows, self._future = self._future.result(), None
        return self._rows

    def wait_quietly(self) -> None:
        """Waits for the worker without raising (the caller is already raising)."""
        if self._future is not None:
            concurrent.futures.wait([self._future])
