"""``expertflow trace``: record a model's routing on text files into a trace."""

from __future__ import annotations

import argparse
import sys

from expertflow.cli.common import check_device, check_output_file, check_positive, load_model


def _text_prompts(tokenizer, files, skip_fraction, end_fraction, prompt_tokens, max_sequences):
    """Consecutive ``prompt_tokens``-long windows of each file (between ``skip_fraction`` and
    ``end_fraction`` of its length), at most ``max_sequences`` per file, labelled with the
    file's stem."""
    from pathlib import Path

    prompts, sources = [], []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"--text: {name} is not a file")
        text = path.read_text(encoding="utf-8", errors="replace")
        text = text[int(len(text) * skip_fraction) : int(len(text) * end_fraction)]
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
        windows = [ids[i : i + prompt_tokens] for i in range(0, len(ids), prompt_tokens)]
        windows = [w for w in windows if len(w) == prompt_tokens][:max_sequences]
        if not windows:
            raise ValueError(f"--text: {name} has fewer than {prompt_tokens} tokens to trace")
        prompts += windows
        sources += [path.stem] * len(windows)
    return prompts, sources


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from expertflow.traces.format import save_trace
    from expertflow.traces.recording import record_routing

    if not 0 <= args.skip_fraction < args.end_fraction <= 1:
        raise ValueError(
            "--skip-fraction and --end-fraction must satisfy 0 <= skip < end <= 1, got "
            f"{args.skip_fraction} and {args.end_fraction}"
        )
    check_positive(args, "prompt_tokens", "max_sequences", "batch_size")
    check_positive(args, "generate", minimum=0)
    check_output_file("--out", args.out)  # before the recording, which can take hours
    check_device("--device", args.device)
    model, tokenizer = load_model(args.model, args.device)
    prompts, sources = _text_prompts(
        tokenizer,
        args.text,
        args.skip_fraction,
        args.end_fraction,
        args.prompt_tokens,
        args.max_sequences,
    )
    bar = tqdm(total=len(prompts), unit="seq", desc="tracing", file=sys.stderr)

    def progress(done, total):
        bar.update(done - bar.n)

    try:
        trace = record_routing(
            model,
            prompts,
            generate=args.generate,
            batch_size=args.batch_size,
            pad_token_id=tokenizer.pad_token_id or 0,
            sources=sources,
            progress=progress,
            lookahead=args.lookahead,
        )
    finally:
        bar.close()
    if args.model == "demo":
        trace.meta["model"] = "expertflow-demo-moe"
    save_trace(trace, args.out)
    print(
        f"wrote {args.out}: {trace.num_tokens} tokens ({sum(trace.meta['prefill'])} prompt), "
        f"{len(prompts)} sequences, {trace.num_layers} layers x {trace.num_experts} experts"
    )
    return 0


def add_parser(sub) -> None:
    tp = sub.add_parser("trace", help="record a model's routing on text files into a trace")
    tp.add_argument(
        "--model", default="demo",
        help="'demo' (the bundled model, the default) or a local checkpoint folder",
    )  # fmt: skip
    tp.add_argument(
        "--text", nargs="+", required=True,
        help="text files to trace; each file's name (without suffix) labels its sequences",
    )  # fmt: skip
    tp.add_argument("--out", required=True, help="trace .npz to write (atomically)")
    tp.add_argument(
        "--generate", type=int, default=0,
        help="greedy tokens to generate (and trace) after each prompt (default: %(default)s)",
    )  # fmt: skip
    tp.add_argument(
        "--batch-size", type=int, default=8, help="prompts per forward pass (default: %(default)s)"
    )
    tp.add_argument(
        "--prompt-tokens", type=int, default=128, help="tokens per prompt (default: %(default)s)"
    )
    tp.add_argument(
        "--max-sequences", type=int, default=32,
        help="most prompts per text file (default: %(default)s)",
    )  # fmt: skip
    tp.add_argument(
        "--skip-fraction",
        type=float,
        default=0.0,
        help="start reading each file at this fraction (0.9: a corpus file's held-out 10%%; "
        "default: %(default)s)",
    )
    tp.add_argument(
        "--end-fraction",
        type=float,
        default=1.0,
        help="stop reading each file at this fraction (0.9: the training part, no held-out text; "
        "default: %(default)s)",
    )
    tp.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N to run the model on (default: cpu)"
    )
    tp.add_argument(
        "--lookahead", action="store_true", help="also record what gate lookahead would pick"
    )
    tp.set_defaults(run=run)
