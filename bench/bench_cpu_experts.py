"""expertflow.ops.cpu_expert on a Mixtral-shaped expert in every host format, against the
memory read bandwidth measured in the same run and against torch's own CPU path.

At one token an expert is one pass over its bytes, so the figure of merit is weight bytes per
second against the read bandwidth (a streaming sum over a buffer far larger than the caches).
torch's path is what OffloadedExperts runs today: the float weights through F.linear, silu and
F.linear; packed formats first expanded to bf16 by the formats' references.

    python bench/bench_cpu_experts.py [--small] [--json] [--formats bf16,int4] [--tokens 1,4,16]
        [--threads N]

The JSON object: {"read_gbps": R, "rows": [{"format", "tokens", "ms", "gbps", "torch_ms"}]}
(gbps: the expert's packed bytes per second; read_gbps with the same threads).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timer import median_seconds  # noqa: E402

import expertflow  # noqa: E402, F401  (loads the ops)
from expertflow import formats, ops  # noqa: E402

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8", "mxfp4")
FLOAT = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INT4_GROUP = 64


def read_bandwidth(nbytes: int) -> float:
    """Bytes/s of a streaming read: a sum over ``nbytes`` of float32, all threads."""
    buf = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    seconds = median_seconds(lambda: buf.sum(), "cpu", warmup=2, repeats=10, min_seconds=1.0)
    return nbytes / seconds


def random_weight(fmt: str, out: int, inp: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random codes and plausible scales in ``fmt``'s layout (timing needs no trained values)."""
    if fmt in FLOAT:
        return [(torch.randn(out, inp, generator=gen) * 0.02).to(FLOAT[fmt])]

    def rand_bytes(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)

    if fmt == "int8":
        q = torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=gen)
        return [q, torch.rand(out, generator=gen) * 1e-3]
    if fmt == "int4":
        return [rand_bytes(out, inp // 2), torch.rand(out, inp // INT4_GROUP, generator=gen) / 300]
    if fmt == "fp8":
        b = rand_bytes(out, inp)
        b[(b & 0x7F) == 0x7F] = 0  # no NaN codes
        tiles = (-(-out // 128), -(-inp // 128))
        return [b.view(torch.float8_e4m3fn), torch.rand(tiles, generator=gen) * 1e-4]
    e = torch.randint(118, 122, (out, inp // 32), dtype=torch.uint8, generator=gen)
    return [rand_bytes(out, inp // 32, 16), e]


def dequantized(fmt: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """What OffloadedExperts multiplies today: the weight expanded to bf16."""
    if fmt in FLOAT:
        return parts[0]
    if fmt == "int8":
        return formats.dequantize_int8(*parts, torch.bfloat16)
    if fmt == "int4":
        return formats.dequantize_int4(*parts, INT4_GROUP, torch.bfloat16)
    if fmt == "fp8":
        return formats.dequantize_fp8_block(*parts, dtype=torch.bfloat16)
    return formats.dequantize_mxfp4(*parts, torch.bfloat16)


def torch_expert(fmt, up, down, x):
    w_up, w_down = dequantized(fmt, up), dequantized(fmt, down)
    h = F.linear(x.to(w_up.dtype), w_up)
    gate, u = h.chunk(2, dim=-1)
    return F.linear(F.silu(gate) * u, w_down)


def bench_format(fmt, hidden, inter, tokens, gen, torch_repeats):
    up = random_weight(fmt, 2 * inter, hidden, gen)
    down = random_weight(fmt, hidden, inter, gen)
    nbytes = sum(t.numel() * t.element_size() for t in up + down)
    op_fmt = "float" if fmt in FLOAT else fmt
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, generator=gen).to(FLOAT.get(fmt, torch.bfloat16))
        ours = median_seconds(
            lambda x=x: ops.cpu_expert(x, up, down, format=op_fmt),
            "cpu",
            warmup=2,
            repeats=7,
            min_seconds=0.5,
        )
        # Expanding a packed expert takes seconds: fewer runs there (and no warm-up).
        base = median_seconds(
            lambda x=x: torch_expert(fmt, up, down, x),
            "cpu",
            warmup=1 if fmt in FLOAT else 0,
            repeats=torch_repeats if fmt in FLOAT else 1,
            min_seconds=0.0,
        )
        rows.append(
            {
                "format": fmt,
                "tokens": t,
                "ms": ours * 1e3,
                "gbps": nbytes / ours / 1e9,
                "torch_ms": base * 1e3,
            }
        )
    return rows


def print_table(read_gbps, rows, file):
    print(f"read bandwidth: {read_gbps:.2f} GB/s ({torch.get_num_threads()} threads)", file=file)
    print(
        f"{'format':>7} {'T':>3} {'ms':>9} {'GB/s':>7} {'of read':>8} {'torch ms':>9} "
        f"{'speedup':>8} {'vs T=1':>7}",
        file=file,
    )
    first = {r["format"]: r["ms"] for r in rows if r["tokens"] == min(x["tokens"] for x in rows)}
    for r in rows:
        print(
            f"{r['format']:>7} {r['tokens']:>3} {r['ms']:>9.2f} {r['gbps']:>7.2f} "
            f"{r['gbps'] / read_gbps:>8.2f} {r['torch_ms']:>9.2f} "
            f"{r['torch_ms'] / r['ms']:>8.2f} {r['ms'] / first[r['format']]:>7.2f}",
            file=file,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 1024 x 3584 expert, quick")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--tokens", default="1,4,16")
    parser.add_argument("--torch-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads: expected a positive int, got {args.threads}")
        torch.set_num_threads(args.threads)
    fmts = [f for f in args.formats.split(",") if f]
    bad = [f for f in fmts if f not in FORMATS]
    if bad:
        parser.error(f"--formats: unknown {bad}; choose from {', '.join(FORMATS)}")
    tokens = [int(t) for t in args.tokens.split(",")]
    hidden, inter = (1024, 3584) if args.small else (4096, 14336)
    nbytes = (256 if args.small else 1024) << 20
    # Measured before and after the experts: on a shared machine the two differ; the ceiling
    # is the larger.
    before = read_bandwidth(nbytes) / 1e9
    gen = torch.Generator().manual_seed(0)
    rows = []
    for fmt in fmts:
        rows += bench_format(fmt, hidden, inter, tokens, gen, args.torch_repeats)
        gc.collect()  # the format's expert is freed before the next is made
    after = read_bandwidth(nbytes) / 1e9
    read_gbps = max(before, after)
    print(f"read bandwidth before {before:.2f} GB/s, after {after:.2f} GB/s", file=sys.stderr)
    if args.json:
        print(json.dumps({"read_gbps": read_gbps, "rows": rows}))
    print_table(read_gbps, rows, sys.stderr if args.json else sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
