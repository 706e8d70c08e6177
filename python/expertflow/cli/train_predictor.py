"""``expertflow train-predictor``: train a routing predictor on traces."""

from __future__ import annotations

import argparse

from expertflow.cli.common import check_output_folder, check_positive, load_traces
from expertflow.traces.validation import MAX_VOCAB

# Upper bounds of the path predictor's sizes: a routing predictor is meant to be small (the
# paper's has d_model 32, 7 MB); these are far above any useful value and keep a typo (an
# extra digit or three) from allocating gigabytes.
_MAX_SIZES = {"d_model": 4096, "depth": 64, "context": 2**16, "reuse_hidden": 2**16}
_HEADS = 4  # the path predictor's attention heads (PathPredictor's default)


def _saved_path_predictor(args: argparse.Namespace, traces):
    """``--from``: a saved path predictor for these traces, given a reuse head if it has none
    (and ``--reuse-hidden`` asks for one)."""
    from expertflow.prediction import PathPredictor, load_predictor

    if args.kind == "history":
        raise ValueError("--from starts from a path predictor: use --kind path or combined")
    path = load_predictor(args.start_from)
    if not isinstance(path, PathPredictor):
        raise ValueError(f"--from: {args.start_from} holds a {path.kind} predictor, not path")
    for trace in traces:
        path.check_trace(trace)
    if args.reuse_hidden and not path.has_reuse:
        path.add_reuse_head(args.reuse_hidden)
    return path


def _refuse_traces_without_ids(kind: str, traces) -> None:
    """The path predictor reads token ids: ``--kind path`` or ``combined`` needs them in
    every trace (the history predictor trains on the others too)."""
    missing = sum(t.token_ids is None for t in traces)
    if kind != "history" and missing:
        raise ValueError(
            f"--traces: {missing} of {len(traces)} traces have no token_ids, and --kind {kind} "
            "trains the path predictor, which reads token ids (--kind history trains without "
            "them: from routing alone)"
        )


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuses counts, sizes and rates the training would crash on (or misread) later."""
    import math

    check_positive(args, "batch_size", "depth", "context", "vocab_size")
    check_positive(args, "epochs", "reuse_epochs", "reuse_hidden", minimum=0)
    if args.d_model < _HEADS or args.d_model % _HEADS:
        raise ValueError(
            f"--d-model must be a positive multiple of {_HEADS} (the path predictor's attention "
            f"heads split it evenly), got {args.d_model}"
        )
    for name, cap in (_MAX_SIZES | {"vocab_size": MAX_VOCAB}).items():
        value = getattr(args, name)
        if value is not None and value > cap:
            raise ValueError(f"--{name.replace('_', '-')} must be at most {cap}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if not (math.isfinite(args.history_weight) and args.history_weight >= 0):
        raise ValueError(
            f"--history-weight must be a finite number >= 0, got {args.history_weight}"
        )
    check_output_folder("--out", args.out)


def _vocab_size(args: argparse.Namespace, traces) -> int:
    """``--vocab-size``, else the traces' ``meta.vocab_size`` (else their largest id + 1);
    refused when a trace's token ids do not fit it (the embedding would fail mid-training)."""
    largest = max(int(t.token_ids.max()) if t.num_tokens else 0 for t in traces)
    vocab = args.vocab_size or max(t.meta.get("vocab_size") or largest + 1 for t in traces)
    if largest >= vocab:
        raise ValueError(
            f"--vocab-size {vocab} is too small: the traces' token ids reach {largest}"
        )
    return vocab


