"""``expertflow demo``: the bundled model, offloaded, against the alternatives."""

from __future__ import annotations

import argparse
import json

from expertflow.cli.model_options import add_cpu_experts_option
from expertflow.demo.run import DEFAULT_PROMPT
from expertflow.runtime.expert_format import EXPERT_FORMATS
from expertflow.runtime.policies import BUDGETS, POLICIES


def _group_size(value: str | None) -> int | None:
    """``--group-size`` as an int (what it may be is checked with the format)."""
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--group-size must be a positive integer, got {value!r}") from None


def _spelling(name: str) -> str:
    """A keyword of ``run_demo`` as the option that sets it (``policy``: one of --policies)."""
    from expertflow.traces.replay_options import option_spelling

    return "--policies" if name in ("policy", "policies") else option_spelling(name)


def run(args: argparse.Namespace) -> int:
    from expertflow.cli.common import check_device
    from expertflow.demo.run import format_demo, run_demo

    check_device("--device", args.device)
    # Every other option is checked by run_demo before the model is loaded (and the budget
    # against the model before the whole-model run), its errors naming the options.
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
        group_size=_group_size(args.group_size),
        cpu_experts=args.cpu_experts,
        spell=_spelling,
    )
    print(json.dumps(result, indent=1) if args.json else format_demo(result))
    return 0 if all(r.get("same_tokens", True) for r in result["rows"]) else 1


def add_parser(sub) -> None:
    dp = sub.add_parser(
        "demo", help="compare the cache policies on the bundled demo model",
        description="Decode one prompt greedily with the bundled demo model: whole on the device, "
        "then offloaded under each cache policy with the same slot budget. Every offloaded run "
        "must give the whole model's tokens (exit status 1 if one does not); the table shows what "
        "each policy paid for them.",
    )  # fmt: skip
    dp.add_argument(
        "--prompt", default=None, help=f"text to continue (default: {DEFAULT_PROMPT!r})"
    )
    dp.add_argument(
        "--max-new-tokens", type=int, default=48,
        help="tokens to generate, at least 2 (default: %(default)s)",
    )  # fmt: skip
    budget_group = dp.add_mutually_exclusive_group()
    budget_group.add_argument(
        "--slots", type=int,
        help="expert slots on the device, all layers together (default: a quarter of the demo "
        "model's 96 experts, 24)",
    )  # fmt: skip
    budget_group.add_argument(
        "--gpu-memory",
        help="instead of --slots: the device budget for weights and slots, e.g. 20MiB or 2.5e7",
    )
    dp.add_argument(
        "--policies", default="lru,lrfu,expertflow",
        help=f"comma-separated cache policies to run, of {', '.join(POLICIES)} "
        "(default: %(default)s)",
    )  # fmt: skip
    dp.add_argument(
        "--budget", default="per_layer", choices=BUDGETS,
        help="per_layer: each layer its own pool of slots; global: one pool shared by all layers "
        "(default: %(default)s)",
    )  # fmt: skip
    dp.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    dp.add_argument(
        "--prefetch-threshold", type=float, default=0.5,
        help="the expertflow policy prefetches the experts its predictor scores at least this "
        "(default: %(default)s)",
    )  # fmt: skip
    dp.add_argument(
        "--expert-format",
        default="auto",
        metavar="{" + ",".join(EXPERT_FORMATS) + "}",
        help="how the experts are kept in host memory and copied (default: auto, the model's "
        "float dtype)",
    )
    dp.add_argument("--group-size", help="int4's group size, with --expert-format int4 only "
                    "(default: 64)")  # fmt: skip
    add_cpu_experts_option(dp)
    dp.add_argument(
        "--json", action="store_true", help="print the result as JSON instead of a table"
    )
    dp.set_defaults(run=run)
