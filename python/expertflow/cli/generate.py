"""``expertflow generate``: one prompt, its continuation streamed to stdout as it is made.

stdout carries only the text (so it can be piped); the model's summary line and the reply's
speed go to stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys

from expertflow.cli.model_options import add_model_options, add_sampling_options, load


def run(args: argparse.Namespace) -> int:
    from expertflow.cli.common import check_positive
    from expertflow.serving.engine import Engine
    from expertflow.serving.loading import check_sampling, summary_line
    from expertflow.serving.streaming import Reply, TextStream, stream_reply

    check_positive(args, "max_tokens")
    check_sampling(args.temperature, args.top_p, args.seed)
    text = _prompt_text(args)
    loaded = load(args)
    print(summary_line(loaded), file=sys.stderr, flush=True)
    ids = list(loaded.tokenizer.encode(text))
    if not ids:
        raise ValueError("the prompt has no tokens")
    sampling = loaded.sampling_for(args.temperature, args.top_p, args.seed)
    reply, stream = Reply(), TextStream(loaded.tokenizer)
    room = _room(args.max_tokens, len(ids), loaded.context)
    # Ctrl-C ends the program, but after the decode step under way (as chat's stops a reply):
    # the text so far and the summary are still printed, and the status is 130.
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    try:
        with Engine(
            loaded.model, batch_size=1, active_batches=1, eos_token_id=sorted(loaded.eos)
        ) as engine:
            for token in stream_reply(engine, ids, reply, max_new_tokens=room, sampling=sampling,
                                      cancelled=lambda: bool(interrupted)):  # fmt: skip
                sys.stdout.write(stream.push(token))
                sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    print(reply_line(reply), file=sys.stderr)
    return 130 if interrupted else 0


def reply_line(reply) -> str:
    """``[12 tokens, 31.4 tokens/s, hit ratio 0.87, stop]``; with CPU experts also
    ``, 40 experts on the CPU`` (the hit ratio counts the slots' lookups only)."""
    speed = reply.tokens_per_second
    hits = reply.hit_ratio
    cpu = f", {reply.cpu_experts} experts on the CPU" if reply.cpu_experts else ""
    return (
        f"[{len(reply.tokens)} tokens, {speed or 0:.1f} tokens/s, hit ratio "
        f"{'-' if hits is None else f'{hits:.2f}'}{cpu}, {reply.finish}]"
    )


def _room(max_tokens: int, prompt: int, context: int | None) -> int:
    if context is not None and prompt >= context:
        raise ValueError(f"the prompt has {prompt} tokens, the model's context is {context}")
    return max_tokens if context is None else min(max_tokens, context - prompt)


def _prompt_text(args: argparse.Namespace) -> str:
    if args.file is None:
        return args.prompt
    if args.file == "-":
        return sys.stdin.read()
    with open(args.file, encoding="utf-8") as f:
        return f.read()


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate", help="continue one prompt, streamed to stdout",
        description="Continue one prompt with an offloaded model, streamed to stdout.",
    )  # fmt: skip
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the text to continue")
    source.add_argument("--file", help="a file holding the text to continue ('-': stdin)")
    add_model_options(p)
    add_sampling_options(p, max_tokens=128)
    p.set_defaults(run=run)