def run(args: argparse.Namespace) -> int:
    from expertflow.prediction import CombinedPredictor, HistoryPredictor, PathPredictor

    _check_arguments(args)
    traces = load_traces(args.traces, exclude_source=args.exclude_source)
    _refuse_traces_without_ids(args.kind, traces)
    first = traces[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    for trace in traces[1:]:
        if (trace.num_layers, trace.num_experts, trace.top_k) != shape:
            raise ValueError(
                f"--traces: all traces must come from one model: the first has layers, experts, "
                f"top_k = {shape}, another {(trace.num_layers, trace.num_experts, trace.top_k)}"
            )
    history = HistoryPredictor(*shape).fit(traces) if args.kind != "path" else None
    path = None
    if args.start_from:
        path = _saved_path_predictor(args, traces)
    elif args.kind != "history":
        vocab = _vocab_size(args, traces)
        path = PathPredictor(
            *shape,
            vocab_size=vocab,
            d_model=args.d_model,
            depth=args.depth,
            context=args.context,
            use_previous=args.use_previous,
            reuse_hidden=args.reuse_hidden,
        )
    if path is not None and args.epochs:
        path.fit(
            traces,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            reuse_epochs=args.reuse_epochs,
        )
    elif path is not None and path.has_reuse and args.reuse_epochs:
        path.fit_reuse(traces, epochs=args.reuse_epochs)  # --epochs 0: the reuse head alone
    if args.kind == "combined":
        predictor = CombinedPredictor([path, history], [1.0, args.history_weight])
    else:
        predictor = path or history
    predictor.save(args.out)
    tokens = sum(t.num_tokens for t in traces)
    without_ids = sum(t.num_tokens for t in traces if t.token_ids is None)
    routing_only = f"; {without_ids} without token ids: routing only" if without_ids else ""
    print(f"wrote {args.kind} predictor to {args.out} (trained on {tokens} tokens{routing_only})")
    return 0


def add_parser(sub) -> None:
    tr = sub.add_parser("train-predictor", help="train a routing predictor on traces")
    tr.add_argument(
        "--traces", nargs="+", required=True, help="trace .npz files to train on, of one model"
    )
    tr.add_argument("--out", required=True, help="predictor folder to write")
    tr.add_argument(
        "--kind",
        default="path",
        choices=["path", "history", "combined"],
        help="path: a small transformer over token ids (and the previous routing); history: "
        "what each token id and layer chose before; "
        "combined: path + history, weighted by --history-weight (default: %(default)s)",
    )
    tr.add_argument(
        "--history-weight", type=float, default=0.5,
        help="with --kind combined: the history predictor's weight, the path's being 1 "
        "(default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--exclude-source",
        help="leave this source (a trace's text file label) out of training (default: none)",
    )
    tr.add_argument(
        "--epochs", type=int, default=10,
        help="training epochs of the path predictor; 0: none (default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="training windows per step (default: %(default)s)",
    )
    tr.add_argument(
        "--lr",
        type=float,
        default=2e-3,
        help="AdamW's peak learning rate, one-cycle (default: %(default)s)",
    )
    tr.add_argument(
        "--context", type=int, default=64,
        help="token ids the path predictor sees (default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--d-model", type=int, default=96,
        help="the path predictor's width, a multiple of 4 (default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--depth", type=int, default=2,
        help="the path predictor's transformer layers (default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--use-previous",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the path predictor also reads the previous token's routing (default: yes)",
    )
    tr.add_argument(
        "--vocab-size", type=int,
        help="token ids the path predictor embeds (default: the traces' meta.vocab_size, else "
        "their largest id + 1)",
    )  # fmt: skip
    tr.add_argument(
        "--reuse-hidden",
        type=int,
        default=128,
        help="width of the path predictor's reuse head (predicts uses 1-16 tokens ahead, "
        "for evictions); 0: none (default: 128)",
    )
    tr.add_argument(
        "--reuse-epochs", type=int, default=3,
        help="training epochs of the reuse head (default: %(default)s)",
    )  # fmt: skip
    tr.add_argument(
        "--from",
        dest="start_from",
        metavar="DIR",
        help="start from this saved path predictor (adds a reuse head if it has none); with "
        "--epochs 0 only the reuse head is trained",
    )
    tr.set_defaults(run=run)
