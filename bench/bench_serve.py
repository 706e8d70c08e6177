"""expertflow serve under N concurrent clients, against generate_batch on the same requests.

    python bench/bench_serve.py [--clients 1,4,16,64] [--max-tokens 32] [--repeats 3]
        [--clients-in-process] [--json]

The bundled demo model, offloaded as ``expertflow serve --model demo`` loads it (24 slots, the
expertflow policy and the bundled predictor), is served in this process on a free port
(uvicorn in a thread, as the tests run it). N clients, threads of one other process (with
``--clients-in-process``: of this one), each send one streamed, greedy
``/v1/completions`` request at once (token-id prompts of 32 tokens cut from the corpus's
held-out text, every domain in turn). Reported per N and ``--schedule``: output tokens/s over
the whole run, p50/p99 time to first token and inter-token latency (between streamed chunks),
and generate_batch's tokens/s on the same prompts with the same batch size, active batches
and schedule (the server's overhead is the difference): medians of ``--repeats`` runs of each,
alternating which goes first (the one before leaves the expert cache warm for these prompts;
the latencies are the median server run's), and the expert bytes each copied per generated
token (the cache's ``bytes_copied``). Every server answer must equal generate_batch's text.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch
from bench_generate_batch import default_corpus, mixed_prompts

import expertflow
from expertflow.serving.engine import Engine
from expertflow.serving.loading import OffloadChoices, load_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serving(loaded, batch_size: int, schedule: str, active: int):
    """A started uvicorn server (and its thread) serving ``loaded``."""
    import uvicorn

    from expertflow.serving.server import create_app
    from expertflow.serving.worker import Worker

    engine = Engine(loaded.model, batch_size=batch_size, schedule=schedule,
                    active_batches=active, eos_token_id=sorted(loaded.eos))  # fmt: skip
    worker = Worker(engine, capacity=batch_size * active, max_queue=1024)
    port = free_port()
    config = uvicorn.Config(create_app(loaded, worker), host="127.0.0.1", port=port,
                            log_level="warning")  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def one_client(url: str, ids: list[int], max_tokens: int) -> dict:
    """One streamed request: its text, when each chunk came, and when it was sent."""
    import httpx

    body = {"model": "demo", "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sent, times, text, tokens = time.perf_counter(), [], [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["text"])
    return {"sent": sent, "times": times, "text": "".join(text), "tokens": tokens}


def all_clients(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list, float]:
    """Every client at once on its own thread (in the clients' process): their results and
    the seconds from the first request sent to the last answer read."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: one_client(url, p, max_tokens), prompts))
    return results, time.perf_counter() - started


def measure(loaded, prompts, max_tokens: int, batch: int, schedule: str, active: int,
            clients) -> dict:  # fmt: skip
    """``clients``: a one-process pool, so that parsing the streams does not take the GIL
    from the server's model thread (None: the clients run in this process)."""
    server, thread, url = serving(loaded, batch, schedule, active)
    cache = loaded.model._expertflow.cache
    copied = cache.stats()["bytes_copied"]
    try:
        if clients is None:
            results, seconds = all_clients(url, prompts, max_tokens)
        else:
            results, seconds = clients.submit(all_clients, url, prompts, max_tokens).result()
    finally:
        server.should_exit = True
        thread.join(60)
    ttft = [r["times"][0] - r["sent"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    return {
        "tokens_per_second": tokens / seconds,
        "copied_bytes_per_token": (cache.stats()["bytes_copied"] - copied) / max(tokens, 1),
        "ttft_ms": [1e3 * np.percentile(ttft, q) for q in (50, 99)],
        "itl_ms": [1e3 * np.percentile(itl, q) for q in (50, 99)] if itl else [None, None],
        "texts": [r["text"] for r in results],
    }


def baseline(loaded, prompts, max_tokens: int, batch: int, schedule: str, active: int):
    out = expertflow.generate_batch(
        loaded.model, prompts, max_new_tokens=max_tokens, batch_size=batch, schedule=schedule,
        active_batches=active, eos_token_id=sorted(loaded.eos),
    )  # fmt: skip
    texts = [loaded.tokenizer.decode(s, skip_special_tokens=True) for s in out.sequences]
    generated = sum(len(s) for s in out.sequences)
    return out.stats["tokens_per_second"], texts, out.stats["cache"]["bytes_copied"] / generated


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--corpus", default=str(default_corpus()))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clients-in-process", action="store_true",
        help="run the clients in the server's process (their parsing then competes for the GIL)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each side, alternating which goes first (medians)",
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=0.0,
        help="the worker's wait for a burst's requests (serve --batch-wait-ms)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    loaded = load_model("demo", OffloadChoices(device=args.device))
    counts = [int(c) for c in args.clients.split(",")]
    prompts = mixed_prompts(args.corpus, loaded.tokenizer, max(counts), 32)
    rows = []
    clients = None
    if not args.clients_in_process:  # started once: a spawned process imports torch
        clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        clients.submit(time.perf_counter).result()
    for schedule in ("fifo", "expertflow"):
        for n in counts:
            batch, active = max(1, min(16, -(-n // 2))), 2
            setup = (prompts[:n], args.max_tokens, batch, schedule, active)
            served, alone, same = [], [], True
            for r in range(args.repeats):  # alternating which goes first: the expert cache
                for which in ("server", "baseline") if r % 2 == 0 else ("baseline", "server"):
                    if which == "server":  # is left warm for these prompts by the one before
                        served.append(measure(loaded, *setup, clients))
                    else:
                        alone.append(baseline(loaded, *setup))
            texts = alone[0][1]
            same = all(run["texts"] == texts for run in served) and all(
                t == texts for _, t, _ in alone
            )
            middle = sorted(served, key=lambda run: run["tokens_per_second"])[len(served) // 2]
            middle.pop("texts")
            rows.append({"schedule": schedule, "clients": n, "batch_size": batch,
                         "same_text": same, "repeats": args.repeats,
                         "generate_batch_tokens_per_second": statistics.median(
                             tps for tps, _, _ in alone),
                         "generate_batch_copied_bytes_per_token": statistics.median(
                             b for _, _, b in alone),
                         **middle})  # fmt: skip
    if clients is not None:
        clients.shutdown()
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'schedule':>10} {'clients':>7} {'tok/s':>8} {'gb tok/s':>9} {'overhead':>8} "
          f"{'MB/tok':>7} {'gb MB/tok':>9} {'ttft p50/p99 ms':>16} {'itl p50/p99 ms':>15} "
          "same")  # fmt: skip
    for r in rows:
        overhead = 1 - r["tokens_per_second"] / r["generate_batch_tokens_per_second"]
        itl = "/".join("-" if v is None else f"{v:.0f}" for v in r["itl_ms"])
        print(f"{r['schedule']:>10} {r['clients']:>7} {r['tokens_per_second']:8.1f} "
              f"{r['generate_batch_tokens_per_second']:9.1f} {overhead:8.1%} "
              f"{r['copied_bytes_per_token'] / 1e6:7.2f} "
              f"{r['generate_batch_copied_bytes_per_token'] / 1e6:9.2f} "
              f"{r['ttft_ms'][0]:7.0f}/{r['ttft_ms'][1]:<8.0f} {itl:>15} "
              f"{'yes' if r['same_text'] else 'NO'}")  # fmt: skip
    return 0 if all(r["same_text"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
