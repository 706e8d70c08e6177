"""Train the bundled demo MoE model on the five-domain corpus.

    python -m expertflow.demo.training --corpus ../shared/data/corpus --out DIR

Trains a byte-level BPE tokenizer (``tokenizers``) and a small ``MixtralForCausalLM`` (shape in
:func:`expertflow.demo.model.demo_model_config`, router load-balancing loss on) on the first 90%
of every corpus file; prints the loss curve and the held-out perplexity per domain, and writes
``config.json``, ``model.safetensors`` (bf16), the tokenizer files and ``training.json`` (the
curves, timings and perplexities) to ``--out``. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from expertflow.demo.model import demo_model_config, domain_texts

EOS = "<|endoftext|>"


def train_tokenizer(texts: dict[str, str], vocab_size: int):
    """A byte-level BPE tokenizer (GPT-2 style: every byte is a symbol, so any text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        (line for text in texts.values() for line in text.splitlines(True)), trainer=trainer
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, model_max_length=1024
    )


def encode_domains(tokenizer, texts: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for domain, text in texts.items():
        # Encoded in line batches: one call on megabytes of text is slow in the fast tokenizer.
        lines = text.splitlines(True)
        chunks = ["".join(lines[i : i + 2000]) for i in range(0, len(lines), 2000)]
        encoded = tokenizer.backend_tokenizer.encode_batch(chunks)
        ids = [i for enc in encoded for i in enc.ids]
        out[domain] = torch.tensor(ids, dtype=torch.long)
    return out


def sample_batch(streams, batch_size, seq_len, gen) -> torch.Tensor:
    """``batch_size`` windows of ``seq_len + 1`` tokens, each from a uniformly drawn domain, so
    every domain gets the same share of training whatever its size."""
    domains = list(streams)
    rows = []
    for _ in range(batch_size):
        ids = streams[domains[int(torch.randint(len(domains), (1,), generator=gen))]]
        start = int(torch.randint(len(ids) - seq_len - 1, (1,), generator=gen))
        rows.append(ids[start : start + seq_len + 1])
    return torch.stack(rows)


@torch.no_grad()
def held_out_perplexity(model, streams, seq_len, max_windows) -> dict[str, float]:
    """Per-domain perplexity over up to ``max_windows`` consecutive non-overlapping windows."""
    model.eval()
    result = {}
    for domain, ids in streams.items():
        n = min(max_windows, (len(ids) - 1) // seq_len)
        windows = ids[: n * seq_len + 1]
        inputs = windows[:-1].view(n, seq_len)
        labels = windows[1:].view(n, seq_len)
        total = 0.0
        for i in range(0, n, 16):
            logits = model(input_ids=inputs[i : i + 16]).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), labels[i : i + 16].flatten(), reduction="sum"
            ).item()
        result[domain] = math.exp(total / (n * seq_len))
    model.train()
    return result


