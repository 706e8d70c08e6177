"""Decode tokens/s of an offloaded MoE model with cpu_experts="never", "always" and "auto".

A randomly initialised Mixtral-style model (size set by the flags) is offloaded with
``expertflow.offload(model, device=DEVICE, slots=N, cpu_experts=MODE)`` at 25% and 50% of all
experts as slots; one model per (slots, mode), all built up front and warmed up. Each repeat
runs every configuration once (greedy ``generate`` from the same 32-token prompt), in an order
rotated by one per repeat, so that the shared CPU's drift falls on all of them alike. Measured
per configuration: decode tokens/s (the prompt's forward excluded: from the first generated
token's logits to the last), median, min and max over the repeats, and the ratio of medians
against "never" at the same slots; whether the generated ids equal "never"'s; the share of
decode's expert runs computed on the CPU (``OffloadedExperts.cpu_expert_runs``); and the expert
bytes read per second (2 experts x layers x one expert's host-store bytes x tokens/s) against the
host memory read bandwidth measured in the same run (bench_cpu_experts.read_bandwidth).

    OMP_NUM_THREADS=1 PYTHONPATH=python python bench/bench_cpu_experts_decode.py [--layers 4]
        [--hidden 1024] [--intermediate 3584] [--experts 8] [--tokens 16] [--repeats 5]
        [--dtype bf16|fp32] [--expert-format auto] [--device cpu|cuda] [--json]

On ``--device cuda`` (bench/gpu_check.sh) the GPU runs the non-expert layers, the hits and the
copies, and "auto" overlaps the CPU's share with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu_experts import read_bandwidth  # noqa: E402
from bench_offload import build  # noqa: E402

import expertflow  # noqa: E402
from expertflow.runtime.offloaded import OffloadedExperts  # noqa: E402

MODES = ("never", "always", "auto")
SHARES = (0.25, 0.5)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
PROMPT_TOKENS = 32
READ_BYTES = 256 << 20


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


class Config:
    """One offloaded model and its counters: expert runs (distinct experts per forward of each
    OffloadedExperts) and CPU expert runs, read at each generated token's logits."""

    def __init__(self, base, slots: int, mode: str, expert_format: str, device: str):
        import transformers

        self.slots, self.mode = slots, mode
        self.model = copy.deepcopy(base)
        expertflow.offload(
            self.model, device=device, slots=slots, cpu_experts=mode, expert_format=expert_format
        )
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.modules = [m for m in self.model.modules() if isinstance(m, OffloadedExperts)]
        self.expert_runs = 0
        for m in self.modules:
            m.register_forward_pre_hook(self._count, with_kwargs=True)
        cache = self.model._expertflow.cache
        self.expert_bytes = sum(t.numel() * t.element_size() for t in cache.host_expert(0, 0))
        hybrid = self.modules[0]._hybrid
        self.rates = None
        if hybrid is not None:
            self.rates = {
                k: round(getattr(hybrid, k), 2)
                for k in ("link_gbps", "cpu_gbps", "cpu_gflops", "device_gbps")
            }
        owner = self

        class Marks(transformers.LogitsProcessor):
            def __call__(self, input_ids, scores):
                owner.sync()  # the token's work done, not only launched
                owner.marks.append((time.perf_counter(), owner.cpu_runs(), owner.expert_runs))
                return scores

        self.processors = transformers.LogitsProcessorList([Marks()])
        self.tps, self.shares, self.cpu_per_generate, self.ids = [], [], [], None

    def _count(self, module, args, kwargs):
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        self.expert_runs += int(torch.unique(index).numel())

    def cpu_runs(self) -> int:
        return sum(m.cpu_expert_runs for m in self.modules)

    def generate(self, ids, tokens: int):
        self.marks = []
        cpu_before = self.cpu_runs()
        out = self.model.generate(
            input_ids=ids,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            logits_processor=self.processors,
        )
        (t0, cpu0, runs0), (t1, cpu1, runs1) = self.marks[0], self.marks[-1]
        self.cpu_per_generate.append(self.cpu_runs() - cpu_before)
        return (
            out[0, ids.shape[1] :].tolist(),
            (len(self.marks) - 1) / (t1 - t0),
            ((cpu1 - cpu0) / max(1, runs1 - runs0)),
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=4)
    parser.add_argument("--hidden", type=positive_int, default=1024)
    parser.add_argument("--intermediate", type=positive_int, default=3584)
    parser.add_argument("--experts", type=positive_int, default=8)
    parser.add_argument("--tokens", type=positive_int, default=16, help="new tokens per generate")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--expert-format", default="auto", help="offload's expert_format")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="offload's device")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (decode is timed between generated tokens)")
    if args.experts < 2:
        parser.error("--experts must be at least 2 (the model routes to 2 experts a token)")
    total = args.layers * args.experts
    torch.set_grad_enabled(False)

    read_before = read_bandwidth(READ_BYTES)
    base = build(args, DTYPES[args.dtype])
    configs = []
    budgets = sorted({max(2 * args.layers, int(total * share)) for share in SHARES})
    for slots in budgets:  # a pool per layer needs top-k slots: small shapes may merge budgets
        for mode in MODES:
            configs.append(Config(base, slots, mode, args.expert_format, args.device))
    del base
    ids = torch.randint(0, 32000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    ids = ids.to(args.device)
    for c in configs:
        c.generate(ids, 2)  # warm-up
    for r in range(args.repeats):
        k = r % len(configs)
        for c in configs[k:] + configs[:k]:
            out, tps, share = c.generate(ids, args.tokens)
            c.ids = c.ids or out
            c.tps.append(tps)
            c.shares.append(share)
    read_after = read_bandwidth(READ_BYTES)
    read_bps = max(read_before, read_after)

    rows = []
    for c in configs:
        never = next(x for x in configs if x.slots == c.slots and x.mode == "never")
        med = statistics.median(c.tps)
        bytes_per_token = 2 * args.layers * c.expert_bytes
        rows.append(
            {
                "slots": c.slots,
                "slots_percent": 100 * c.slots / total,
                "mode": c.mode,
                "median_tps": med,
                "min_tps": min(c.tps),
                "max_tps": max(c.tps),
                "vs_never": med / statistics.median(never.tps),
                "same_tokens": c.ids == never.ids,
                "cpu_share": statistics.median(c.shares),
                "cpu_runs_per_generate": c.cpu_per_generate[1:],
                "expert_bytes_per_token": bytes_per_token,
                "of_read_bandwidth": bytes_per_token * med / read_bps,
                "rates": c.rates,
                "tps": c.tps,
            }
        )
    mismatch = [r for r in rows if not r["same_tokens"]]
    names = "layers hidden intermediate experts tokens repeats dtype expert_format device".split()
    result = {k: getattr(args, k) for k in names}
    result |= {
        "threads": torch.get_num_threads(),
        "read_gbps": read_bps / 1e9,
        "read_gbps_before_after": [read_before / 1e9, read_after / 1e9],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)
    if mismatch and args.dtype == "fp32":
        print("error: fp32 ids differ from 'never':", [(r["slots"], r["mode"]) for r in mismatch])
        return 1
    return 0


def print_table(res) -> None:
    print(
        f"decode, batch 1, prompt {PROMPT_TOKENS}, {res['tokens']} new tokens x {res['repeats']} "
        f"interleaved repeats; {res['layers']} layers x {res['experts']} experts, hidden "
        f"{res['hidden']}, intermediate {res['intermediate']}, {res['dtype']}, expert_format "
        f"{res['expert_format']}, device {res['device']}, {res['threads']} threads"
    )
    before, after = res["read_gbps_before_after"]
    print(f"host read bandwidth: {before:.2f} GB/s before, {after:.2f} GB/s after (limit: max)")
    print(
        f"{'slots':>9} {'mode':>6} {'tok/s':>7} {'min':>6} {'max':>6} {'vs never':>8} "
        f"{'same ids':>8} {'cpu share':>9} {'GB/s':>6} {'of read':>7}"
    )
    for r in res["rows"]:
        gbps = r["expert_bytes_per_token"] * r["median_tps"] / 1e9
        print(
            f"{r['slots']:>3} ({r['slots_percent']:>2.0f}%) {r['mode']:>6} {r['median_tps']:>7.2f} "
            f"{r['min_tps']:>6.2f} {r['max_tps']:>6.2f} {r['vs_never']:>8.2f} "
            f"{'yes' if r['same_tokens'] else 'no':>8} {r['cpu_share']:>9.2f} {gbps:>6.2f} "
            f"{r['of_read_bandwidth']:>7.2f}"
        )
    print(
        f"expert bytes per token: {res['rows'][0]['expert_bytes_per_token'] / 2**20:.1f} MiB "
        "(2 experts x layers); GB/s = that x tok/s; cpu share = decode's expert runs on the CPU"
    )
    for r in res["rows"]:
        if r["mode"] == "auto":
            rates = r["rates"] or "none (calibration failed: every miss copied)"
            print(f"auto at {r['slots']} slots: cpu_expert_runs per generate "
                  f"{r['cpu_runs_per_generate']}, rates {rates}")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
