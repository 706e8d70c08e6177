"""ExpertFlow's routing path predictor: the :class:`PathNet` with training, decode steps,
whole-trace scoring and saving.

A small transformer over the token ids predicts every layer's experts at once, trained with
binary cross-entropy on multi-hot routing from traces. It is a causal (decoder-only) stack
rather than the paper's T5 encoder-decoder: each token's path is predicted from the ids up to
it, which is exactly what is known at decode time, and a single stack needs half the
parameters. Its head also reads the routing the previous token really took (known once that
token has run), which the paper's predictor does not. An optional *reuse head* on the same
features predicts, for every (layer, expert), whether it is used within 1, 2, 4, 8 and 16
tokens after this one: the cache values an expert by that once the step no longer needs its
layer, which is what Belady's farthest-next-use eviction knows and a next-step prediction
cannot tell.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from expertflow.prediction._checks import checked_int
from expertflow.prediction.base import Predictor, multi_hot
from expertflow.prediction.path import training
from expertflow.prediction.path.decoding import StepDecoder, window_start
from expertflow.prediction.path.net import PathNet, checked_sizes
from expertflow.traces.format import Trace

__all__ = ["PathPredictor"]


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
        sizes = checked_sizes(
            vocab_size=vocab_size,
            d_model=d_model,
            depth=depth,
            heads=heads,
            context=context,
            reuse_hidden=reuse_hidden,
        )
        if not isinstance(use_previous, bool | np.bool_):
            raise ValueError(f"use_previous must be a bool, got {use_previous!r}")
        torch.manual_seed(seed)
        self.hparams = sizes | {"use_previous": bool(use_previous)}
        self.net = PathNet(num_layers=num_layers, num_experts=num_experts, **self.hparams)
        self.net.eval()
        self.history: list[dict] = []
        self._decoding = StepDecoder(self.net)
        self._round_weights()

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

    @property
    def native(self) -> bool:
        """Whether :meth:`predict_step` runs the native decoder (``csrc/core/path_decoder``,
        the default) or the torch network op by op (the reference it is tested against).
        Both give the same scores to float rounding; at one token per step the native one
        costs a fraction (``bench/bench_predictor_step.py``)."""
        return self._decoding.native

    @native.setter
    def native(self, value: bool) -> None:
        self._decoding.native = value

    @property
    def kv_rows(self) -> int:
        """How many windows' keys/values :meth:`predict_step` keeps (least recently used
        go first)."""
        return self._decoding.cache.capacity

    @kv_rows.setter
    def kv_rows(self, value: int) -> None:
        self._decoding.cache.capacity = int(value)

    def window_start(self, index: int) -> int:
        """Where the window that scores token ``index`` of a sequence starts: windows of
        ``context`` ids overlapping by half, as :meth:`predict_trace` cuts them, so every
        token sees at least ``context / 2`` ids before it and a step scores like the trace."""
        return window_start(index, self.context)

    def check_trace(self, trace: Trace) -> None:
        """As :meth:`Predictor.check_trace`, and refuses token ids outside the vocabulary."""
        super().check_trace(trace)
        if trace.num_tokens and int(trace.token_ids.max()) >= self.hparams["vocab_size"]:
            raise ValueError(
                f"trace token ids reach {int(trace.token_ids.max())}, the predictor's "
                f"vocab_size is {self.hparams['vocab_size']} (trained for another tokenizer?)"
            )

    def add_reuse_head(self, hidden: int = 128, seed: int = 0) -> PathPredictor:
        """Gives a trained predictor a new (untrained) reuse head: :meth:`fit_reuse` next."""
        hidden = checked_int("hidden", hidden, 1)
        torch.manual_seed(seed)
        self.net.add_reuse_head(hidden)
        self.hparams["reuse_hidden"] = int(hidden)
        self._round_weights()
        return self

    def fit(
        self, traces, *, epochs=3, batch_size=32, lr=2e-3, reuse_epochs=3, log=print
    ) -> PathPredictor:
        """Trains the network on the traces' routing, then (with a reuse head and
        ``reuse_epochs``) the reuse head on the trained network's features."""
        epochs, batch_size, lr = training.checked_schedule(
            traces, epochs, batch_size, lr, reuse_epochs=reuse_epochs
        )
        for trace in traces:
            self.check_trace(trace)
        self._decoding.invalidate()  # the weights change
        data = training.windows(traces, self.context, self.num_experts)
        training.train_paths(
            self.net,
            data,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            history=self.history,
            log=log,
        )
        self._round_weights()
        if self.has_reuse and reuse_epochs:
            self.fit_reuse(traces, epochs=reuse_epochs, log=log)
        return self

    def fit_reuse(self, traces, *, epochs=3, batch_size=2048, lr=3e-3, log=print) -> PathPredictor:
        """Trains the reuse head alone, with binary cross-entropy, on the features of the
        trained (frozen) network: the next-step scores do not change. Takes about a minute
        per million tokens and epoch on two cores."""
        if not self.has_reuse:
            raise ValueError("this predictor has no reuse head: add_reuse_head() first")
        epochs, batch_size, lr = training.checked_schedule(traces, epochs, batch_size, lr)
        for trace in traces:
            self.check_trace(trace)
        self._decoding.invalidate()
        features, targets = training.reuse_training_set(
            self.net, traces, self.context, self.num_experts
        )
        training.train_reuse(
            self.net,
            features,
            targets,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            history=self.history,
            log=log,
        )
        self._round_weights()
        return self

    @torch.no_grad()
    def _round_weights(self) -> None:
        """Rounds the weights to bfloat16 values (kept as float32): the native decoder keeps
        them as bfloat16 (half the bytes a decode step reads), and the torch network must
        compute with the same values. Training runs in float32; this follows it."""
        for param in self.net.parameters():
            param.copy_(param.bfloat16().float())
        self._decoding.invalidate()

    def predict_step(self, histories, previous) -> np.ndarray:
        return self._decoding.step(histories, previous, with_reuse=False)[0]

    def predict_step_with_reuse(self, histories, previous):
        return self._decoding.step(histories, previous, with_reuse=self.has_reuse)

    def predict_trace(self, trace: Trace) -> np.ndarray:
        """Batched: within a window every position sees only the ids up to it (causal), and a
        sequence longer than the context is scored in windows overlapping by half, so every
        token sees at least ``context / 2`` ids before it."""
        return self._trace_outputs(trace, with_reuse=False)[0]

    def reuse_trace(self, trace: Trace) -> np.ndarray | None:
        return self._trace_outputs(trace, with_reuse=True)[1] if self.has_reuse else None

    @torch.no_grad()
    def _trace_outputs(self, trace: Trace, with_reuse: bool):
        """``[T, L, E]`` scores and (``with_reuse``) reuse scores, else None."""
        self.check_trace(trace)
        scores = np.zeros((trace.num_tokens, self.num_layers, self.num_experts), np.float32)
        reuse = np.zeros_like(scores) if with_reuse else None
        c, half = self.context, self.context // 2
        hot = multi_hot(trace.expert_ids, self.num_experts)
        for rows in trace.sequence_rows():
            ids = torch.from_numpy(trace.token_ids[rows].astype(np.int64))
            before = torch.from_numpy(training.previous_routing(hot, rows))
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
        hparams = {"use_previous": False, "reuse_hidden": 0} | _checked_hparams(meta, path)
        try:
            p = cls(meta["num_layers"], meta["num_experts"], meta["top_k"], **hparams)
        except (TypeError, ValueError) as exc:  # TypeError: a misspelt or missing size
            raise ValueError(f"predictor: {path / 'predictor.json'}: {exc}") from exc
        weights = path / "path_predictor.pt"
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            p.net.load_state_dict(state)  # float32 parameters whatever the file's dtype
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            # What torch raises for a truncated archive and for tensors of other names or
            # shapes (weights of another predictor.json): the folder's fault, not a bug here.
            first = (str(exc).strip().splitlines() or [repr(exc)])[0]
            raise ValueError(
                f"predictor: {weights} does not hold this predictor ({first})"
            ) from exc
        p._round_weights()  # files saved before the weights were rounded
        p.history = meta.get("history", [])
        return p


# Upper limits of the sizes in predictor.json (the constructor checks the rest): a damaged
# file must not ask for a gigabyte embedding. Far above train-predictor's useful values.
_HPARAM_LIMITS = {"vocab_size": 2**20, "d_model": 4096, "depth": 64, "heads": 64,
                  "context": 2**16, "reuse_hidden": 2**16}  # fmt: skip


def _checked_hparams(meta: dict, path: Path) -> dict:
    hparams = meta["hparams"]
    where = path / "predictor.json"
    if not isinstance(hparams, dict):
        raise ValueError(f"predictor: {where}: hparams must be a JSON object")
    unknown = set(hparams) - set(_HPARAM_LIMITS) - {"use_previous"}
    if unknown:
        raise ValueError(f"predictor: {where}: unknown hparams {sorted(unknown)}")
    for key, high in _HPARAM_LIMITS.items():
        value = hparams.get(key)
        if isinstance(value, int) and value > high:
            raise ValueError(
                f"predictor: {where}: hparams.{key} must be at most {high}, got {value}"
            )
    return hparams
