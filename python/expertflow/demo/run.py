"""``expertflow demo``: the bundled model, offloaded, generating text, against the alternatives.

The same prompt is decoded greedily by the whole model on the device and by the offloaded model
under each cache policy with the same slot budget (about a quarter of the experts by default).
Every offloaded run must produce exactly the whole model's tokens; the table shows what each
policy paid for them: hits, expert copies, bytes moved, speed, and device memory.

With a quantized ``expert_format`` the experts are kept and copied packed; the whole model then
runs with the same quantized experts expanded to floats (``restore`` of an offloaded copy), so
"same tokens" still checks the offloaded runs exactly, and the float model's text is decoded
too, to show how far quantization moved it.
"""

from __future__ import annotations

import copy
import time

import torch

from expertflow.demo.options import (
    check_budget_fits,
    check_demo_options,
    check_expert_format,
    default_slots,
    demo_device,
)

__all__ = [
    "DEFAULT_PROMPT",
    "check_demo_options",
    "check_expert_format",
    "format_demo",
    "run_demo",
]

DEFAULT_PROMPT = "The history of the city begins"


def _progress_processor(total: int, desc: str, on_first=None):
    """A logits processor that only advances a progress bar (and notes when prefill is done)."""
    from tqdm import tqdm
    from transformers import LogitsProcessor

    class Progress(LogitsProcessor):
        def __init__(self):
            self.bar = tqdm(total=total, desc=desc, unit="tok", leave=False)

        def __call__(self, input_ids, scores):
            if self.bar.n == 0 and on_first is not None:
                on_first()
            self.bar.update(1)
            return scores

    return Progress()


def _generate(model, input_ids, max_new_tokens, desc, on_first=None):
    from transformers import LogitsProcessorList

    first = {}

    def mark():
        first["t"] = time.perf_counter()
        if on_first is not None:
            on_first()

    progress = _progress_processor(max_new_tokens, desc, mark)
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([progress]),
        )
    if input_ids.device.type == "cuda":
        torch.cuda.synchronize(input_ids.device)
    ended = time.perf_counter()
    progress.bar.close()
    decode_tokens = max_new_tokens - 1  # the first new token comes from the prompt's forward
    decode_seconds = ended - first.get("t", started)
    return out[0, input_ids.shape[1] :].tolist(), {
        "seconds": ended - started,
        "decode_tokens_per_second": decode_tokens / decode_seconds if decode_tokens else None,
    }


def _quantized_copy(base, expert_format: str, group_size: int | None):
    """``base`` with its experts quantized in ``expert_format`` and expanded back to floats:
    the values every offloaded run computes with."""
    import expertflow

    model = copy.deepcopy(base)
    config = model.config
    expertflow.offload(
        model,
        device="cpu",
        slots=config.num_hidden_layers * config.num_local_experts,
        expert_format=expert_format,
        group_size=group_size,
    )
    return expertflow.restore(model)


def _whole_model_row(base, input_ids, max_new_tokens, device, name="whole model on device"):
    """The whole model on the device: its tokens (the reference) and its row of figures."""
    full = copy.deepcopy(base).to(device)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    full_bytes += sum(b.numel() * b.element_size() for b in full.buffers())
    reference, timing = _generate(full, input_ids.to(device), max_new_tokens, name)
    return reference, {"name": name, "device_bytes": full_bytes, **timing}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two greedy continuations share before they first differ."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _expert_bytes(model) -> int:
    """The float experts' bytes (every expert of every layer)."""
    from expertflow.runtime.experts import expert_param_names, find_experts_modules

    return sum(
        getattr(m, name).numel() * getattr(m, name).element_size()
        for _, m in find_experts_modules(model)
        for name in expert_param_names(m)
    )


