"""Routing predictors: before a token's layers run, a score for every (layer, expert).

All predictors share one interface. For a sequence, ``predict(token_ids)`` scores the routing of
the *last* id in ``token_ids`` (the token about to be processed: at decode time it has just been
sampled, so its id is known) from the ids so far; ``observe(routing)`` then tells the predictor
what the routers really chose for it, so online predictors can learn. ``reset()`` starts a new
sequence. ``predict_trace`` runs this protocol over a whole trace (each token predicted only
from earlier routing and ids up to its own) and is what evaluation and replay use.

* :class:`HistoryPredictor` needs no training: it mixes what the same token id chose before
  (learned online, or warm-started from traces), what the previous token chose (temporal
  reuse), and each layer's expert frequencies.
* :class:`PathPredictor` is ExpertFlow's routing path predictor: a small transformer over the
  token ids that predicts every layer's experts at once, trained with binary cross-entropy on
  multi-hot routing from traces. It is a causal (decoder-only) stack rather than the paper's
  T5 encoder-decoder: each token's path is predicted from the ids up to it, which is exactly
  what is known at decode time, and a single stack needs half the parameters. Its head also
  reads the routing the previous token really took (known once that token has run), which
  the paper's predictor does not. An optional *reuse head* on the same features predicts,
  for every (layer, expert), whether it is used within 1, 2, 4, 8 and 16 tokens after this
  one: the cache values an expert by that once the step no longer needs its layer, which is
  what Belady's farthest-next-use eviction knows and a next-step prediction cannot tell.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expertflow.traces.format import Trace

__all__ = [
    "REUSE_HORIZONS",
    "CombinedPredictor",
    "HistoryPredictor",
    "PathPredictor",
    "Predictor",
    "load_predictor",
    "multi_hot",
    "topk_recall_precision",
    "uses_within",
]


def multi_hot(expert_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """``[..., K]`` expert ids (-1 = none) -> ``[..., E]`` float32 0/1."""
    out = np.zeros((*expert_ids.shape[:-1], num_experts + 1), dtype=np.float32)
    np.put_along_axis(out, np.where(expert_ids < 0, num_experts, expert_ids), 1.0, axis=-1)
    return out[..., :num_experts]


# Token distances the reuse head predicts a use within. Replayed on the demo model's held-out
# routing at 25% slots with true uses as scores (bench/bench_predictor.py's oracle rows), the
# next step alone left 1.45x Belady's bytes and adding these horizons 1.15x; in one-off
# replays, 2 tokens ahead alone gave 1.32x and 4 tokens 1.18x. Their mean ranks an expert by
# how soon it is needed, not just whether.
REUSE_HORIZONS = (1, 2, 4, 8, 16)


class Predictor:
    """Base class: shapes, the sequence protocol, and saving."""

    kind = "base"

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        for name, value in (
            ("num_layers", num_layers),
            ("num_experts", num_experts),
            ("top_k", top_k),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k

    def check_trace(self, trace: Trace) -> None:
        """Refuses a trace of another model (layers/experts mismatch), naming both shapes."""
        mine = (self.num_layers, self.num_experts)
        theirs = (trace.num_layers, trace.num_experts)
        if mine != theirs:
            raise ValueError(
                f"predictor is for {mine[0]} layers x {mine[1]} experts, the trace has "
                f"{theirs[0]} layers x {theirs[1]} experts"
            )

    def predict_step(self, histories, previous: np.ndarray | None) -> np.ndarray:
        """One decode step of a batch: ``histories[b]`` are row b's token ids so far (its last
        id is the token about to run), ``previous`` ``[B, L, K]`` the routing of each row's
        preceding token (None at a sequence's first token). Returns ``[B, L, E]`` scores."""
        raise NotImplementedError

    def predict_step_with_reuse(
        self, histories, previous: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`predict_step`'s scores and ``[B, L, E]`` reuse scores: each (layer,
        expert)'s predicted demand in the tokens after this step (the mean over
        :data:`REUSE_HORIZONS` of the probability of a use within that many tokens), or None
        for a predictor without a reuse head."""
        return self.predict_step(histories, previous), None

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        """``[T, L, E]`` reuse scores over a trace (as :meth:`predict_trace`), or None."""
        return None

    def learn(self, token_ids, routing: np.ndarray) -> None:
        """Online learning: ``routing [B, L, K]`` is what the routers chose for ``token_ids``."""

    def reset(self) -> None:
        """Starts a new (single) sequence for :meth:`predict` / :meth:`observe`."""
        self._previous = None
        self._last = None

    def predict(self, token_ids) -> np.ndarray:
        """``[L, E]`` scores for the last of ``token_ids``, in a single-sequence session."""
        self._last = int(token_ids[-1])
        previous = None if getattr(self, "_previous", None) is None else self._previous[None]
        return self.predict_step([list(token_ids)], previous)[0]

    def observe(self, routing: np.ndarray) -> None:
        """The routers' real choice ``[L, K]`` for the token just predicted."""
        routing = np.asarray(routing)
        self.learn([self._last], routing[None])
        self._previous = routing

    def predict_trace(self, trace: Trace) -> np.ndarray:
        """``[T, L, E]`` scores, each token predicted before its own routing is observed."""
        self.check_trace(trace)
        if trace.token_ids is None:
            raise ValueError(f"{type(self).__name__} needs a trace with token_ids")
        scores = np.zeros((trace.num_tokens, self.num_layers, self.num_experts), np.float32)
        for rows in trace.sequence_rows():
            self.reset()
            ids = trace.token_ids[rows].tolist()
            for i, row in enumerate(rows):
                scores[row] = self.predict(ids[: i + 1])
                self.observe(trace.expert_ids[row])
        return scores

    def _meta(self) -> dict:
        return {
            "kind": self.kind,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
        }


