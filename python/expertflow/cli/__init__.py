"""expertflow: run Mixture-of-Experts models larger than GPU memory.

The ``expertflow`` command line: ``chat``, ``generate``, ``serve``, ``demo``, ``trace``,
``routing-stats``, ``replay``, ``train-predictor`` and ``eval-predictor``, one module each
(``add_parser`` and ``run``).
"""

from __future__ import annotations

import argparse
import sys

from expertflow.cli import (
    chat,
    demo,
    eval_predictor,
    generate,
    replay,
    routing_stats,
    serve,
    trace,
    train_predictor,
)
from expertflow.traces import TraceError

_COMMANDS = (
    chat,
    generate,
    serve,
    demo,
    replay,
    trace,
    train_predictor,
    eval_predictor,
    routing_stats,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceError, ValueError) as exc:
        print(f"expertflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A file the user named that cannot be read or written (permissions, a full disk): the
        # environment's fault. An OSError naming no file is left to show its traceback.
        if exc.filename is None:
            raise
        print(f"expertflow {args.command}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    """The message on one line: a multi-line one (torch's, numpy's) joined with '; '."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
