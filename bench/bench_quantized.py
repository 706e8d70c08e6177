"""Quantized experts on the demo model: accuracy, bytes held and moved, against the float model.

    python bench/bench_quantized.py [--tokens 512] [--window 256] [--decode-tokens 64]
        [--threads 1] [--json] [--out DIR] [--no-synthetic]

Text: the first ``--tokens`` tokens of the held-out part of each of the five corpus domains, cut
into ``--window``-token windows (the demo model was trained on 256-token sequences), all windows
run as one batch. Each expert format (int8, int4 at every group size dividing the demo's
dimensions, fp8, mxfp4) is the demo model offloaded to the CPU with that ``expert_format`` and a
slot budget of ``--slot-share`` of all experts (the same for every format), against the float
model (float32) run whole. Per format:

- perplexity, overall (token-weighted) and per domain, and its change against float in percent;
- greedy-token agreement: the share of evaluated positions whose argmax equals the float model's;
- ``host_bytes`` of the experts (``memory_report``) and its ratio to float32;
- bytes copied per token while decoding: the first ``--decode-tokens`` of each domain's first
  window fed one token at a time (the KV cache reset per domain, the expert cache kept), from a
  freshly offloaded model: ``cache.stats()["bytes_copied"] / tokens`` and its ratio to float;
- for information, ms per token of one whole forward of the evaluation batch (median of
  ``--repeats``) and of the decode steps: the CPU expands every slot with the plain-torch
  reference (native kernels are still to come), so these are not the formats' speed.

A second shape checks the int4 group size (``--synthetic-shape``, Mixtral-8x7B's by default):
one expert's weights, normal and heavy-tailed (Student t, 3 degrees of freedom), quantized
with each format; relative weight error and relative output error of the expert (SwiGLU) on
random inputs. The demo's own experts are measured the same way.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

import expertflow
from expertflow.demo.model import DOMAINS, domain_texts, load_demo_model
from expertflow.runtime.expert_format import codec_for
from expertflow.runtime.experts import offloadable_modules

sys.path.insert(0, str(Path(__file__).parent))
from _timer import median_seconds  # noqa: E402
from bench_generate_batch import default_corpus  # noqa: E402

INT4_GROUPS = (32, 64, 128)
TARGETS = {"int8": 0.5, "int4": 3.0}  # issue 17: perplexity change allowed, percent


def formats_for(hidden: int, intermediate: int) -> tuple[list[tuple[str, str, int | None]], list]:
    """``(formats, notes)``: ``(label, expert_format, group_size)`` of every format the model's
    dimensions allow, and a note for each one left out."""
    dims = (hidden, intermediate)
    rows: list[tuple[str, str, int | None]] = [("int8", "int8", None)]
    notes = []
    for g in INT4_GROUPS:
        if all(d % g == 0 for d in dims):
            rows.append((f"int4 g{g}", "int4", g))
        else:
            notes.append(f"int4 group {g} left out: it does not divide {dims}")
    rows.append(("fp8", "fp8", None))
    if all(d % 32 == 0 for d in dims):
        rows.append(("mxfp4", "mxfp4", None))
    else:
        notes.append(f"mxfp4 left out: {dims} are not multiples of 32")
    return rows, notes


def eval_windows(tokenizer, corpus: Path, tokens: int, window: int) -> dict[str, torch.Tensor]:
    """``{domain: [windows, window]}`` token ids: the first ``tokens`` (rounded down to whole
    windows) of each domain's held-out text."""
    texts = domain_texts(corpus, "held_out")
    out = {}
    for domain in DOMAINS:
        ids = tokenizer(texts[domain])["input_ids"]
        n = min(tokens, len(ids)) // window
        if n == 0:
            raise ValueError(f"{domain}: fewer than {window} held-out tokens")
        out[domain] = torch.tensor(ids[: n * window]).reshape(n, window)
    return out


def forward_logits(model, batch: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float()


def quality(logits: torch.Tensor, batch: torch.Tensor, spans: dict[str, slice]) -> dict:
    """Per domain and overall: summed next-token NLL and its count; the argmax of every
    position (``[windows, window]``)."""
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="none"
    ).reshape(batch.shape[0], -1)
    per_domain = {d: (nll[s].sum().item(), nll[s].numel()) for d, s in spans.items()}
    return {"nll": per_domain, "argmax": logits.argmax(-1)}