def _offloaded_row(
    base, input_ids, max_new_tokens, policy, options: dict, threshold: float, reference
) -> dict:
    """The model offloaded under ``policy`` (``options``: offload's device and budget): figures of
    its decode steps, prompt excluded."""
    import expertflow
    from expertflow.demo.model import load_demo_predictor

    model = copy.deepcopy(base)
    # expertflow's policy runs with the bundled routing predictor; the others on demand.
    predictor = load_demo_predictor() if policy == "expertflow" else None
    threshold = threshold if predictor is not None else 0.0
    expertflow.offload(
        model, policy=policy, predictor=predictor, prefetch_threshold=threshold, **options
    )
    state = model._expertflow
    after_prefill = {}
    device = state.cache.device
    tokens, timing = _generate(
        model, input_ids.to(device), max_new_tokens, f"offloaded, {policy}",
        lambda: after_prefill.update(state.cache.stats()),
    )  # fmt: skip
    stats = state.cache.stats()
    decode = {k: stats[k] - after_prefill.get(k, 0) for k in stats}
    report = expertflow.memory_report(model)
    lookups = decode["hits"] + decode["misses"]
    prefetcher = state.prefetcher
    cpu_runs = sum(getattr(m, "cpu_expert_runs", 0) for m in model.modules())
    cpu = options.get("cpu_experts", "never")
    row = {
        "name": f"offloaded, {policy}"
        + (" + predictor" if predictor else "")
        + ("" if cpu == "never" else f" + CPU ({cpu})"),
        "cpu_experts": cpu_runs,
        "predictor_ms_per_step": (
            1e3 * prefetcher.seconds / prefetcher.steps
            if prefetcher is not None and prefetcher.steps
            else None
        ),
        "policy": policy,
        "slots": state.cache.num_slots,
        "hit_ratio": decode["hits"] / lookups if lookups else None,
        "experts_loaded_per_token": (decode["misses"] + decode["prefetches"])
        / (max_new_tokens - 1),
        "bytes_moved": decode["bytes_copied"],
        "bytes_moved_with_prompt": stats["bytes_copied"],
        "device_bytes": report["device_bytes"],
        "host_bytes": report["host_bytes"],
        "expert_format": report["expert_format"],
        "same_tokens": tokens == reference,
        **timing,
    }
    expertflow.restore(model)
    return row


def run_demo(
    prompt: str = DEFAULT_PROMPT,
    *,
    max_new_tokens: int = 48,
    slots: int | None = None,
    gpu_memory: int | str | None = None,
    policies: tuple[str, ...] = ("lru", "lrfu", "expertflow"),
    budget: str = "per_layer",
    device: str | None = None,
    prefetch_threshold: float = 0.5,
    expert_format: str = "auto",
    group_size: int | None = None,
    cpu_experts: str = "never",
    spell=str,
) -> dict:
    """Runs the demo and returns the text and one row of figures per configuration.
    ``prefetch_threshold`` applies to the expertflow policy's predictor: at 0.5 the bundled
    path predictor gave both more hits and fewer expert loads per token than the history
    predictor bundled before it (README, "Routing predictor"). ``expert_format`` and
    ``group_size`` go to ``offload``; with a quantized format the whole model's row runs the
    same quantized experts. ``cpu_experts`` goes to ``offload`` too (``"auto"``: each run's
    misses computed on the CPU where that beats copying them; ``"always"``: all its experts).

    Every argument is checked before the model is loaded (:func:`check_demo_options`), and a
    ``gpu_memory`` against the loaded model before the whole model's run; ``spell`` names the
    arguments in those errors (the command line: its options)."""
    from expertflow.demo.model import load_demo_model

    device = demo_device(device, spell)
    check_demo_options(
        prompt, max_new_tokens=max_new_tokens, slots=slots, gpu_memory=gpu_memory,
        policies=policies, budget=budget, device=device, prefetch_threshold=prefetch_threshold,
        expert_format=expert_format, group_size=group_size, cpu_experts=cpu_experts, spell=spell,
    )  # fmt: skip
    policies = (policies,) if isinstance(policies, str) else tuple(policies)
    # float32 everywhere: the model is small, and "same tokens as the whole model" then holds
    # exactly rather than up to bf16 rounding of different kernels.
    dtype = torch.float32
    base, tokenizer = load_demo_model(dtype=dtype)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise ValueError(f"{spell('prompt')} has no tokens")
    config = base.config
    total_experts = config.num_hidden_layers * config.num_local_experts
    if slots is None and gpu_memory is None:
        slots = default_slots(config.to_dict())
    options = {
        "device": device,
        "slots": slots,
        "gpu_memory": gpu_memory,
        "budget": budget,
        "expert_format": expert_format,
        "group_size": group_size,
        "cpu_experts": cpu_experts,
    }
    check_budget_fits(base, options, spell)
    float_tokens = None
    if expert_format == "auto":
        reference, whole = _whole_model_row(base, input_ids, max_new_tokens, device)
    else:
        float_tokens, _ = _generate(
            copy.deepcopy(base).to(device), input_ids.to(device), max_new_tokens, "float model"
        )
        quantized = _quantized_copy(base, expert_format, group_size)
        reference, whole = _whole_model_row(
            quantized, input_ids, max_new_tokens, device, f"whole model ({expert_format} experts)"
        )
        del quantized
    rows = [whole] + [
        _offloaded_row(
            base, input_ids, max_new_tokens, policy, options, prefetch_threshold, reference
        )
        for policy in policies
    ]
    return {
        "prompt": prompt,
        "text": tokenizer.decode(reference),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "total_experts": total_experts,
        "max_new_tokens": max_new_tokens,
        "budget": budget,
        "expert_format": rows[-1]["expert_format"] if len(rows) > 1 else expert_format,
        "group_size": group_size,
        "host_bytes": rows[-1]["host_bytes"] if len(rows) > 1 else None,
        "float_expert_bytes": _expert_bytes(base),
        "float_text": None if float_tokens is None else tokenizer.decode(float_tokens),
        "float_tokens_agreeing": None
        if float_tokens is None
        else _common_prefix(float_tokens, reference),
        "rows": rows,
    }


