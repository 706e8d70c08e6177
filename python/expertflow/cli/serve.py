"""``expertflow serve``: an OpenAI-compatible HTTP server (``expertflow.serving.server``) over
one continuously batched generation loop.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish for up to
``--shutdown-timeout`` seconds, cancels what is left, and exits with status 0.
"""

from __future__ import annotations

import argparse
import signal
import sys

from expertflow.cli.model_options import add_model_options
from expertflow.serving.arguments import SCHEDULES


def _serve_modules():
    """fastapi and uvicorn, or a one-line error naming the extra that brings them."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise ValueError(
            f"serve needs fastapi and uvicorn ({exc.name} is not installed): "
            "pip install 'expertflow[serve]'"
        ) from None
    return uvicorn


def run(args: argparse.Namespace) -> int:
    from expertflow.cli.common import check_positive
    from expertflow.serving.engine import Engine
    from expertflow.serving.worker import Worker

    uvicorn = _serve_modules()
    check_positive(args, "port", "batch_size", "active_batches")
    check_positive(args, "max_queue", minimum=0)
    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {args.port}")
    if args.schedule == "expertflow" and args.active_batches < 2:
        raise ValueError("--schedule expertflow regroups batches: --active-batches must be >= 2")
    from expertflow.cli.model_options import load
    from expertflow.serving.loading import summary_line
    from expertflow.serving.server import create_app

    loaded = load(args)
    engine = Engine(
        loaded.model, batch_size=args.batch_size, schedule=args.schedule,
        active_batches=args.active_batches, eos_token_id=sorted(loaded.eos),
    )  # fmt: skip
    worker = Worker(engine, capacity=args.batch_size * args.active_batches,
                    max_queue=args.max_queue)  # fmt: skip
    print(summary_line(loaded), file=sys.stderr, flush=True)
    config = uvicorn.Config(
        create_app(loaded, worker), host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )  # fmt: skip
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped on once it has shut down; with this handler in
    # place that re-raise is a no-op and the command returns 0 (a clean, requested stop).
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    return 0 if server.started else 1


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (needs the 'serve' extra)",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/models, /health, /metrics), requests batched continuously.",
    )  # fmt: skip
    add_model_options(p)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size", type=int, default=8, help="requests per decode batch (default: %(default)s)"
    )
    p.add_argument(
        "--active-batches", type=int, default=2,
        help="batches decoding in turn (the expertflow schedule regroups among them; default: "
        "%(default)s)",
    )  # fmt: skip
    p.add_argument("--schedule", default="fifo", choices=SCHEDULES,
                   help="fifo: requests batched in arrival order; expertflow: regrouped by "
                   "predicted routing each round (default: %(default)s)")  # fmt: skip
    p.add_argument(
        "--max-queue", type=int, default=64,
        help="requests that may wait for a place in a batch; more get 503 (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds requests in flight get to finish at SIGTERM (default: "
                   "%(default)s)")  # fmt: skip
    p.add_argument(
        "--log-level", default="warning",
        help="uvicorn's log level: critical, error, warning, info, debug or trace (default: "
        "%(default)s)",
    )  # fmt: skip
    p.set_defaults(run=run)