def perplexities(nll: dict[str, tuple[float, int]]) -> tuple[float, dict[str, float]]:
    total = sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values())
    return math.exp(total), {d: math.exp(s / n) for d, (s, n) in nll.items()}


def decode_pass(model, windows: dict[str, torch.Tensor], tokens: int) -> tuple[int, float]:
    """Feeds the first ``tokens`` of each domain's first window one at a time (a fresh KV cache
    per domain); returns (tokens fed, seconds)."""
    fed, started = 0, time.perf_counter()
    with torch.no_grad():
        for ids in windows.values():
            seq, past = ids[:1, :tokens], None
            for i in range(seq.shape[1]):
                past = model(input_ids=seq[:, i : i + 1], past_key_values=past, use_cache=True)
                past = past.past_key_values
                fed += 1
    return fed, time.perf_counter() - started


def format_row(base, label, fmt, group, args, batch, windows, spans, slots) -> dict:
    """One offloaded configuration's figures (accuracy still relative to nothing)."""
    model = copy.deepcopy(base)
    expertflow.offload(model, device="cpu", slots=slots, expert_format=fmt, group_size=group)
    cache = model._expertflow.cache
    fed, decode_s = decode_pass(model, windows, args.decode_tokens)
    copied = cache.stats()["bytes_copied"]
    logits = forward_logits(model, batch)
    seconds = median_seconds(
        lambda: forward_logits(model, batch), "cpu", warmup=0, repeats=args.repeats, min_seconds=0
    )
    report = expertflow.memory_report(model)
    q = quality(logits, batch, spans)
    return {
        "format": label,
        "expert_format": fmt,
        "group_size": group,
        "stored_as": report["expert_format"],
        "host_bytes": report["host_bytes"],
        "slots": slots,
        "decode_tokens": fed,
        "bytes_copied_per_token": copied / fed,
        "forward_ms_per_token": 1e3 * seconds / batch.numel(),
        "decode_ms_per_token": 1e3 * decode_s / fed,
        "_quality": q,
    }


def relative_to_float(row: dict, ref: dict, float_row: dict) -> None:
    """Fills ``row``'s perplexity, agreement and ratios against the float model (``ref``: its
    quality; ``float_row``: the float32 experts offloaded)."""
    q = row.pop("_quality")
    ppl, per_domain = perplexities(q["nll"])
    ref_ppl, ref_domain = perplexities(ref["nll"])
    row["perplexity"] = ppl
    row["perplexity_change_percent"] = 100 * (ppl / ref_ppl - 1)
    row["perplexity_per_domain"] = per_domain
    row["perplexity_change_per_domain_percent"] = {
        d: 100 * (per_domain[d] / ref_domain[d] - 1) for d in per_domain
    }
    row["greedy_agreement"] = (q["argmax"] == ref["argmax"]).float().mean().item()
    row["host_bytes_ratio"] = row["host_bytes"] / float_row["host_bytes"]
    row["bytes_copied_ratio"] = row["bytes_copied_per_token"] / float_row["bytes_copied_per_token"]
    target = TARGETS.get(row["expert_format"])
    row["target_percent"] = target
    row["meets_target"] = None if target is None else row["perplexity_change_percent"] <= target


# --- the second shape: one expert's weights, quantized alone ------------------------------------


