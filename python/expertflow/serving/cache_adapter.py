"""The transformers side of the KV rows: a ``DynamicCache`` over a batch's rows for a decode
step, and the rows a prefill or a step leaves in the cache it filled."""

from __future__ import annotations

import torch

from expertflow.serving.kv_rows import _Rows
from expertflow.serving.requests import _Request


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


def _prefilled_rows(requests: list[_Request], cache, mask: torch.Tensor, padded: bool) -> _Rows:
    """The rows a prefill left in ``cache`` (``mask`` ``[B, S]``, 1 on real positions).

    Padding positions' keys/values are zeroed: masked, but whatever a padding position computed
    (a query that sees no key) must not reach a later step."""
    keep = mask[:, None, :, None].to(cache.layers[0].keys.dtype) if padded else None
    return _Rows(
        requests,
        [layer.keys if keep is None else layer.keys * keep for layer in cache.layers],
        [layer.values if keep is None else layer.values * keep for layer in cache.layers],
        mask,
    )


def _stepped_rows(rows: _Rows, cache, mask: torch.Tensor) -> _Rows:
    """The rows a decode step over ``rows`` left in ``cache``: one column longer, ``mask``
    ``[B, S + 1]``."""
    return _Rows(
        rows.requests,
        [layer.keys for layer in cache.layers],
        [layer.values for layer in cache.layers],
        mask,
    )
