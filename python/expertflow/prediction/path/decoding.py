"""The path predictor's decode step: each row's window of ids runs on the keys/values cached
for the window one id shorter, so a step costs one token per row, through the native decoder
(``csrc/core/path_decoder``, the default) or the torch network op by op (its reference)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from expertflow.prediction._checks import check_token_ids
from expertflow.prediction.base import REUSE_HORIZONS, multi_hot
from expertflow.prediction.path.net import PathNet

__all__ = ["StepDecoder", "WindowCache", "native_decoder", "window_start"]


def window_start(index: int, context: int) -> int:
    """Where the window that scores token ``index`` of a sequence starts: windows of
    ``context`` ids overlapping by half, as whole-trace scoring cuts them, so every token sees
    at least ``context / 2`` ids before it and a step scores like the trace."""
    if index < context:
        return 0
    step = context - context // 2
    return ((index - context) // step + 1) * step


class WindowCache:
    """Windows' keys/values, least recently used first, keyed by the window's ids (whatever
    sequence or batch row they belong to). ``capacity`` windows at most: every active request
    of a batched run, at up to 330 KB each for the bundled size (a full window of 64 ids x 4
    layers x keys and values x 160 floats)."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._kv: OrderedDict[bytes, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kv)

    def get(self, window: np.ndarray) -> torch.Tensor | None:
        """Keys/values of a window run before, if still kept (layout: the decoder's)."""
        return self._kv.get(window.tobytes())

    def put(self, window: np.ndarray, kv: torch.Tensor) -> None:
        self._kv[window.tobytes()] = kv
        self._kv.move_to_end(window.tobytes())
        while len(self._kv) > self.capacity:
            self._kv.popitem(last=False)

    def drop(self, window: np.ndarray) -> None:
        self._kv.pop(window.tobytes(), None)

    def clear(self) -> None:
        self._kv.clear()


def native_decoder(net: PathNet):
    """The native decoder holding ``net``'s weights (as bfloat16), sized from the network."""
    from expertflow._extension import load_extension

    layer = net.stack.layers[0]
    return load_extension().PathDecoder(
        net.state_dict(),
        vocab_size=net.embed.num_embeddings,
        context=net.context,
        d_model=net.embed.embedding_dim,
        depth=len(net.stack.layers),
        heads=layer.self_attn.num_heads,
        ffn=layer.linear1.out_features,
        outputs=net.head.out_features,
        use_previous=net.previous is not None,
        norm_eps=net.norm.eps,
        reuse_hidden=0 if net.reuse is None else net.reuse[0].out_features,
        reuse_horizons=0 if net.reuse is None else len(REUSE_HORIZONS),
    )