def swiglu_expert(x, gate_up, down):
    """A Mixtral expert: ``gate_up`` ``[2 * inter, hidden]`` (gate rows first), ``down``
    ``[hidden, inter]``; ``x`` ``[tokens, hidden]``."""
    gate, up = (x @ gate_up.t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ down.t()


def weight_errors(weights: list[tuple[torch.Tensor, torch.Tensor]], codec, gen) -> dict:
    """Relative weight error (Frobenius, over every matrix) and relative output error of each
    expert on random normal inputs (aggregated over the experts) for one codec."""
    w_err = w_norm = y_err = y_norm = 0.0
    for gate_up, down in weights:
        q = [codec.unpack(codec.pack(w), torch.float32) for w in (gate_up, down)]
        for w, wq in zip((gate_up, down), q, strict=True):
            w_err += (w - wq).pow(2).sum().item()
            w_norm += w.pow(2).sum().item()
        x = torch.randn(64, gate_up.shape[1], generator=gen)
        y = swiglu_expert(x, gate_up, down)
        yq = swiglu_expert(x, *q)
        y_err += (y - yq).pow(2).sum().item()
        y_norm += y.pow(2).sum().item()
    return {"weight": math.sqrt(w_err / w_norm), "output": math.sqrt(y_err / y_norm)}


def synthetic_expert(hidden: int, inter: int, kind: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's ``(gate_up, down)``: normal, or Student t with 3 degrees of freedom (heavy
    tails, as trained weights have), scaled like an initialisation (std 1 / sqrt(in))."""

    def draw(rows, cols):
        w = torch.randn(rows, cols, generator=gen)
        if kind == "heavy-tailed":  # t(3) = z / sqrt(chi2(3) / 3)
            chi2 = torch.randn(3, rows, cols, generator=gen).pow(2).sum(0)
            w = w / (chi2 / 3).sqrt()
        return w / math.sqrt(cols)

    return draw(2 * inter, hidden), draw(hidden, inter)


def demo_experts(base) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every expert of the demo model as ``(gate_up, down)`` in ``[out, in]`` orientation."""
    out = []
    for _, module in offloadable_modules(base):
        for e in range(module.num_experts):
            gu, dn = module.gate_up_proj[e].detach(), module.down_proj[e].detach()
            if module.is_transposed:
                gu, dn = gu.t(), dn.t()
            out.append((gu.float().contiguous(), dn.float().contiguous()))
    return out


def second_shape(base, hidden: int, inter: int, seed: int) -> list[dict]:
    """Relative errors of each format on the synthetic shape (both kinds) and the demo's own."""
    gen = torch.Generator().manual_seed(seed)
    cases = [
        (f"{kind} {hidden}x{inter}", [synthetic_expert(hidden, inter, kind, gen)])
        for kind in ("normal", "heavy-tailed")
    ]
    cases.append(("demo experts (all 96)", demo_experts(base)))
    codecs = [("int8", codec_for("int8"))]
    codecs += [(f"int4 g{g}", codec_for("int4", g)) for g in (*INT4_GROUPS, 256)]
    codecs += [("fp8", codec_for("fp8")), ("mxfp4", codec_for("mxfp4"))]
    rows = []
    for name, weights in cases:
        dims = (weights[0][0].shape[1], weights[0][1].shape[1])
        for label, codec in codecs:
            group = getattr(codec, "group_size", None)
            if group is not None and any(d % group for d in dims):
                continue
            errors = weight_errors(weights, codec, torch.Generator().manual_seed(seed))
            rows.append({"weights": name, "format": label, **errors})
    return rows


# --- output -------------------------------------------------------------------------------------


def print_table(result: dict) -> None:
    print(
        f"demo model, {result['tokens']} held-out tokens ({result['tokens_per_domain']} per "
        f"domain, windows of {result['window']}), float32 on the CPU, {result['threads']} "
        f"thread(s); slots {result['slots']} of {result['total_experts']} experts; decode "
        f"{result['decode_tokens']} tokens"
    )
    for note in result["notes"]:
        print(f"  note: {note}")
    f = result["float"]
    print(
        f"float model: perplexity {f['perplexity']:.4f} ("
        + ", ".join(f"{d} {p:.3f}" for d, p in f["perplexity_per_domain"].items())
        + f"), forward {f['forward_ms_per_token']:.3f} ms/token"
    )
    head = (
        f"{'format':12}{'ppl':>9}{'d ppl %':>9}{'target':>8}{'agree %':>9}{'host MiB':>10}"
        f"{'x float':>8}{'B/token':>10}{'x float':>8}{'fwd ms/t':>9}{'dec ms/t':>9}"
    )
    print(head)
    for r in result["rows"]:
        target = "-" if r["target_percent"] is None else f"<={r['target_percent']:g}"
        if r["meets_target"] is False:
            target += "!"
        print(
            f"{r['format']:12}{r['perplexity']:9.4f}{r['perplexity_change_percent']:+9.3f}"
            f"{target:>8}{100 * r['greedy_agreement']:9.2f}{r['host_bytes'] / 2**20:10.2f}"
            f"{r['host_bytes_ratio']:8.3f}{r['bytes_copied_per_token']:10.0f}"
            f"{r['bytes_copied_ratio']:8.3f}{r['forward_ms_per_token']:9.3f}"
            f"{r['decode_ms_per_token']:9.2f}"
        )
    print("perplexity change per domain, percent:")
    print(f"{'format':12}" + "".join(f"{d:>12}" for d in DOMAINS))
    for r in result["rows"]:
        change = r["perplexity_change_per_domain_percent"]
        print(f"{r['format']:12}" + "".join(f"{change[d]:+12.3f}" for d in DOMAINS))
    if result["second_shape"]:
        print("one expert alone: relative error of the weights / of the expert's output")
        for r in result["second_shape"]:
            print(f"  {r['weights']:28}{r['format']:10}{r['weight']:10.5f}{r['output']:10.5f}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--tokens", type=int, default=512, help="held-out tokens per domain")
    parser.add_argument("--window", type=int, default=256, help="tokens per evaluated window")
    parser.add_argument("--decode-tokens", type=int, default=64, help="per domain, one at a time")
    parser.add_argument("--slot-share", type=float, default=0.5, help="slots / all experts")
    parser.add_argument("--repeats", type=int, default=3, help="timed whole forwards")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--synthetic-shape", default="4096,14336", help="hidden,intermediate")
    parser.add_argument("--no-synthetic", action="store_true", help="skip the second shape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write quantized_cpu.json there")
    args = parser.parse_args(argv)
    for name in ("tokens", "window", "decode_tokens", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.slot_share <= 1:
        parser.error("--slot-share must be in (0, 1]")
    if args.window > args.tokens:
        parser.error("--window must be at most --tokens")
    args.decode_tokens = min(args.decode_tokens, args.window)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tokenizer = load_demo_model(torch.float32)
    config = base.config
    windows = eval_windows(tokenizer, args.corpus, args.tokens, args.window)
    batch = torch.cat(list(windows.values()))
    spans, start = {}, 0
    for domain, ids in windows.items():
        spans[domain] = slice(start, start + ids.shape[0])
        start += ids.shape[0]
    total = config.num_hidden_layers * config.num_local_experts
    slots = max(
        config.num_hidden_layers * config.num_experts_per_tok, round(total * args.slot_share)
    )
    rows, notes = formats_for(config.hidden_size, config.intermediate_size)

    ref_logits = forward_logits(base, batch)
    ref_s = median_seconds(
        lambda: forward_logits(base, batch), "cpu", warmup=0, repeats=args.repeats, min_seconds=0
    )
    ref = quality(ref_logits, batch, spans)
    del ref_logits
    ppl, per_domain = perplexities(ref["nll"])
    float_row = format_row(base, "float32", "auto", None, args, batch, windows, spans, slots)
    measured = [float_row] + [
        format_row(base, label, fmt, g, args, batch, windows, spans, slots)
        for label, fmt, g in rows
    ]
    for row in measured:
        relative_to_float(row, ref, float_row)
    hidden, inter = (int(v) for v in args.synthetic_shape.split(","))
    result = {
        "model": "expertflow demo (MixtralForCausalLM, 6 layers x 16 experts, hidden 256, "
        "intermediate 128)",
        "tokens": batch.numel(),
        "tokens_per_domain": args.tokens // args.window * args.window,
        "window": args.window,
        "threads": args.threads,
        "slots": slots,
        "total_experts": total,
        "decode_tokens": args.decode_tokens * len(windows),
        "notes": notes,
        "float": {
            "perplexity": ppl,
            "perplexity_per_domain": per_domain,
            "forward_ms_per_token": 1e3 * ref_s / batch.numel(),
        },
        "rows": measured,
        "second_shape": [] if args.no_synthetic else second_shape(base, hidden, inter, args.seed),
    }
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quantized_cpu.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
