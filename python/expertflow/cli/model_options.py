"""The options ``chat``, ``generate`` and ``serve`` share: which model, how it is offloaded,
and how replies are sampled."""

from __future__ import annotations

import argparse

from expertflow.runtime.expert_format import EXPERT_FORMATS
from expertflow.runtime.options import CPU_EXPERTS
from expertflow.runtime.policies import BUDGETS, POLICIES


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default="demo", help="'demo' (the bundled model, the default) or a local "
        "checkpoint folder (config.json, safetensors, tokenizer)",
    )  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument(
        "--gpu-memory", default=None, help="device budget for weights and expert slots, "
        "e.g. 20GiB (a checkpoint needs this or --slots; the demo model's default: --slots 24)",
    )  # fmt: skip
    budget.add_argument(
        "--slots", type=int, default=None, help="expert slots on the device (demo default: 24, "
        "a quarter of its experts)",
    )  # fmt: skip
    parser.add_argument(
        "--policy", default="expertflow", choices=POLICIES, metavar="POLICY",
        help=f"cache policy, which experts stay in the slots: {', '.join(POLICIES)} "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--budget", default="per_layer", choices=BUDGETS,
        help="per_layer: each layer its own pool of slots; global: one pool shared by all layers "
        "(default: %(default)s)",
    )  # fmt: skip
    parser.add_argument(
        "--predictor", default=None, help="routing predictor folder, 'demo' or 'none' "
        "(default: the bundled one for the demo model under the expertflow policy, else none)",
    )  # fmt: skip
    parser.add_argument(
        "--expert-format", default="auto", choices=EXPERT_FORMATS,
        help="how experts are kept in host memory and copied: auto (the model's dtype, the "
        "default) or a quantized format",
    )  # fmt: skip
    add_cpu_experts_option(parser)
    parser.add_argument(
        "--group-size", type=int, default=None,
        help="int4's group size, with --expert-format int4 only (default: 64, or the largest "
        "that divides a weight's input size)",
    )  # fmt: skip


def add_cpu_experts_option(parser: argparse.ArgumentParser) -> None:
    """``--cpu-experts``, as ``offload(cpu_experts=...)``: shared with ``demo``."""
    parser.add_argument(
        "--cpu-experts", default="never", choices=CPU_EXPERTS,
        help="never: every expert runs from a device slot (the default); auto: a missed expert "
        "is computed on the CPU from host memory where that beats copying it; always: every "
        "expert on the CPU",
    )  # fmt: skip


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="most new tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--temperature", type=float, default=None, help="0: greedy (default: the checkpoint's "
        "generation_config, else greedy)",
    )  # fmt: skip
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass, in (0, 1] (default: "
        "the checkpoint's generation_config, else 1)",
    )  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of a sampled reply (default: a random one)"
    )


def load(args: argparse.Namespace):
    """The model the options name (:class:`~expertflow.serving.loading.Loaded`), every option
    checked before loading."""
    from expertflow.cli.common import check_device, check_positive
    from expertflow.serving.loading import OffloadChoices, load_model

    check_device("--device", args.device)
    check_positive(args, "slots", "group_size")
    choices = OffloadChoices(
        device=args.device, slots=args.slots, gpu_memory=args.gpu_memory, policy=args.policy,
        budget=args.budget, predictor=args.predictor, expert_format=args.expert_format,
        group_size=args.group_size, cpu_experts=args.cpu_experts,
    )  # fmt: skip
    return load_model(args.model, choices)