class StepDecoder:
    """Decode steps of a :class:`PathNet` over batches of growing histories, with the window
    cache. Call :meth:`invalidate` whenever the network's weights change."""

    def __init__(self, net: PathNet, capacity: int = 512):
        self.net = net
        self.cache = WindowCache(capacity)
        self._native = True
        self._decoder = None

    @property
    def native(self) -> bool:
        return self._native

    @native.setter
    def native(self, value: bool) -> None:
        self._native = bool(value)
        self.cache.clear()  # the two keep keys/values in different layouts

    def invalidate(self) -> None:
        """Forgets what was computed from the weights: the native decoder and the cache."""
        self._decoder = None
        self.cache.clear()

    def decoder(self):
        """The native decoder, built from the weights on first use."""
        if self._decoder is None:
            self._decoder = native_decoder(self.net)
        return self._decoder

    @torch.no_grad()
    def step(self, histories, previous, with_reuse: bool):
        """``histories[b]`` row b's ids so far, ``previous [B, L, K]`` (or None) -> scores
        ``[B, L, E]`` and (``with_reuse``) reuse scores ``[B, L, E]``, else None."""
        # A row that grew by one id since the last step runs one token through the stack; a
        # new window (every context / 2 ids, or a row never seen) runs whole.
        rows = len(histories)
        layers, experts = self.net.out_shape
        context = self.net.context
        windows = [_window(h, context) for h in histories]
        vocab = self.net.embed.num_embeddings
        for window in windows:  # the torch network would raise IndexError, naming nothing
            check_token_ids(window, vocab, where="token_ids")
        x = (self._native_features if self._native else self._torch_features)(histories, windows)
        before = None
        if self.net.previous is not None and previous is not None:
            before = torch.from_numpy(multi_hot(np.asarray(previous), experts).reshape(rows, -1))
        if self._native:
            out = self.decoder().scores(x, before, with_reuse=with_reuse)
            probs, reuse = out if with_reuse else (out, None)
        else:
            if self.net.previous is not None and before is None:
                before = torch.zeros((rows, layers * experts))
            probs, reuse = self.net.scores(x, before, with_reuse)
        shape = (rows, layers, experts)
        return probs.numpy().reshape(shape), None if reuse is None else reuse.numpy().reshape(shape)

    def _forget_left_window(self, history) -> None:
        """Drops the cached window a row just moved past: it is not asked for again."""
        n, c = len(history), self.net.context
        if n > 1 and window_start(n - 2, c) != window_start(n - 1, c):
            self.cache.drop(np.asarray(history[window_start(n - 2, c) : -1]))

    def _native_features(self, histories, windows) -> torch.Tensor:
        """``[rows, d_model]``: every row's new ids through the native decoder in one call."""
        ids, pasts, grown = [], [], []
        for b, window in enumerate(windows):
            past = self.cache.get(window[:-1]) if len(window) > 1 else None
            if past is None:
                self._forget_left_window(histories[b])
                ids.append(window.tolist())
            else:
                ids.append([int(window[-1])])
                grown.append(window)
            pasts.append(past)
        features, kvs = self.decoder().extend_rows(ids, pasts)
        for window, kv in zip(windows, kvs, strict=True):
            self.cache.put(window, kv)
        for window in grown:  # after the loop: rows with equal windows share the shorter one
            self.cache.drop(window[:-1])
        return features

    def _torch_features(self, histories, windows) -> torch.Tensor:
        """``[rows, d_model]``: the reference, :meth:`PathNet.extend` batched over rows."""
        features = [None] * len(windows)
        grow, past = [], []
        for b, window in enumerate(windows):
            cached = self.cache.get(window[:-1]) if len(window) > 1 else None
            if cached is not None:
                grow.append(b)
                past.append(cached)
                continue
            self._forget_left_window(histories[b])
            ids = torch.from_numpy(window)[None]
            x, kv = self.net.extend(ids, torch.arange(ids.shape[1])[None])
            features[b] = x[0, -1]
            self.cache.put(window, kv[0])
        if grow:
            cached, valid, lengths = _padded(past)
            ids = torch.as_tensor([[int(windows[b][-1])] for b in grow])
            positions = torch.as_tensor([[length] for length in lengths])
            x, kv = self.net.extend(ids, positions, cached, valid)
            for j, b in enumerate(grow):
                features[b] = x[j, -1]
                self.cache.put(windows[b], torch.cat([past[j], kv[j]], dim=3))
            for b in grow:  # a grown window's shorter self is not asked for again
                self.cache.drop(windows[b][:-1])
        return torch.stack(features)


def _window(history, context: int) -> np.ndarray:
    """The ids of ``history`` the step reads (its window), as int64; refuses a history that
    is not a non-empty sequence of int ids (None ids cannot be read by this predictor)."""
    if isinstance(history, str | bytes) or not len(history):
        raise ValueError(f"token_ids must be a non-empty list of token ids, got {history!r:.80}")
    ids = history[window_start(len(history) - 1, context) :]
    if not all(isinstance(t, int | np.integer) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"token_ids must be int token ids, got {list(ids)!r:.80}")
    return np.asarray(ids, dtype=np.int64)


def _padded(past: list[torch.Tensor]):
    """Rows' cached keys/values ``[depth, 2, H, T_j, d / H]`` -> stacked ``[rows, depth, 2, H,
    max T, d / H]``, which columns are real ``[rows, max T]`` (None when all lengths are
    equal) and the lengths."""
    lengths = [p.shape[3] for p in past]
    if len(set(lengths)) == 1:
        return torch.stack(past), None, lengths
    cached = torch.zeros((len(past), *past[0].shape[:3], max(lengths), past[0].shape[4]))
    valid = torch.zeros((len(past), max(lengths)), dtype=torch.bool)
    for j, p in enumerate(past):
        cached[j, :, :, :, : lengths[j]] = p
        valid[j, : lengths[j]] = True
    return cached, valid, lengths
