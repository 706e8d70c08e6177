"""Checking ``expertflow demo``'s options before the bundled model is loaded: the expert format
against the model's shape (its config.json), each policy's offload options through
:class:`~expertflow.runtime.options.OffloadOptions`, and after loading, a ``gpu_memory`` budget
against the model's resident weights. ``spell`` names an argument as the caller knows it (the
command line: its option)."""

from __future__ import annotations

import copy
import json

import torch

__all__ = [
    "check_budget_fits",
    "check_demo_options",
    "check_expert_format",
    "default_slots",
    "demo_device",
]


def check_expert_format(expert_format: str, group_size: int | None, spell=str) -> None:
    """Refuses, before the model is loaded, an ``expert_format`` or ``group_size`` the demo model
    cannot be offloaded with (its shape is read from its config.json); ``spell`` names the
    arguments (the command line: its options)."""
    from expertflow.demo.model import DEMO_MODEL_DIR
    from expertflow.formats import MXFP4_BLOCK
    from expertflow.runtime.expert_format import EXPERT_FORMATS

    if expert_format not in EXPERT_FORMATS:
        raise ValueError(
            f"{spell('expert_format')} must be one of {', '.join(EXPERT_FORMATS)}, got "
            f"{expert_format!r}"
        )
    if group_size is None:
        return
    if expert_format != "int4":
        raise ValueError(
            f"{spell('group_size')} applies to {spell('expert_format')} int4 only, got "
            f"{expert_format!r}"
        )
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"{spell('group_size')} must be a positive integer, got {group_size!r}")
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    dims = (config["hidden_size"], config["intermediate_size"])  # the experts' input sizes
    if any(d % group_size for d in dims):
        fits = [g for g in (16, 32, 64, 128) if all(d % g == 0 for d in dims)]
        raise ValueError(
            f"{spell('group_size')} {group_size} does not divide the demo model's expert input "
            f"sizes (hidden {dims[0]}, intermediate {dims[1]}); give one of "
            f"{', '.join(map(str, fits))}"
        )
    assert all(d % MXFP4_BLOCK == 0 for d in dims)  # mxfp4 always fits the demo


def _demo_config() -> dict:
    from expertflow.demo.model import DEMO_MODEL_DIR

    return json.loads((DEMO_MODEL_DIR / "config.json").read_text())


def default_slots(config: dict) -> int:
    """The demo's default budget: a quarter of the experts, and never fewer than a layer's
    top_k in every layer."""
    total = config["num_hidden_layers"] * config["num_local_experts"]
    return max(total // 4, config["num_hidden_layers"] * config["num_experts_per_tok"])


def _renamed(exc: Exception, spell) -> ValueError:
    """An ``OffloadOptions`` error (``slots must be ...``, ``offload: gpu_memory=...``) with the
    keyword it opens with spelled as ``spell`` names it (the command line: its option)."""
    text = str(exc).removeprefix("offload: ")
    for name in ("slots", "gpu_memory", "policy", "budget", "prefetch_threshold", "device",
                 "expert_format", "group_size", "cpu_experts"):  # fmt: skip
        if text.startswith((name + " ", name + "=")):
            return ValueError(f"{spell(name)} {text[len(name) + 1 :]}")
    return ValueError(text)


def demo_device(spec, spell) -> torch.device:
    """``device`` as a torch.device (None: cuda if available, else cpu)."""
    try:
        return torch.device(spec or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError):
        raise ValueError(
            f"{spell('device')} must be 'cpu', 'cuda' or 'cuda:N', got {spec!r}"
        ) from None


def check_demo_options(
    prompt: str,
    *,
    max_new_tokens: int,
    slots: int | None,
    gpu_memory: int | str | None,
    policies: tuple[str, ...],
    budget: str,
    device: str | torch.device,
    prefetch_threshold: float,
    expert_format: str,
    group_size: int | None,
    cpu_experts: str = "never",
    spell=str,
) -> None:
    """Refuses, before the model is loaded, any option :func:`run_demo` could not run with:
    each policy's offload options go through :class:`~expertflow.runtime.options.OffloadOptions`
    (what ``offload`` checks), ``slots`` against the demo model's config (its top_k per layer);
    ``spell`` names the arguments (the command line: its options)."""
    from expertflow._extension import check_cuda_device
    from expertflow.runtime.options import OffloadOptions
    from expertflow.runtime.policies import BUDGETS, POLICIES

    check_expert_format(expert_format, group_size, spell=spell)
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"{spell('prompt')} must be a non-empty text, got {prompt!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 2
    ):
        raise ValueError(
            f"{spell('max_new_tokens')} must be an integer >= 2, got {max_new_tokens!r}"
        )
    if slots is not None and gpu_memory is not None:
        raise ValueError(f"give at most one of {spell('slots')} and {spell('gpu_memory')}")
    if isinstance(policies, str):
        policies = (policies,)
    names = tuple(policies)
    bad = [p for p in names if p not in POLICIES]
    if not names or bad:
        got = f"got {', '.join(map(repr, bad))}" if bad else "got none"
        raise ValueError(
            f"{spell('policies')} must name policies of {', '.join(POLICIES)} "
            f"(comma-separated), {got}"
        )
    if budget not in BUDGETS:  # named before OffloadOptions, which says only 'budget'
        raise ValueError(f"{spell('budget')} must be one of {', '.join(BUDGETS)}, got {budget!r}")
    config = _demo_config()
    if slots is not None:
        top_k, layers = config["num_experts_per_tok"], config["num_hidden_layers"]
        least = top_k * layers if budget == "per_layer" else top_k
        if isinstance(slots, int) and not isinstance(slots, bool) and slots < least:
            raise ValueError(
                f"{spell('slots')} must be at least {least} for the demo model with "
                f"{spell('budget')} {budget} (top_k {top_k}"
                + (f" in each of {layers} layers" if budget == "per_layer" else "")
                + f"), got {slots}"
            )
    try:
        check_cuda_device(device)
    except RuntimeError as exc:
        raise ValueError(f"{spell('device')}: {exc}") from None
    for policy in dict.fromkeys(names):
        try:
            OffloadOptions(
                "cpu",  # the device was checked above; this checks the rest without CUDA
                slots=default_slots(config) if slots is None and gpu_memory is None else slots,
                gpu_memory=gpu_memory,
                policy=policy,
                budget=budget,
                prefetch_threshold=prefetch_threshold,
                expert_format=expert_format,
                group_size=group_size,
                cpu_experts=cpu_experts,
            )
        except ValueError as exc:
            raise _renamed(exc, spell) from None


def check_budget_fits(base, options: dict, spell) -> None:
    """Refuses a ``gpu_memory`` too small for the demo model's resident weights and its least
    slots: offloads a copy on the CPU (a few milliseconds) to ask ``offload``'s own arithmetic,
    before the whole model's run."""
    import expertflow

    if options["gpu_memory"] is None:
        return
    model = copy.deepcopy(base)
    try:
        expertflow.offload(model, policy="lru", **(options | {"device": "cpu"}))
    except ValueError as exc:
        raise _renamed(exc, spell) from None
    expertflow.restore(model)
