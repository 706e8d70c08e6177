"""What ``offload`` keeps on a model: the typed state behind ``model._expertflow``."""

from __future__ import annotations

import dataclasses
import threading

from torch import nn

from expertflow.runtime.cache import ExpertCache

__all__ = ["OffloadState", "offload_state"]


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
        lock: held by a thread for each whole forward call of the model (re-entrant). The
            cache pins a layer's slots per call and the prefetcher keeps per-call state, so
            calls from several threads run one after another, never interleaved.
    """

    cache: ExpertCache
    originals: list[tuple[str, str, nn.Module]]
    pool_size: int
    top_k: int
    prefetcher: object = None
    lock: threading.RLock = dataclasses.field(default_factory=threading.RLock, repr=False)


def offload_state(model: nn.Module, caller: str) -> OffloadState:
    """The state ``offload`` left on ``model``; ``caller`` names the refusing function."""
    state = getattr(model, "_expertflow", None)
    if not isinstance(state, OffloadState):
        raise ValueError(f"{caller}: this model was not offloaded by expertflow.offload()")
    return state
