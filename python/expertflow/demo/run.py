"""``expertflow demo``: the bundled model, offloaded, generating text, against the alternatives.

The same prompt is decoded greedily by the whole model on the device and by the offloaded model
under each cache policy with the same slot budget (about a quarter of the experts by default).
Every offloaded run must produce exactly the whole model's tokens; the table shows what each
policy paid for them: hits, expert copies, bytes moved, speed, and device memory.
"""

from __future__ import annotations

import copy
import time

import torch

__all__ = ["DEFAULT_PROMPT", "format_demo", "run_demo"]

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


def _whole_model_row(base, input_ids, max_new_tokens, device):
    """The whole model on the device: its tokens (the reference) and its row of figures."""
    full = copy.deepcopy(base).to(device)
    full_bytes = sum(p.numel() * p.element_size() for p in full.parameters())
    full_bytes += sum(b.numel() * b.element_size() for b in full.buffers())
    reference, timing = _generate(full, input_ids.to(device), max_new_tokens, "whole model")
    return reference, {"name": "whole model on device", "device_bytes": full_bytes, **timing}


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
    lookups = decode["hits"] + decode["misses"]
    prefetcher = state.prefetcher
    row = {
        "name": f"offloaded, {policy}" + (" + predictor" if predictor else ""),
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
        "device_bytes": expertflow.memory_report(model)["device_bytes"],
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
) -> dict:
    """Runs the demo and returns the text and one row of figures per configuration.
    ``prefetch_threshold`` applies to the expertflow policy's predictor: at 0.5 the bundled
    path predictor gave both more hits and fewer expert loads per token than the history
    predictor bundled before it (README, "Routing predictor")."""
    from expertflow.demo.model import load_demo_model

    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2, got {max_new_tokens}")
    if slots is not None and gpu_memory is not None:
        raise ValueError("give at most one of slots and gpu_memory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # float32 everywhere: the model is small, and "same tokens as the whole model" then holds
    # exactly rather than up to bf16 rounding of different kernels.
    dtype = torch.float32
    base, tokenizer = load_demo_model(dtype=dtype)
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[1] == 0:
        raise ValueError("prompt must not be empty")
    config = base.config
    total_experts = config.num_hidden_layers * config.num_local_experts
    if slots is None and gpu_memory is None:
        slots = max(total_experts // 4, config.num_hidden_layers * config.num_experts_per_tok)
    reference, whole = _whole_model_row(base, input_ids, max_new_tokens, device)
    options = {"device": device, "slots": slots, "gpu_memory": gpu_memory, "budget": budget}
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
        "rows": rows,
    }


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
        ("same tokens as whole", lambda r: cell(r, "same_tokens", lambda v: "yes" if v else "NO")),
    ]
    names = [r["name"] for r in rows]
    width = max(24, *(len(n) for n in names)) + 2
    lines = [
        f"prompt: {result['prompt']!r}",
        f"{result['max_new_tokens']} new tokens, greedy, on {result['device']} "
        f"({result['dtype']}), budget {result['budget']}:",
        "",
        result["prompt"] + result["text"],
        "",
        " " * 24 + "".join(n.rjust(width) for n in names),
    ]
    for label, fn in table:
        lines.append(label.ljust(24) + "".join(fn(r).rjust(width) for r in rows))
    return "\n".join(lines)
