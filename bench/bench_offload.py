"""Decode throughput of an offloaded MoE model against the same model fully on the device.

A randomly initialised Mixtral-style model (size set by the flags) generates greedily; measured:
(a) expertflow's policy, LRFU and (c) on-demand LRU with the same slots, at 25% and 50% of all
experts, (b) the whole model on the device and (d) accelerate's ``device_map`` offloading with the
experts on the host (every layer's experts copied in at each of its forwards); tokens/s and
device memory of each, in one run. (d) is skipped where accelerate is not installed.

    python bench/bench_offload.py [--device cuda] [--layers 8] [--hidden 2048] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import expertflow


def build(args, dtype: torch.dtype = torch.bfloat16):
    """A randomly initialised Mixtral-style model of the flags' size, in ``dtype``."""
    import transformers

    config = transformers.MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.MixtralForCausalLM(config).to(dtype).eval()
    return model


def decode_tokens_per_s(model, device, new_tokens):
    ids = torch.randint(0, 32000, (1, 16), device=device)
    model.generate(input_ids=ids, max_new_tokens=4, do_sample=False)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(
        input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def device_memory(device):
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def experts_on_host_device_map(model, device) -> dict[str, str]:
    """A device_map keeping every experts module on the host ("cpu") and everything else on
    ``device``: accelerate then copies a layer's experts to the device at each of its forwards."""
    from expertflow.runtime.experts import find_experts_modules

    experts = {name for name, _ in find_experts_modules(model)}
    device_map: dict[str, str] = {}

    def assign(prefix: str, module) -> None:
        holds_experts = not prefix or any(e.startswith(f"{prefix}.") for e in experts)
        if prefix in experts:
            device_map[prefix] = "cpu"
        elif not holds_experts:
            device_map[prefix] = str(device)
        else:
            if any(True for _ in module.parameters(recurse=False)) or any(
                True for _ in module.buffers(recurse=False)
            ):
                raise ValueError(f"{prefix or 'the model'} holds tensors beside its experts")
            for name, child in module.named_children():
                assign(f"{prefix}.{name}" if prefix else name, child)

    assign("", model)
    return device_map


def accelerate_row(args, device) -> dict:
    """(d) transformers/accelerate offloading: accelerate's ``dispatch_model`` with the experts
    mapped to the host, as ``from_pretrained(device_map=...)`` does for weights that do not fit."""
    from accelerate import dispatch_model

    model = build(args)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    dispatch_model(model, device_map=experts_on_host_device_map(model, device))
    row = {
        "config": "accelerate device_map",
        "slots": 0,
        "tokens_per_s": decode_tokens_per_s(model, device, args.new_tokens),
        "device_bytes": device_memory(device),
    }
    del model
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    total_experts = args.layers * args.experts
    rows = []

    with torch.no_grad():
        model = build(args).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(
            {
                "config": "full model on device",
                "slots": total_experts,
                "tokens_per_s": decode_tokens_per_s(model, device, args.new_tokens),
                "device_bytes": device_memory(device),
            }
        )
        del model
        for share in (0.25, 0.5):
            slots = max(2 * args.layers, int(total_experts * share))
            for policy in ("expertflow", "lrfu", "lru"):
                model = build(args)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                expertflow.offload(model, device=device, slots=slots, policy=policy)
                tps = decode_tokens_per_s(model, device, args.new_tokens)
                stats = model._expertflow.cache.stats()
                rows.append(
                    {
                        "config": f"offloaded, {policy}",
                        "slots": slots,
                        "tokens_per_s": tps,
                        "device_bytes": device_memory(device),
                        "hit_ratio": stats["hits"] / max(1, stats["hits"] + stats["misses"]),
                        "saving_percent": expertflow.memory_report(model)["saving_percent"],
                    }
                )
                del model
        try:
            rows.append(accelerate_row(args, device))
        except ImportError:
            print("accelerate is not installed: its device_map baseline is skipped")

    print(
        f"decode, batch 1, {args.new_tokens} new tokens, {args.layers} layers x "
        f"{args.experts} experts, hidden {args.hidden}, bf16, on {device}"
    )
    for r in rows:
        mem = f"{r['device_bytes'] / 2**30:.2f} GiB" if r["device_bytes"] else "-"
        extra = (
            f"  hit {r['hit_ratio']:.3f}  saves {r['saving_percent']:.1f}%"
            if "hit_ratio" in r
            else ""
        )
        print(
            f"  {r['config']:24} slots {r['slots']:4}  {r['tokens_per_s']:8.2f} tok/s  {mem}{extra}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"offload_{device.type}.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
