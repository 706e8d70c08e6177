"""expertflow: run Mixture-of-Experts models larger than GPU memory.

The ``expertflow`` command line: ``chat``, ``generate``, ``serve``, ``demo``, ``trace``,
``routing-stats``, ``replay``, ``train-predictor`` and ``eval-predictor``, one module each
(``add_parser`` and ``run``).
"""

from __future__ import annotations

import argparse
import logging
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

# What ``expertflow --help`` says above the commands: plain text (no markup), wrapped by argparse.
_DESCRIPTION = (
    "Run Mixture-of-Experts models larger than GPU memory: the experts stay in host memory and "
    "the ones the router picks are copied to a cache of slots on the GPU."
)
_EPILOG = "Run 'expertflow <command> --help' for a command's options and their defaults."


def version_text() -> str:
    """``expertflow --version``: the package's version, torch's, and whether the native
    extension has CUDA kernels (read from the build, never by initialising CUDA)."""
    import torch

    import expertflow

    try:
        from importlib.metadata import PackageNotFoundError, version

        ours = version("expertflow")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        ours = getattr(expertflow, "__version__", "unknown")
    info = expertflow.build_info()
    if info["cuda_kernels"]:
        arch = ";".join(info["cuda_arch_list"]) or "?"
        kernels = f"CUDA kernels built (CUDA {info['cuda_version']}, arch {arch})"
    else:
        reason = info.get("cuda_disabled_reason")
        kernels = "no CUDA kernels (CPU only" + (f": {reason})" if reason else ")")
    return f"expertflow {ours}\ntorch {torch.__version__}\n{kernels}"


class _Formatter(argparse.HelpFormatter):
    """Lists the commands one a line, without argparse's ``{chat,generate,...}`` header, each
    name in a column wide enough for the longest (``train-predictor``)."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=21)

    def _format_action(self, action):
        if isinstance(action, argparse._SubParsersAction):
            return "".join(self._format_action(a) for a in action._get_subactions())
        return super()._format_action(action)


class _Version(argparse.Action):
    """``--version``: prints :func:`version_text` and exits (built lazily: importing expertflow
    costs a second, which ``--help`` should not pay)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help=None):  # fmt: skip
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="expertflow", description=_DESCRIPTION, epilog=_EPILOG,
        usage="expertflow [-h] [--version] <command> [options]", formatter_class=_Formatter,
    )  # fmt: skip
    parser.add_argument(
        "--version", action=_Version,
        help="print the versions of expertflow and torch, whether CUDA kernels are built, and exit",
    )  # fmt: skip
    sub = parser.add_subparsers(
        dest="command", required=True, title="commands", metavar="<command>", prog="expertflow"
    )
    for command in _COMMANDS:
        command.add_parser(sub)
    for name, choice in sub.choices.items():
        # A command's own --help opens with what it does (its one-line help, when it has no
        # longer description).
        if choice.description is None:
            choice.description = _sentence(_help_of(sub, name))
    return parser


def _help_of(sub, name: str) -> str:
    return next(a.help for a in sub._choices_actions if a.dest == name)


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _show_progress() -> None:
    """The library's progress messages (logger ``expertflow`` at INFO: the shards a checkpoint
    load reads, the slots it chose) on stderr, where they do not mix with streamed text."""
    logger = logging.getLogger("expertflow")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("expertflow: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _show_progress()
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