@torch.no_grad()
def revive_dead_experts(model, streams, seq_len: int, gen, windows: int = 128) -> list:
    """Experts the router (nearly) never picks on a sample of training text get a copy of their
    layer's busiest expert (weights and router row, slightly perturbed), so the two split its
    tokens and the further training makes them diverge (expert splitting). Returns the
    (layer, revived expert, donor) triples."""
    batch = torch.cat([sample_batch(streams, 16, seq_len, gen) for _ in range(windows // 16)])
    out = model(input_ids=batch[:, :-1], output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    revived = []
    for layer, logits in enumerate(out.router_logits):
        experts = logits.shape[-1]
        counts = torch.bincount(logits.topk(top_k, dim=-1).indices.flatten(), minlength=experts)
        # "Dead": under a tenth of a fair share; such an expert may see no held-out token.
        dead = [e for e in range(experts) if counts[e] < 0.1 * counts.sum() / experts]
        donors = [int(e) for e in counts.argsort(descending=True)]
        block = model.model.layers[layer].mlp
        for d, donor in zip(dead, donors, strict=False):
            for name in ("gate_up_proj", "down_proj"):
                w = getattr(block.experts, name)
                w[d] = w[donor] * (1 + 0.01 * torch.randn(w[donor].shape, generator=gen))
            g = block.gate.weight
            g[d] = g[donor] + 0.01 * g[donor].abs().mean() * torch.randn(g.shape[1], generator=gen)
            revived.append((layer, d, donor))
    return revived


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _tokenized_corpus(args: argparse.Namespace, out: Path):
    """The tokenizer (trained, or the one of ``--init-from``) and the train / held-out ids of
    each domain."""
    train_texts = domain_texts(args.corpus, "train")
    held_texts = domain_texts(args.corpus, "held_out")
    if args.init_from:
        # A further phase on a trained model: same tokenizer, same weights to start from.
        from expertflow.demo.model import load_demo_tokenizer

        tokenizer = load_demo_tokenizer(args.init_from)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    tokenizer.save_pretrained(str(out))
    train_ids = encode_domains(tokenizer, train_texts)
    held_ids = encode_domains(tokenizer, held_texts)
    print(
        "tokens (train / held-out): "
        + ", ".join(f"{d} {len(train_ids[d])}/{len(held_ids[d])}" for d in train_ids),
        flush=True,
    )
    return tokenizer, train_ids, held_ids


def _model_for_training(args: argparse.Namespace, vocab_size: int):
    """A new demo model, or the ``--init-from`` one, set up for training."""
    from transformers import MixtralForCausalLM

    if args.init_from:
        model = MixtralForCausalLM.from_pretrained(
            args.init_from, dtype=torch.float32, local_files_only=True
        )
        config = model.config
    else:
        config = demo_model_config(vocab_size)
    if args.aux_loss_coef is not None:
        config.router_aux_loss_coef = args.aux_loss_coef
    config.output_router_logits = True
    config._experts_implementation = args.experts_implementation
    if not args.init_from:
        model = MixtralForCausalLM(config)
    model.train()
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{config.num_hidden_layers} layers x {config.num_local_experts} experts "
        f"(top-{config.num_experts_per_tok})",
        flush=True,
    )
    return model


def _optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW, with weight decay on matrices only."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )


def _train_step(model, optim, batch: torch.Tensor) -> tuple[float, float]:
    """One optimiser step on ``batch`` [B, seq_len + 1]; returns (LM loss, router aux loss)."""
    outputs = model(input_ids=batch[:, :-1], output_router_logits=True)
    lm_loss = torch.nn.functional.cross_entropy(
        outputs.logits.flatten(0, 1), batch[:, 1:].flatten()
    )
    loss = lm_loss + model.config.router_aux_loss_coef * outputs.aux_loss
    optim.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optim.step()
    return lm_loss.item(), outputs.aux_loss.item()


def _training_loop(args, model, optim, train_ids, held_ids, gen) -> tuple[list, list]:
    """``args.steps`` steps with a logged loss curve and periodic held-out perplexity."""
    curve, evals = [], []
    started = time.perf_counter()
    running = running_aux = 0.0
    for step in range(args.steps):
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        batch = sample_batch(train_ids, args.batch_size, args.seq_len, gen)
        lm_loss, aux_loss = _train_step(model, optim, batch)
        running, running_aux = running + lm_loss, running_aux + aux_loss
        if (step + 1) % args.log_every == 0:
            elapsed = time.perf_counter() - started
            entry = {
                "step": step + 1,
                "loss": running / args.log_every,
                "aux_loss": running_aux / args.log_every,
                "seconds": round(elapsed, 1),
            }
            curve.append(entry)
            running = running_aux = 0.0
            tok_s = (step + 1) * args.batch_size * args.seq_len / elapsed
            print(
                f"step {step + 1:5d}  loss {entry['loss']:.3f}  aux {entry['aux_loss']:.3f}  "
                f"{tok_s:.0f} tok/s  {elapsed / 60:.1f} min",
                flush=True,
            )
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            ppl = held_out_perplexity(model, held_ids, args.seq_len, args.eval_windows)
            evals.append({"step": step + 1, "perplexity": ppl})
            print(
                f"held-out perplexity at step {step + 1}: "
                + ", ".join(f"{d} {p:.1f}" for d, p in ppl.items()),
                flush=True,
            )
    return curve, evals


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tokenizer, train_ids, held_ids = _tokenized_corpus(args, out)
    model = _model_for_training(args, len(tokenizer))
    optim = _optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    revived = []
    if args.revive_dead_experts:
        revived = revive_dead_experts(model, train_ids, args.seq_len, gen)
        print(f"revived {len(revived)} dead experts (layer, expert, donor): {revived}", flush=True)
    train_started = time.perf_counter()
    curve, evals = _training_loop(args, model, optim, train_ids, held_ids, gen)
    train_minutes = round((time.perf_counter() - train_started) / 60, 1)

    config = model.config
    config.output_router_logits = False
    config._experts_implementation = None
    model.to(torch.bfloat16).save_pretrained(str(out))
    previous = None
    if args.init_from and (Path(args.init_from) / "training.json").is_file():
        previous = json.loads((Path(args.init_from) / "training.json").read_text())
    report = {
        "init_from": str(args.init_from) if args.init_from else None,
        "previous_phase": previous,
        "router_aux_loss_coef": config.router_aux_loss_coef,
        "revived_experts": revived,
        "seed": args.seed,
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": {d: len(t) for d, t in train_ids.items()},
        "held_out_tokens": {d: len(t) for d, t in held_ids.items()},
        "tokens_seen": args.steps * args.batch_size * args.seq_len,
        "train_minutes": train_minutes,
        "total_minutes": round((time.perf_counter() - started) / 60, 1),
        "loss_curve": curve,
        "evals": evals,
        "held_out_perplexity": evals[-1]["perplexity"] if evals else None,
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out} in {report['total_minutes']} min", flush=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m expertflow.demo.training", description=__doc__.splitlines()[0]
    )
    p.add_argument("--corpus", required=True, help="directory of *.txt files, one per domain")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per domain")
    p.add_argument("--init-from", help="continue from this trained model (and its tokenizer)")
    p.add_argument("--aux-loss-coef", type=float, help="router load-balancing loss weight")
    p.add_argument(
        "--revive-dead-experts",
        action="store_true",
        help="first give experts the router (nearly) never picks a copy of their layer's busiest",
    )
    p.add_argument(
        "--experts-implementation",
        default="grouped_mm",
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers' experts kernel used for training",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "seq_len",
        "vocab_size",
        "threads",
        "log_every",
        "eval_every",
        "eval_windows",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    train(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