def _format_line(result: dict) -> str:
    """Which format the experts are kept in, and their host bytes against float."""
    float_bytes = result["float_expert_bytes"]
    fmt = result["expert_format"]
    line = f"experts in host memory: {result['dtype'] if fmt == 'float' else fmt}"
    if result["host_bytes"] is not None:
        share = 100 * result["host_bytes"] / float_bytes
        line += (
            f", {result['host_bytes'] / 2**20:.1f} MiB ({share:.0f}% of "
            f"{float_bytes / 2**20:.1f} MiB as {result['dtype']})"
        )
    if result["float_text"] is not None:
        line += (
            f"\nthe {result['dtype']} model's text agrees on the first "
            f"{result['float_tokens_agreeing']} of {result['max_new_tokens']} tokens: "
            f"{result['prompt'] + result['float_text']!r}"
        )
    return line + "\n"


def format_demo(result: dict) -> str:
    rows = result["rows"]

    def cell(row, key, fmt):
        value = row.get(key)
        return "-" if value is None else fmt(value)

    full_bytes = rows[0]["device_bytes"]

    def mib(v):
        return f"{v / 2**20:.1f} MiB"

    table = [
        ("slots", lambda r: cell(r, "slots", lambda v: f"{v} of {result['total_experts']}")),
        ("hit ratio (decode)", lambda r: cell(r, "hit_ratio", lambda v: f"{v:.3f}")),
        ("experts loaded / token", lambda r: cell(r, "experts_loaded_per_token", "{:.2f}".format)),
        ("bytes moved (decode)", lambda r: cell(r, "bytes_moved", mib)),
        (
            "predictor ms / step",
            lambda r: cell(r, "predictor_ms_per_step", lambda v: f"{v:.2f}"),
        ),
        (
            "decode tokens/s",
            lambda r: cell(r, "decode_tokens_per_second", lambda v: f"{v:.1f}"),
        ),
        (
            "device memory",
            lambda r: (
                f"{r['device_bytes'] / 2**20:.1f} MiB ({100 * r['device_bytes'] / full_bytes:.0f}%)"
            ),
        ),
        ("host memory (experts)", lambda r: cell(r, "host_bytes", mib)),
        ("same tokens as whole", lambda r: cell(r, "same_tokens", lambda v: "yes" if v else "NO")),
    ]
    if any(r.get("cpu_experts") for r in rows):  # --cpu-experts auto or always
        table.insert(3, ("experts run on the CPU", lambda r: cell(r, "cpu_experts", str)))
    names = [r["name"] for r in rows]
    width = max(24, *(len(n) for n in names)) + 2
    lines = [
        f"prompt: {result['prompt']!r}",
        f"{result['max_new_tokens']} new tokens, greedy, on {result['device']} "
        f"({result['dtype']}), budget {result['budget']}:",
        "",
        result["prompt"] + result["text"],
        "",
        _format_line(result),
        " " * 24 + "".join(n.rjust(width) for n in names),
    ]
    for label, fn in table:
        lines.append(label.ljust(24) + "".join(fn(r).rjust(width) for r in rows))
    return "\n".join(lines)
