"""``expertflow chat``: an interactive conversation in the terminal.

The conversation is formatted with the checkpoint's chat template; the demo model's tokenizer
has none, so its turns are plain text, one per line, continued by the model (it is a text
model, not a chat model). Replies stream as they are made. ``/reset`` forgets the
conversation, ``/exit`` (or end of input) quits. Ctrl-C during a reply stops that reply, not
the program: the step under way finishes (a forward pass is never cut in the middle, which
could leave the cache's slots pinned) and the reply keeps what it has.
"""

from __future__ import annotations

import argparse
import signal
import sys

from expertflow.cli.model_options import add_model_options, add_sampling_options, load


def run(args: argparse.Namespace) -> int:
    from expertflow.cli.common import check_positive
    from expertflow.serving.chat_format import has_template
    from expertflow.serving.engine import Engine
    from expertflow.serving.loading import check_sampling, summary_line

    check_positive(args, "max_tokens")
    check_sampling(args.temperature, args.top_p, args.seed)
    loaded = load(args)
    template = "chat template" if has_template(loaded.tokenizer) else "no chat template: plain text"
    print(f"{summary_line(loaded)}; {template}; /reset, /exit", file=sys.stderr, flush=True)
    history: list[dict] = []
    with Engine(
        loaded.model, batch_size=1, active_batches=1, eos_token_id=sorted(loaded.eos)
    ) as engine:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(/exit to quit)", file=sys.stderr)
                continue
            command = line.strip()
            if command == "/exit":
                return 0
            if command == "/reset":
                history.clear()
                print("(conversation reset)", file=sys.stderr)
                continue
            if not command:
                continue
            history.append({"role": "user", "content": line})
            text = _reply(engine, loaded, history, args)
            history.append({"role": "assistant", "content": text})


def _reply(engine, loaded, history: list[dict], args) -> str:
    """Streams one reply to stdout; returns its text."""
    from expertflow.cli.generate import reply_line
    from expertflow.serving.chat_format import chat_ids
    from expertflow.serving.streaming import Reply, TextStream, stream_reply

    ids = chat_ids(loaded.tokenizer, history)
    room = (
        args.max_tokens
        if loaded.context is None
        else min(args.max_tokens, loaded.context - len(ids))
    )
    if room < 1:
        print("(the conversation fills the model's context: /reset)", file=sys.stderr)
        history.pop()
        return ""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    reply, stream = Reply(), TextStream(loaded.tokenizer)
    try:
        sampling = loaded.sampling_for(args.temperature, args.top_p, args.seed)
        tokens = stream_reply(engine, ids, reply, max_new_tokens=room, sampling=sampling,
                              cancelled=lambda: bool(interrupted))  # fmt: skip
        for token in tokens:
            sys.stdout.write(stream.push(token))
            sys.stdout.flush()
    finally:
        signal.signal(signal.SIGINT, previous)
    sys.stdout.write(stream.finish() + "\n")
    sys.stdout.flush()
    print(reply_line(reply), file=sys.stderr, flush=True)
    return stream.text


def add_parser(sub) -> None:
    p = sub.add_parser(
        "chat", help="chat with a model in the terminal",
        description="Chat with an offloaded model: /reset forgets the conversation, /exit "
        "quits, Ctrl-C stops a reply.",
    )  # fmt: skip
    add_model_options(p)
    add_sampling_options(p, max_tokens=256)
    p.set_defaults(run=run)
