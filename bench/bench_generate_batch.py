"""Batched generation of the bundled demo model: FIFO batches against the token scheduler.

    python bench/bench_generate_batch.py [--corpus ../shared/data/corpus] [--json]

Workload: prompts cut from the held-out text of every corpus domain, interleaved in arrival
order (a mixed-domain stream). The model is offloaded (expertflow policy + the bundled
predictor, a per-layer slot budget) and decodes the requests with ``generate_batch`` in batches
of B = 4, 16, 64: with FIFO batches, with the token scheduler regrouping two active batches
(ExpertFlow's pair of consecutive batches), and regrouping four. All runs must give every request
the same tokens. Reported per B: distinct experts a decode step ran per layer, expert bytes
copied, new tokens/s end to end, scheduling time, and the change against FIFO.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

import expertflow
from expertflow.demo.model import domain_texts, load_demo_model, load_demo_predictor
from expertflow.serving.generation import generate_batch


def mixed_prompts(corpus: str, tokenizer, count: int, length: int) -> list[list[int]]:
    """``count`` prompts of ``length`` tokens, taken in turn from each domain's held-out text."""
    streams = {
        name: tokenizer(text)["input_ids"]
        for name, text in domain_texts(corpus, "held_out").items()
    }
    prompts, offsets = [], dict.fromkeys(streams, 0)
    while len(prompts) < count:
        for name, ids in streams.items():
            start = offsets[name]
            if start + length > len(ids) or len(prompts) == count:
                continue
            prompts.append(ids[start : start + length])
            offsets[name] = start + 4 * length  # spread over the text
        if all(offsets[n] + length > len(s) for n, s in streams.items()):
            break
    return prompts


def default_corpus() -> Path:
    """``shared/data/corpus`` beside the checkout, or inside it (where a device machine's copy
    of the working tree carries ``shared/``)."""
    root = Path(__file__).resolve().parents[1]
    for candidate in (root.parent / "shared/data/corpus", root / "shared/data/corpus"):
        if candidate.is_dir():
            return candidate
    return root.parent / "shared/data/corpus"


def run(base, predictor, prompts, batch, schedule, slots, new_tokens, device, active, every=1):
    model = copy.deepcopy(base)
    expertflow.offload(
        model, device=device, slots=slots, policy="expertflow", predictor=copy.deepcopy(predictor)
    )
    result = generate_batch(
        model,
        prompts,
        max_new_tokens=new_tokens,
        batch_size=batch,
        schedule=schedule,
        active_batches=active,
        regroup_every=every,
    )
    expertflow.restore(model)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default=str(default_corpus()))
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="4,16,64")
    parser.add_argument("--slot-fraction", type=float, default=0.5)
    parser.add_argument("--active-batches", type=int, default=4)
    parser.add_argument("--regroup-every", type=int, default=1, help="rounds between regroupings")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    torch.set_grad_enabled(False)
    base, tokenizer = load_demo_model()
    base.generation_config.eos_token_id = None  # every request decodes all its tokens
    predictor = load_demo_predictor()
    prompts = mixed_prompts(args.corpus, tokenizer, args.requests, args.prompt_tokens)
    config = base.config
    slots = int(args.slot_fraction * config.num_hidden_layers * config.num_local_experts)
    configs = [
        ("fifo", args.active_batches),
        ("expertflow", 2),
        ("expertflow", args.active_batches),
    ]
    names = ["fifo", "expertflow x2", f"expertflow x{args.active_batches}"]
    # One small run first, so that no measured run pays the process's first-use costs.
    run(base, predictor, prompts[:8], 4, "fifo", slots, 4, args.device, 2)
    results = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        runs = [
            run(
                base,
                predictor,
                prompts,
                batch,
                schedule,
                slots,
                args.new_tokens,
                args.device,
                active,
                args.regroup_every,
            )  # fmt: skip
            for schedule, active in configs
        ]
        if any(r.sequences != runs[0].sequences for r in runs):
            print(f"batch {batch}: scheduling changed some request's tokens", file=sys.stderr)
            return 1
        row = {"batch": batch}
        for name, r in zip(names, runs, strict=True):
            s = r.stats
            row[name] = {
                "distinct_experts_per_layer": s["distinct_experts_per_layer"],
                "bytes_copied": s["cache"]["bytes_copied"],
                "tokens_per_second": s["tokens_per_second"],
                "decode_seconds": s["decode_seconds"],
                "schedule_seconds": s["schedule_seconds"],
                "kv_rows_moved": s["kv_rows_moved"],
            }
        results.append(row)
    meta = {
        "requests": len(prompts),
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "slots": slots,
        "device": args.device,
        "regroup_every": args.regroup_every,
    }
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return 0
    print(
        f"{meta['requests']} mixed-domain requests x {args.new_tokens} new tokens, demo model "
        f"offloaded with {slots} slots ({args.slot_fraction:.0%}) on {args.device}; "
        f"xN = active batches the scheduler regroups, every {args.regroup_every} round(s); "
        "change vs fifo"
    )
    header = f"{'batch':>5}  {'metric':22s}" + "".join(f"{n:>18s}" for n in names)
    print(header)
    print("-" * len(header))
    for row in results:
        for key, label in (
            ("distinct_experts_per_layer", "distinct experts/layer"),
            ("bytes_copied", "expert MiB copied"),
            ("tokens_per_second", "new tokens/s"),
            ("schedule_seconds", "scheduling s"),
        ):
            base_value = row["fifo"][key]
            cells = []
            for name in names:
                value = row[name][key]
                scale = 2**-20 if key == "bytes_copied" else 1
                cell = f"{value * scale:.2f}"
                if name != "fifo" and base_value and key != "schedule_seconds":
                    cell += f" ({100 * (value - base_value) / base_value:+.1f}%)"
                cells.append(f"{cell:>18s}")
            print(f"{row['batch']:5d}  {label:22s}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
