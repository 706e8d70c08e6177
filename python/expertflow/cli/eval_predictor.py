"""``expertflow eval-predictor``: recall and precision of a predictor on a trace."""

from __future__ import annotations

import argparse
import json

from expertflow.cli.common import check_output_file, load_traces


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from expertflow.prediction import HistoryPredictor, load_predictor
    from expertflow.prediction.evaluation import (
        evaluate_predictor,
        format_evaluation,
        predictor_for_trace,
    )

    if args.write_scores:
        check_output_file("--write-scores", args.write_scores)  # before the scoring, not after
    (trace,) = load_traces([args.traces], only_source=args.only_source)
    if args.predictor == "history":
        predictor = HistoryPredictor(trace.num_layers, trace.num_experts, trace.top_k)
    else:
        predictor = load_predictor(args.predictor)
    result = evaluate_predictor(predictor, trace)
    scores = result.pop("scores")
    if args.write_scores:
        # On a trace without token ids, the parts that scored it (evaluate_predictor's notes).
        reuse = predictor_for_trace(predictor, trace)[0].reuse_trace(trace)
        extra = {} if reuse is None else {"reuse": reuse}
        np.savez_compressed(args.write_scores, scores=scores, **extra)
    print(json.dumps(result, indent=1) if args.json else format_evaluation(result))
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval-predictor", help="recall and precision of a routing predictor on a trace"
    )
    ev.add_argument(
        "--predictor", required=True,
        help="predictor folder (train-predictor --out), or 'history': a history predictor "
        "learning online from the trace itself",
    )  # fmt: skip
    ev.add_argument("--traces", required=True, help="trace .npz to evaluate on")
    ev.add_argument("--only-source", help="evaluate on this source (domain) only")
    ev.add_argument(
        "--write-scores", help="also write the scores (and reuse scores) .npz, for replay"
    )
    ev.add_argument(
        "--json", action="store_true", help="print the evaluation as JSON instead of a report"
    )
    ev.set_defaults(run=run)