class HistoryPredictor(Predictor):
    """Score = ``w_token`` x (what this token id chose before, an average over its past
    occurrences) + ``w_previous`` x (the previous token's choice) + ``w_frequency`` x (each
    layer's expert frequencies). Learns online as it observes; ``fit`` warm-starts it."""

    kind = "history"

    def __init__(
        self, num_layers, num_experts, top_k, *, w_token=1.0, w_previous=0.6, w_frequency=0.2
    ):
        super().__init__(num_layers, num_experts, top_k)
        self.weights = (w_token, w_previous, w_frequency)
        self._token_sum: dict[int, np.ndarray] = {}
        self._token_count: dict[int, int] = {}
        self._frequency = np.zeros((num_layers, num_experts), np.float64)
        self.reset()

    def fit(self, traces: list[Trace]) -> HistoryPredictor:
        """Adds the routing of every token of ``traces`` to the tables."""
        for trace in traces:
            self.check_trace(trace)
            if trace.token_ids is None:
                raise ValueError("HistoryPredictor.fit needs traces with token_ids")
            hot = multi_hot(trace.expert_ids, self.num_experts)
            self._frequency += hot.sum(axis=0)
            for token in np.unique(trace.token_ids):
                rows = hot[trace.token_ids == token]
                t = int(token)
                self._token_sum[t] = self._token_sum.get(t, 0) + rows.sum(axis=0)
                self._token_count[t] = self._token_count.get(t, 0) + len(rows)
        return self

    def predict_step(self, histories, previous) -> np.ndarray:
        w_token, w_previous, w_frequency = self.weights
        total = self._frequency.sum(axis=1, keepdims=True)
        base = w_frequency * (self._frequency / np.maximum(total, 1)) * self.top_k
        scores = np.repeat(base[None].astype(np.float32), len(histories), axis=0)
        if previous is not None:
            scores += w_previous * multi_hot(np.asarray(previous), self.num_experts)
        for b, ids in enumerate(histories):
            token = int(ids[-1])
            if token in self._token_sum:
                scores[b] += w_token * self._token_sum[token] / self._token_count[token]
        return scores

    def learn(self, token_ids, routing) -> None:
        hot = multi_hot(np.asarray(routing), self.num_experts)
        self._frequency += hot.sum(axis=0)
        for token, h in zip(token_ids, hot, strict=True):
            if token is None:
                continue
            t = int(token)
            self._token_sum[t] = self._token_sum.get(t, 0) + h
            self._token_count[t] = self._token_count.get(t, 0) + 1

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tokens = np.asarray(sorted(self._token_sum), dtype=np.int64)
        np.savez_compressed(
            out / "history.npz",
            tokens=tokens,
            sums=np.stack([self._token_sum[int(t)] for t in tokens])
            if len(tokens)
            else np.zeros((0, self.num_layers, self.num_experts), np.float32),
            counts=np.asarray([self._token_count[int(t)] for t in tokens], dtype=np.int64),
            frequency=self._frequency,
        )
        meta = self._meta() | {"weights": list(self.weights)}
        (out / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, path: Path, meta: dict) -> HistoryPredictor:
        w = meta["weights"]
        p = cls(
            meta["num_layers"],
            meta["num_experts"],
            meta["top_k"],
            w_token=w[0],
            w_previous=w[1],
            w_frequency=w[2],
        )
        with np.load(path / "history.npz") as data:
            for t, s, c in zip(data["tokens"], data["sums"], data["counts"], strict=True):
                p._token_sum[int(t)] = s.astype(np.float32)
                p._token_count[int(t)] = int(c)
            p._frequency = data["frequency"].astype(np.float64)
        return p


