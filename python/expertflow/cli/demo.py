"""``expertflow demo``: the bundled model, offloaded, against the alternatives."""

from __future__ import annotations

import argparse
import json

from expertflow.runtime.expert_format import EXPERT_FORMATS
from expertflow.runtime.policies import BUDGETS


def _group_size(value: str | None) -> int | None:
    """``--group-size`` as an int (what it may be is checked with the format)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--group-size must be a positive integer, got {value!r}") from None


def run(args: argparse.Namespace) -> int:
    from expertflow.cli.common import check_device
    from expertflow.demo.run import DEFAULT_PROMPT, check_expert_format, format_demo, run_demo
    from expertflow.traces.replay_options import option_spelling

    check_device("--device", args.device)
    group_size = _group_size(args.group_size)
    check_expert_format(args.expert_format, group_size, spell=option_spelling)

    result = run_demo(
        DEFAULT_PROMPT if args.prompt is None else args.prompt,
        max_new_tokens=args.max_new_tokens,
        slots=args.slots,
        gpu_memory=args.gpu_memory,
        policies=tuple(args.policies.split(",")),
        budget=args.budget,
        device=args.device,
        prefetch_threshold=args.prefetch_threshold,
        expert_format=args.expert_format,
        group_size=group_size,
    )
    print(json.dumps(result, indent=1) if args.json else format_demo(result))
    return 0 if all(r.get("same_tokens", True) for r in result["rows"]) else 1


def add_parser(sub) -> None:
    dp = sub.add_parser("demo", help="the bundled model, offloaded, against the alternatives")
    dp.add_argument("--prompt", default=None, help="text to continue")
    dp.add_argument("--max-new-tokens", type=int, default=48)
    budget_group = dp.add_mutually_exclusive_group()
    budget_group.add_argument("--slots", type=int, help="expert slots (default: a quarter)")
    budget_group.add_argument("--gpu-memory", help="total device budget, e.g. 20MiB")
    dp.add_argument("--policies", default="lru,lrfu,expertflow", help="comma-separated policies")
    dp.add_argument("--budget", default="per_layer", choices=BUDGETS)
    dp.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    dp.add_argument(
        "--prefetch-threshold",
        type=float,
        default=0.5,
        help="the expertflow policy prefetches experts the predictor scores at least this",
    )
    dp.add_argument(
        "--expert-format",
        default="auto",
        metavar="{" + ",".join(EXPERT_FORMATS) + "}",
        help="how the experts are kept in host memory and copied (auto: the float dtype)",
    )
    dp.add_argument("--group-size", help="int4's group size (default 64); with int4 only")
    dp.add_argument("--json", action="store_true")
    dp.set_defaults(run=run)
