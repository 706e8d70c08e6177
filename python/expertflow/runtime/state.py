"""What ``offload`` keeps on a model: the typed state behind ``model._expertflow``."""

from __future__ import annotations

import dataclasses
import threading

from torch import nn

from expertflow.runtime.cache import ExpertCache

__all__ = ["OffloadState", "lock_each_forward", "offload_state"]


@dataclasses.dataclass
class OffloadState:
    """An offloaded model's runtime state.

    Attributes:
        cache: the expert cache every offloaded layer reads.
        originals: ``(parent name, attribute, original experts module)`` per MoE layer, in layer
            order; the originals view the host store and come back with ``restore``.
        prefetcher: the :class:`~expertflow.runtime.prefetch.PredictivePrefetcher`, if any.
        pool_size: experts one layer can hold at once (its pool of slots).
        top_k: experts per token and layer.
        lock: held by a thread for each whole forward call of the model (re-entrant,
            :func:`lock_each_forward`). The cache pins a layer's slots per call and the
            prefetcher keeps per-call state, so calls from several threads run one after
            another, never interleaved.
        lock_hooks: the model's hooks that take and give back ``lock``.
        packings: per MoE layer, how its experts are packed in the store
            (:class:`~expertflow.runtime.expert_format.ExpertPacking`).
    """

    cache: ExpertCache
    originals: list[tuple[str, str, nn.Module]]
    pool_size: int
    top_k: int
    prefetcher: object = None
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)
    lock_hooks: list = dataclasses.field(default_factory=list, repr=False)
    packings: list = dataclasses.field(default_factory=list, repr=False)

    @property
    def expert_format(self) -> str:
        """The experts' format in the store: ``"float"`` or a quantized format's name."""
        names = sorted({p.format_name for p in self.packings}) or ["float"]
        return ", ".join(names)


def offload_state(model: nn.Module, caller: str) -> OffloadState:
    """The state ``offload`` left on ``model``; ``caller`` names the refusing function."""
    state = getattr(model, "_expertflow", None)
    if not isinstance(state, OffloadState):
        raise ValueError(f"{caller}: this model was not offloaded by expertflow.offload()")
    return state


def lock_each_forward(model: nn.Module, lock: threading.RLock) -> list:
    """Hooks that make each forward call of ``model`` hold ``lock`` from before its first
    forward pre-hook to after its forward hooks; returns the hook handles.

    The release hook is ``always_call``: a forward that raises still releases. It releases
    only what this thread's pre-hook took, so that a pre-hook failing before it cannot make
    it release a lock the thread does not hold."""
    taken = threading.local()  # this thread's acquisitions by the pre-hook, not yet released

    def acquire(module, args, kwargs) -> None:
        lock.acquire()
        taken.count = getattr(taken, "count", 0) + 1

    def release(module, args, kwargs, output) -> None:
        if getattr(taken, "count", 0):
            taken.count -= 1
            lock.release()

    return [
        # First of the pre-hooks: the prefetcher's pre-hook must run under the lock.
        model.register_forward_pre_hook(acquire, with_kwargs=True, prepend=True),
        model.register_forward_hook(release, with_kwargs=True, always_call=True),
    ]
