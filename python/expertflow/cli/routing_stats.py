"""``expertflow routing-stats``: usage, specialisation, reuse and affinity of a trace."""

from __future__ import annotations

import argparse
import json

from expertflow.traces import load_trace


def run(args: argparse.Namespace) -> int:
    from expertflow.traces.stats import format_routing_stats, routing_stats

    stats = routing_stats(load_trace(args.trace))
    print(json.dumps(stats, indent=1) if args.json else format_routing_stats(stats))
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser(
        "routing-stats", help="expert usage, specialisation, reuse and affinity of a trace"
    )
    sp.add_argument(
        "--trace", required=True, help="trace .npz to read (expertflow trace writes one)"
    )
    sp.add_argument(
        "--json", action="store_true", help="print the statistics as JSON instead of a report"
    )
    sp.set_defaults(run=run)