class _PathNet(nn.Module):
    """Token + position embeddings, a causal transformer stack, one logit per (layer, expert).
    With ``use_previous`` the routing the previous token really took (known at decode time)
    joins each position's features before the head: the ids say which context this is, the
    last routing says where in it the model's hidden state just was."""

    def __init__(
        self,
        vocab_size,
        num_layers,
        num_experts,
        d_model,
        depth,
        heads,
        context,
        use_previous,
        reuse_hidden=0,
    ):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.stack = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.previous = None
        if use_previous:
            self.previous = nn.Linear(num_layers * num_experts, d_model)
            self.fuse = nn.Sequential(
                nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
            )
        self.head = nn.Linear(d_model, num_layers * num_experts)
        self.out_shape = (num_layers, num_experts)
        self.reuse = None
        if reuse_hidden:
            self.add_reuse_head(reuse_hidden)

    def add_reuse_head(self, hidden: int) -> None:
        """The reuse head: an MLP on the head's input, one logit per horizon and output."""
        outputs = len(REUSE_HORIZONS) * self.head.out_features
        self.reuse = nn.Sequential(
            nn.Linear(self.head.in_features, hidden), nn.GELU(), nn.Linear(hidden, outputs)
        )

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (T <= context) -> ``[B, T, d_model]``, each position causal."""
        t = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.norm(self.stack(x, mask=mask, is_causal=True))

    def extend(self, ids, positions, past=None, past_valid=None):
        """The stack run on new ids after cached keys/values, so a decode step costs one
        token, not a whole window. ``ids``/``positions`` ``[B, n]``; ``past`` the cached keys
        and values ``[B, depth, 2, H, T, d / H]`` (None: nothing cached); ``past_valid``
        ``[B, T]`` which cached columns are real where rows of different lengths were padded
        (None: all). Returns features ``[B, n, d_model]`` (equal to :meth:`features` on the
        whole window) and the new ids' keys/values ``[B, depth, 2, H, n, d / H]``.

        Functional calls on the layers' weights rather than module calls: at one token the
        cost is per-op overhead, not arithmetic."""
        b, n = ids.shape
        x = F.embedding(ids, self.embed.weight) + F.embedding(positions, self.position.weight)
        mask, causal = None, past is None and n > 1
        if past is not None and (n > 1 or past_valid is not None):
            seen = past_valid
            if seen is None:
                seen = torch.ones((b, past.shape[4]), dtype=torch.bool)
            mask = torch.cat(
                [
                    seen[:, None, :].expand(b, n, seen.shape[1]),
                    torch.ones((n, n), dtype=torch.bool).tril().expand(b, n, n),
                ],
                dim=2,
            )[:, None]
        new = []
        for i, layer in enumerate(self.stack.layers):
            attn, n1, n2 = layer.self_attn, layer.norm1, layer.norm2
            h = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
            qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            new += (k, v)
            if past is not None:
                k = torch.cat([past[:, i, 0], k], dim=2)
                v = torch.cat([past[:, i, 1], v], dim=2)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            a = a.transpose(1, 2).reshape(b, n, -1)
            x = x + F.linear(a, attn.out_proj.weight, attn.out_proj.bias)
            h = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
            h = layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias))
            x = x + F.linear(h, layer.linear2.weight, layer.linear2.bias)
        x = F.layer_norm(
            x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps
        )
        kv = torch.stack(new, dim=1)  # [B, depth * 2, H, n, d / H]
        return x, kv.view(b, len(self.stack.layers), 2, *kv.shape[2:])

    def head_input(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Features ``[..., d]`` and the previous token's multi-hot routing ``[..., L * E]``
        (zeros where there is none) -> what the heads read ``[..., d]``."""
        if self.previous is not None:
            x = x + self.previous(previous)
            x = x + self.fuse(x)
        return x

    def head_logits(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Features and previous routing (as :meth:`head_input`) -> logits ``[..., L, E]``."""
        x = self.head_input(x, previous)
        return self.head(x).view(*x.shape[:-1], *self.out_shape)

    def reuse_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """:meth:`head_input`'s output -> ``[..., len(REUSE_HORIZONS), L, E]`` logits."""
        return self.reuse(fused).view(*fused.shape[:-1], len(REUSE_HORIZONS), *self.out_shape)

    def scores(self, x, previous, with_reuse: bool):
        """Probabilities ``[..., L, E]`` and (``with_reuse``) reuse scores ``[..., L, E]``,
        the mean over horizons of the reuse head's probabilities (else None)."""
        fused = self.head_input(x, previous)
        probs = torch.sigmoid(self.head(fused).view(*fused.shape[:-1], *self.out_shape))
        if not with_reuse:
            return probs, None
        return probs, torch.sigmoid(self.reuse_logits(fused)).mean(dim=-3)

    def forward(self, ids: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [B, T]``, ``previous [B, T, L * E]`` -> logits ``[B, T, L, E]``."""
        return self.head_logits(self.features(ids), previous)


class PathPredictor(Predictor):
    """ExpertFlow's routing path predictor (see the module docstring). Sees the last
    ``context`` ids of the sequence and, with ``use_previous`` (the default), the routing the
    previous token took: on the bundled model that lifts held-out top-k recall by about six
    points, since the router's choice depends on the hidden state more than on the ids."""

    kind = "path"

    def __init__(
        self,
        num_layers,
        num_experts,
        top_k,
        *,
        vocab_size,
        d_model=96,
        depth=2,
        heads=4,
        context=64,
        use_previous=True,
        reuse_hidden=0,
        seed=0,
    ):
        super().__init__(num_layers, num_experts, top_k)
        if reuse_hidden < 0:
            raise ValueError(f"reuse_hidden must be >= 0 (0: no reuse head), got {reuse_hidden}")
        torch.manual_seed(seed)
        self.hparams = dict(
            vocab_size=vocab_size,
            d_model=d_model,
            depth=depth,
            heads=heads,
            context=context,
            use_previous=bool(use_previous),
            reuse_hidden=int(reuse_hidden),
        )
        self.net = _PathNet(num_layers=num_layers, num_experts=num_experts, **self.hparams)
        self.net.eval()
        self._round_weights()
        self.history: list[dict] = []
        # Windows' keys/values for predict_step, least recently used first: every active
        # request of a batched run, at up to 330 KB each for the bundled size (a full window
        # of 64 ids x 4 layers x keys and values x 160 floats).
        self.kv_rows = 512
        self._kv: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._native = True
        self._native_decoder = None

    def _check_vocab(self, trace: Trace) -> None:
        if trace.token_ids is None:
            raise ValueError(
                "the path predictor reads token ids: this trace has no token_ids (record it "
                "with `expertflow trace`; the history predictor works without)"
            )
        if trace.num_tokens and int(trace.token_ids.max()) >= self.hparams["vocab_size"]:
            raise ValueError(
                f"trace token ids reach {int(trace.token_ids.max())}, the predictor's "
                f"vocab_size is {self.hparams['vocab_size']} (trained for another tokenizer?)"
            )

    @property
    def context(self) -> int:
        return self.hparams["context"]

    @property
    def uses_previous(self) -> bool:
        return self.hparams.get("use_previous", False)

    @property
    def has_reuse(self) -> bool:
        """Whether the predictor has a reuse head (see :meth:`fit_reuse`)."""
        return self.net.reuse is not None

    def add_reuse_head(self, hidden: int = 128, seed: int = 0) -> PathPredictor:
        """Gives a trained predictor a new (untrained) reuse head: :meth:`fit_reuse` next."""
        if hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        torch.manual_seed(seed)
        self.net.add_reuse_head(hidden)
        self.hparams["reuse_hidden"] = int(hidden)
        self._round_weights()
        return self

    @staticmethod
    def _shifted(hot: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``[len(rows), L * E]``: for each row of a sequence, the routing of the row before
        it (zeros for the sequence's first token)."""
        flat = hot[rows].reshape(len(rows), -1)
        return np.concatenate([np.zeros_like(flat[:1]), flat[:-1]])

    def _windows(self, traces):
        """Training windows ``(ids [N, C], previous [N, C, L * E], targets [N, C, L, E],
        valid [N, C])``: every sequence cut into consecutive windows of ``context`` tokens."""
        ids, previous, targets, valid = [], [], [], []
        c = self.context
        for trace in traces:
            self.check_trace(trace)
            self._check_vocab(trace)
            hot = multi_hot(trace.expert_ids, self.num_experts)
            for rows in trace.sequence_rows():
                before = self._shifted(hot, rows)
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

    def fit(
        self, traces, *, epochs=3, batch_size=32, lr=2e-3, reuse_epochs=3, log=print
    ) -> PathPredictor:
        """Trains the network on the traces' routing, then (with a reuse head and
        ``reuse_epochs``) the reuse head on the trained network's features."""
        self._kv.clear()  # the weights change
        self._native_decoder = None
        ids, previous, targets, valid = self._windows(traces)
        gen = torch.Generator().manual_seed(0)
        optim = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=0.01)
        steps = epochs * math.ceil(len(ids) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps, pct_start=0.1)
        self.net.train()
        started = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(len(ids), generator=gen)
            total = count = 0.0
            for i in range(0, len(ids), batch_size):
                b = order[i : i + batch_size]
                logits = self.net(ids[b], previous[b])
                loss = nn.functional.binary_cross_entropy_with_logits(
                    logits, targets[b], reduction="none"
                ).mean(dim=(2, 3))
                loss = (loss * valid[b]).sum() / valid[b].sum()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                total += loss.item() * len(b)
                count += len(b)
            entry = {
                "epoch": epoch + 1,
                "loss": total / count,
                "seconds": round(time.perf_counter() - started, 1),
            }
            self.history.append(entry)
            if log is not None:
                log(
                    f"epoch {epoch + 1}/{epochs}  bce {entry['loss']:.4f}  {entry['seconds']:.0f} s"
                )
        self.net.eval()
        self._round_weights()
        if self.has_reuse and reuse_epochs:
            self.fit_reuse(traces, epochs=reuse_epochs, log=log)
        return self

    def _reuse_training_set(self, traces) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained network's head inputs ``[N, d]`` for every token of the traces (in
        windows, as :meth:`fit` sees them) and, as uint8 ``[N, H, L * E]``, whether each
        (layer, expert) is used within each of :data:`REUSE_HORIZONS` tokens after it, in the
        same sequence."""
        ids, previous, _, valid = self._windows(traces)
        fused = []
        with torch.no_grad():
            for i in range(0, len(ids), 256):
                x = self.net.head_input(self.net.features(ids[i : i + 256]), previous[i : i + 256])
                fused.append(x[valid[i : i + 256]])
        targets = []
        for trace in traces:
            hot = multi_hot(trace.expert_ids, self.num_experts).reshape(trace.num_tokens, -1)
            for rows in trace.sequence_rows():
                targets.append(uses_within(hot[rows].astype(np.uint8), REUSE_HORIZONS))
        return torch.cat(fused), torch.from_numpy(np.concatenate(targets))

    def fit_reuse(self, traces, *, epochs=3, batch_size=2048, lr=3e-3, log=print) -> PathPredictor:
        """Trains the reuse head alone, with binary cross-entropy, on the features of the
        trained (frozen) network: the next-step scores do not change. Takes about a minute
        per million tokens and epoch on two cores."""
        if not self.has_reuse:
            raise ValueError("this predictor has no reuse head: add_reuse_head() first")
        self._kv.clear()
        features, targets = self._reuse_training_set(traces)
        gen = torch.Generator().manual_seed(0)
        optim = torch.optim.AdamW(self.net.reuse.parameters(), lr=lr, weight_decay=0.01)
        steps = max(1, epochs * math.ceil(len(features) / batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(optim, lr, total_steps=steps)
        started = time.perf_counter()
        for epoch in range(epochs):
            order = torch.randperm(len(features), generator=gen)
            total = 0.0
            for i in range(0, len(features), batch_size):
                b = order[i : i + batch_size]
                logits = self.net.reuse(features[b])
                loss = F.binary_cross_entropy_with_logits(logits, targets[b].flatten(1).float())
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                total += loss.item() * len(b)
            entry = {
                "reuse_epoch": epoch + 1,
                "loss": total / max(1, len(features)),
                "seconds": round(time.perf_counter() - started, 1),
            }
            self.history.append(entry)
            if log is not None:
                log(f"reuse epoch {epoch + 1}/{epochs}  bce {entry['loss']:.4f}")
        self._round_weights()
        return self

    def _cached(self, window: np.ndarray) -> torch.Tensor | None:
        """Keys/values ``[depth, 2, H, T, d / H]`` of a window run before, if still kept."""
        return self._kv.get(window.tobytes())

    def _remember(self, window: np.ndarray, kv: torch.Tensor) -> None:
        self._kv[window.tobytes()] = kv
        self._kv.move_to_end(window.tobytes())
        while len(self._kv) > self.kv_rows:
            self._kv.popitem(last=False)

    def window_start(self, index: int) -> int:
        """Where the window that scores token ``index`` of a sequence starts: windows of
        ``context`` ids overlapping by half, as :meth:`predict_trace` cuts them, so every
        token sees at least ``context / 2`` ids before it and a step scores like the trace."""
        c = self.context
        if index < c:
            return 0
        step = c - c // 2
        return ((index - c) // step + 1) * step

    @torch.no_grad()
    def _round_weights(self) -> None:
        """Rounds the weights to bfloat16 values (kept as float32): the native decoder keeps
        them as bfloat16 (half the bytes a decode step reads), and the torch network must
        compute with the same values. Training runs in float32; this follows it."""
        for param in self.net.parameters():
            param.copy_(param.bfloat16().float())
        self._native_decoder = None

    @property
    def native(self) -> bool:
        """Whether :meth:`predict_step` runs the native decoder (``csrc/core/path_decoder``,
        the default) or the torch network op by op (the reference it is tested against).
        Both give the same scores to float rounding; at one token per step the native one
        costs a fraction (``bench/bench_predictor_step.py``)."""
        return self._native

    @native.setter
    def native(self, value: bool) -> None:
        self._native = bool(value)
        self._kv.clear()  # the two keep keys/values in different layouts

    def _decoder(self):
        """The native decoder, built from the weights on first use (after fit or load)."""
        if self._native_decoder is None:
            from expertflow._extension import load_extension

            h = self.hparams
            self._native_decoder = load_extension().PathDecoder(
                self.net.state_dict(),
                vocab_size=h["vocab_size"],
                context=h["context"],
                d_model=h["d_model"],
                depth=h["depth"],
                heads=h["heads"],
                ffn=self.net.stack.layers[0].linear1.out_features,
                outputs=self.num_layers * self.num_experts,
                use_previous=self.uses_previous,
                norm_eps=self.net.norm.eps,
                reuse_hidden=h.get("reuse_hidden", 0),
                reuse_horizons=len(REUSE_HORIZONS) if self.has_reuse else 0,
            )
        return self._native_decoder

    def _forget_left_window(self, history) -> None:
        """Drops the cached window a row just moved past: it is not asked for again."""
        n = len(history)
        if n > 1 and self.window_start(n - 2) != self.window_start(n - 1):
            self._kv.pop(np.asarray(history[self.window_start(n - 2) : -1]).tobytes(), None)

    def predict_step(self, histories, previous) -> np.ndarray:
        return self._step(histories, previous, with_reuse=False)[0]

    def predict_step_with_reuse(self, histories, previous):
        return self._step(histories, previous, with_reuse=self.has_reuse)

    @torch.no_grad()
    def _step(self, histories, previous, with_reuse: bool):
        # Each row's window keys/values are cached under the window's ids (whatever sequence
        # or batch row they belong to), so a row that grew by one id since the last step
        # runs one token through the stack; a new window (every context / 2 ids, or a row
        # never seen) runs whole.
        rows = len(histories)
        windows = [
            np.asarray(h[self.window_start(len(h) - 1) :], dtype=np.int64) for h in histories
        ]
        step = self._native_features if self._native else self._torch_features
        x = step(histories, windows)
        before = None
        if self.uses_previous and previous is not None:
            hot = multi_hot(np.asarray(previous), self.num_experts)
            before = torch.from_numpy(hot.reshape(rows, -1))
        if self._native:
            out = self._decoder().scores(x, before, with_reuse=with_reuse)
            probs, reuse = out if with_reuse else (out, None)
        else:
            if self.uses_previous and before is None:
                before = torch.zeros((rows, self.num_layers * self.num_experts))
            probs, reuse = self.net.scores(x, before, with_reuse)
        shape = (rows, self.num_layers, self.num_experts)
        return probs.numpy().reshape(shape), None if reuse is None else reuse.numpy().reshape(shape)

    def _native_features(self, histories, windows) -> torch.Tensor:
        """``[rows, d_model]``: every row's new ids through the native decoder in one call."""
        ids, pasts, grown = [], [], []
        for b, window in enumerate(windows):
            past = self._cached(window[:-1]) if len(window) > 1 else None
            if past is None:
                self._forget_left_window(histories[b])
                ids.append(window.tolist())
            else:
                ids.append([int(window[-1])])
                grown.append(window)
            pasts.append(past)
        features, kvs = self._decoder().extend_rows(ids, pasts)
        for window, kv in zip(windows, kvs, strict=True):
            self._remember(window, kv)
        for window in grown:  # after the loop: rows with equal windows share the shorter one
            self._kv.pop(window[:-1].tobytes(), None)
        return features

    def _torch_features(self, histories, windows) -> torch.Tensor:
        """``[rows, d_model]``: the reference, :meth:`_PathNet.extend` batched over rows."""
        features = [None] * len(windows)
        grow, past = [], []
        for b, window in enumerate(windows):
            cached = self._cached(window[:-1]) if len(window) > 1 else None
            if cached is not None:
                grow.append(b)
                past.append(cached)
                continue
            self._forget_left_window(histories[b])
            ids = torch.from_numpy(window)[None]
            x, kv = self.net.extend(ids, torch.arange(ids.shape[1])[None])
            features[b] = x[0, -1]
            self._remember(window, kv[0])
        if grow:
            lengths = [p.shape[3] for p in past]
            if len(set(lengths)) == 1:
                cached, valid = torch.stack(past), None
            else:  # rows of different lengths: pad, and mask the padding
                cached = torch.zeros(
                    (len(grow), *past[0].shape[:3], max(lengths), past[0].shape[4])
                )
                valid = torch.zeros((len(grow), max(lengths)), dtype=torch.bool)
                for j, p in enumerate(past):
                    cached[j, :, :, :, : lengths[j]] = p
                    valid[j, : lengths[j]] = True
            ids = torch.as_tensor([[int(windows[b][-1])] for b in grow])
            positions = torch.as_tensor([[length] for length in lengths])
            x, kv = self.net.extend(ids, positions, cached, valid)
            for j, b in enumerate(grow):
                features[b] = x[j, -1]
                self._remember(windows[b], torch.cat([past[j], kv[j]], dim=3))
            for b in grow:  # a grown window's shorter self is not asked for again
                self._kv.pop(windows[b][:-1].tobytes(), None)
        return torch.stack(features)

    def predict_trace(self, trace: Trace) -> np.ndarray:
        """Batched: within a window every position sees only the ids up to it (causal), and a
        sequence longer than the context is scored in windows overlapping by half, so every
        token sees at least ``context / 2`` ids before it."""
        return self._trace_outputs(trace, with_reuse=False)[0]

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        return self._trace_outputs(trace, with_reuse=True)[1] if self.has_reuse else None

    @torch.no_grad()
    def _trace_outputs(self, trace: Trace, with_reuse: bool):
        self.check_trace(trace)
        self._check_vocab(trace)
        scores = np.zeros((trace.num_tokens, self.num_layers, self.num_experts), np.float32)
        reuse = np.zeros_like(scores) if with_reuse else None
        c, half = self.context, self.context // 2
        hot = multi_hot(trace.expert_ids, self.num_experts)
        for rows in trace.sequence_rows():
            ids = torch.from_numpy(trace.token_ids[rows].astype(np.int64))
            before = torch.from_numpy(self._shifted(hot, rows))
            done = 0
            start = 0
            while done < len(rows):
                window = ids[start : start + c]
                x = self.net.features(window[None])
                probs, soon = self.net.scores(x, before[None, start : start + c], with_reuse)
                take = slice(done - start, len(window))
                scores[rows[done : start + len(window)]] = probs[0, take].numpy()
                if with_reuse:
                    reuse[rows[done : start + len(window)]] = soon[0, take].numpy()
                done = start + len(window)
                start = max(0, done - half)
        return scores, reuse

    def save(self, out: str | Path) -> None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        # bfloat16 on disk: the weights are bfloat16 values (_round_weights), half the bytes.
        state = {
            k: v.bfloat16() if v.is_floating_point() else v
            for k, v in self.net.state_dict().items()
        }
        torch.save(state, out / "path_predictor.pt")
        meta = self._meta() | {"hparams": self.hparams, "history": self.history}
        (out / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, path: Path, meta: dict) -> PathPredictor:
        # Files saved before these existed: no previous routing, no reuse head.
        hparams = {"use_previous": False, "reuse_hidden": 0} | meta["hparams"]
        p = cls(meta["num_layers"], meta["num_experts"], meta["top_k"], **hparams)
        state = torch.load(path / "path_predictor.pt", map_location="cpu", weights_only=True)
        p.net.load_state_dict(state)  # float32 parameters whatever the file's dtype
        p._round_weights()  # files saved before the weights were rounded
        p.history = meta.get("history", [])
        return p


def uses_within(hot: np.ndarray, horizons) -> np.ndarray:
    """``hot [T, K]`` (one sequence's multi-hot routing, uint8) -> ``[T, len(horizons), K]``:
    whether each output is used within each horizon of tokens after the row's token."""
    out = np.zeros((len(hot), len(horizons), hot.shape[1]), np.uint8)
    within = np.zeros_like(hot)
    distance = 0
    for h, horizon in enumerate(horizons):
        while distance < horizon:
            distance += 1
            if distance < len(hot):
                np.maximum(within[:-distance], hot[distance:], out=within[:-distance])
        out[:, h] = within
    return out


def _mean_or_none(arrays: list[np.ndarray | None]) -> np.ndarray | None:
    present = [a for a in arrays if a is not None]
    return sum(present) / len(present) if present else None


class CombinedPredictor(Predictor):
    """A weighted sum of predictors' scores, e.g. the path predictor (what this token's ids
    say) plus the history predictor (what this sequence did a token ago)."""

    kind = "combined"

    def __init__(self, parts: list[Predictor], weights: list[float]):
        if not parts or len(parts) != len(weights):
            raise ValueError("CombinedPredictor needs one weight per predictor (at least one)")
        first = parts[0]
        super().__init__(first.num_layers, first.num_experts, first.top_k)
        for p in parts[1:]:
            if (p.num_layers, p.num_experts) != (first.num_layers, first.num_experts):
                raise ValueError(
                    f"CombinedPredictor: parts disagree on shape: {first.num_layers}x"
                    f"{first.num_experts} and {p.num_layers}x{p.num_experts}"
                )
        self.parts, self.weights = list(parts), [float(w) for w in weights]

    def predict_step(self, histories, previous) -> np.ndarray:
        return sum(
            w * p.predict_step(histories, previous)
            for p, w in zip(self.parts, self.weights, strict=True)
        )

    def predict_step_with_reuse(self, histories, previous):
        """The weighted sum of the parts' scores, and the mean reuse scores of the parts that
        have a reuse head (None if none has)."""
        outs = [p.predict_step_with_reuse(histories, previous) for p in self.parts]
        scores = sum(w * s for (s, _), w in zip(outs, self.weights, strict=True))
        return scores, _mean_or_none([r for _, r in outs])

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        return _mean_or_none([p.reuse_trace(trace) for p in self.parts])

    def learn(self, token_ids, routing) -> None:
        for p in self.parts:
            p.learn(token_ids, routing)

    def predict_trace(self, trace: Trace) -> np.ndarray:
        # The parts never see each other's state, so each may use its own (batched) scoring.
        return sum(
            w * p.predict_trace(trace) for p, w in zip(self.parts, self.weights, strict=True)
        )

    def save(self, out: str | Path) -> None:
        out = Path(out)
        for i, p in enumerate(self.parts):
            p.save(out / f"part{i}")
        meta = self._meta() | {"weights": self.weights, "parts": len(self.parts)}
        (out / "predictor.json").write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def _load(cls, path: Path, meta: dict) -> CombinedPredictor:
        parts = [load_predictor(path / f"part{i}") for i in range(meta["parts"])]
        return cls(parts, meta["weights"])


def load_predictor(path: str | Path) -> Predictor:
    path = Path(path)
    meta_file = path / "predictor.json"
    if not meta_file.is_file():
        raise ValueError(f"predictor: {path} has no predictor.json")
    meta = json.loads(meta_file.read_text())
    kinds = {"history": HistoryPredictor, "path": PathPredictor, "combined": CombinedPredictor}
    if meta.get("kind") not in kinds:
        raise ValueError(f"predictor: unknown kind {meta.get('kind')!r} in {meta_file}")
    return kinds[meta["kind"]]._load(path, meta)


def topk_recall_precision(
    scores: np.ndarray, expert_ids: np.ndarray, groups: list[np.ndarray], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: recall and precision of the predicted set against the needed set, where for
    every group of token rows (one token, or the tokens of a batch step) the needed set is the
    union of their routed experts and the predicted set the union of each token's ``count``
    best-scored experts. Returns two ``[L]`` arrays."""
    layers, experts = scores.shape[1], scores.shape[2]
    top = np.argsort(-scores, axis=-1, kind="stable")[..., :count]
    predicted = multi_hot(top, experts).astype(bool)  # [T, L, E]
    needed = multi_hot(expert_ids, experts).astype(bool)
    hit = np.zeros(layers)
    need = np.zeros(layers)
    pred = np.zeros(layers)
    for rows in groups:
        p = predicted[rows].any(axis=0)
        n = needed[rows].any(axis=0)
        hit += (p & n).sum(axis=-1)
        need += n.sum(axis=-1)
        pred += p.sum(axis=-1)
    return hit / np.maximum(need, 1), hit / np.maximum(pred, 1)
