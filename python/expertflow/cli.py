"""The ``expertflow`` command line: ``demo``, ``trace``, ``routing-stats``, ``replay``,
``train-predictor`` and ``eval-predictor``."""

from __future__ import annotations

import argparse
import json
import sys

from expertflow.trace import TraceError, load_trace


def _replay(args: argparse.Namespace) -> int:
    from expertflow.replay import load_predictions, replay

    trace = load_trace(args.trace)
    predictions = reuse = None
    if args.predictions:
        predictions, reuse = load_predictions(args.predictions, trace)
    lookahead = None
    if args.lookahead:
        if trace.lookahead_ids is None:
            raise TraceError(
                f"{args.trace}: --lookahead needs a trace recorded with `expertflow trace "
                "--lookahead` (it has no lookahead_ids)"
            )
        from expertflow.predictor import multi_hot

        lookahead = multi_hot(trace.lookahead_ids, trace.num_experts)
    result = replay(
        trace,
        args.policy,
        slots_per_layer=args.slots_per_layer,
        slots=args.slots,
        predictions=predictions,
        bandwidth_gbps=args.bandwidth_gbps,
        layer_compute_ms=args.layer_compute_ms,
        lookahead=lookahead,
        prefetch_threshold=args.prefetch_threshold,
        reuse=reuse,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
        return 0
    print(
        f"trace: {args.trace} ({trace.meta['model']}, {trace.num_tokens} tokens, "
        f"{result.steps} steps, {trace.num_layers} layers x {trace.num_experts} experts, "
        f"top-{trace.top_k})"
    )
    print(f"policy {result.policy}, {result.slots} slots ({result.budget})")
    print(
        f"  hit ratio          {result.hit_ratio:.4f}  ({result.hits} hits, {result.misses} misses)"
    )
    print(
        f"  prefetches         {result.prefetches}  (used {result.prefetch_hits}, "
        f"wasted {result.wasted_prefetches})"
    )
    print(f"  bytes moved        {result.bytes_moved / 2**20:.1f} MiB")
    if result.time_per_token_ms is not None:
        print(f"  time per token     {result.time_per_token_ms:.3f} ms (modelled)")
        print(f"  stalled on copies  {100 * result.stall_share:.1f}% of the time")
    return 0


def _load_model(spec: str, device: str):
    """``(model, tokenizer)`` for ``demo`` or a local checkpoint folder; no network access."""
    import torch

    if spec == "demo":
        from expertflow.demo_model import load_demo_model

        model, tokenizer = load_demo_model()
    else:
        from pathlib import Path

        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(spec)
        if not (path / "config.json").is_file():
            raise ValueError(f"--model: {spec} is neither 'demo' nor a folder with a config.json")
        if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
            raise ValueError(
                f"--model: {spec} has no weights (*.safetensors or pytorch_model*.bin)"
            )
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.float32, local_files_only=True
        ).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model.to(device), tokenizer


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


def _trace(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from expertflow.recording import record_routing
    from expertflow.trace import save_trace

    if not 0 <= args.skip_fraction < args.end_fraction <= 1:
        raise ValueError(
            "--skip-fraction and --end-fraction must satisfy 0 <= skip < end <= 1, got "
            f"{args.skip_fraction} and {args.end_fraction}"
        )
    for name in ("prompt_tokens", "max_sequences", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    model, tokenizer = _load_model(args.model, args.device)
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


def _routing_stats(args: argparse.Namespace) -> int:
    from expertflow.routing_stats import format_routing_stats, routing_stats

    stats = routing_stats(load_trace(args.trace))
    print(json.dumps(stats, indent=1) if args.json else format_routing_stats(stats))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from expertflow.demo import DEFAULT_PROMPT, format_demo, run_demo

    result = run_demo(
        DEFAULT_PROMPT if args.prompt is None else args.prompt,
        max_new_tokens=args.max_new_tokens,
        slots=args.slots,
        gpu_memory=args.gpu_memory,
        policies=tuple(args.policies.split(",")),
        budget=args.budget,
        device=args.device,
        prefetch_threshold=args.prefetch_threshold,
    )
    print(json.dumps(result, indent=1) if args.json else format_demo(result))
    return 0 if all(r.get("same_tokens", True) for r in result["rows"]) else 1


def _load_traces(paths, exclude_source=None, only_source=None):
    traces = [load_trace(p) for p in paths]
    if exclude_source:
        traces = [t.select_sources(lambda s: s != exclude_source) for t in traces]
    if only_source:
        traces = [t.select_sources(lambda s: s == only_source) for t in traces]
    traces = [t for t in traces if t.num_tokens]
    if not traces:
        raise ValueError("--traces: no tokens left to use (check the source filters)")
    return traces


def _saved_path_predictor(args: argparse.Namespace, traces):
    """``--from``: a saved path predictor for these traces, given a reuse head if it has none
    (and ``--reuse-hidden`` asks for one)."""
    from expertflow.predictor import PathPredictor, load_predictor

    if args.kind == "history":
        raise ValueError("--from starts from a path predictor: use --kind path or combined")
    path = load_predictor(args.start_from)
    if not isinstance(path, PathPredictor):
        raise ValueError(f"--from: {args.start_from} holds a {path.kind} predictor, not path")
    for trace in traces:
        path.check_trace(trace)
    if args.reuse_hidden and not path.has_reuse:
        path.add_reuse_head(args.reuse_hidden)
    return path


def _train_predictor(args: argparse.Namespace) -> int:
    from expertflow.predictor import CombinedPredictor, HistoryPredictor, PathPredictor

    traces = _load_traces(args.traces, exclude_source=args.exclude_source)
    first = traces[0]
    shape = (first.num_layers, first.num_experts, first.top_k)
    history = HistoryPredictor(*shape).fit(traces) if args.kind != "path" else None
    path = None
    if args.start_from:
        path = _saved_path_predictor(args, traces)
    elif args.kind != "history":
        vocab = args.vocab_size or max(
            t.meta.get("vocab_size") or int(t.token_ids.max()) + 1
            for t in traces
            if t.token_ids is not None
        )
        path = PathPredictor(
            *shape,
            vocab_size=vocab,
            d_model=args.d_model,
            depth=args.depth,
            context=args.context,
            use_previous=args.use_previous,
            reuse_hidden=args.reuse_hidden,
        )
    if path is not None and args.epochs:
        path.fit(
            traces,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            reuse_epochs=args.reuse_epochs,
        )
    elif path is not None and path.has_reuse and args.reuse_epochs:
        path.fit_reuse(traces, epochs=args.reuse_epochs)  # --epochs 0: the reuse head alone
    if args.kind == "combined":
        predictor = CombinedPredictor([path, history], [1.0, args.history_weight])
    else:
        predictor = path or history
    predictor.save(args.out)
    tokens = sum(t.num_tokens for t in traces)
    print(f"wrote {args.kind} predictor to {args.out} (trained on {tokens} tokens)")
    return 0


def _eval_predictor(args: argparse.Namespace) -> int:
    import numpy as np

    from expertflow.predictor import HistoryPredictor, load_predictor
    from expertflow.predictor_eval import evaluate_predictor, format_evaluation

    (trace,) = _load_traces([args.traces], only_source=args.only_source)
    if args.predictor == "history":
        predictor = HistoryPredictor(trace.num_layers, trace.num_experts, trace.top_k)
    else:
        predictor = load_predictor(args.predictor)
    result = evaluate_predictor(predictor, trace)
    scores = result.pop("scores")
    if args.write_scores:
        reuse = predictor.reuse_trace(trace)
        extra = {} if reuse is None else {"reuse": reuse}
        np.savez_compressed(args.write_scores, scores=scores, **extra)
    print(json.dumps(result, indent=1) if args.json else format_evaluation(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    dp = sub.add_parser("demo", help="the bundled model, offloaded, against the alternatives")
    dp.add_argument("--prompt", default=None, help="text to continue")
    dp.add_argument("--max-new-tokens", type=int, default=48)
    budget_group = dp.add_mutually_exclusive_group()
    budget_group.add_argument("--slots", type=int, help="expert slots (default: a quarter)")
    budget_group.add_argument("--gpu-memory", help="total device budget, e.g. 20MiB")
    dp.add_argument("--policies", default="lru,lrfu,expertflow", help="comma-separated policies")
    dp.add_argument("--budget", default="per_layer", choices=["per_layer", "global"])
    dp.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    dp.add_argument(
        "--prefetch-threshold",
        type=float,
        default=0.5,
        help="the expertflow policy prefetches experts the predictor scores at least this",
    )
    dp.add_argument("--json", action="store_true")
    dp.set_defaults(run=_demo)

    rp = sub.add_parser("replay", help="replay a routing trace through a cache policy")
    rp.add_argument("--trace", required=True, help="trace .npz (see expertflow.trace)")
    rp.add_argument(
        "--policy", required=True, choices=["lru", "lfu", "lrfu", "expertflow", "belady"]
    )
    budget = rp.add_mutually_exclusive_group(required=True)
    budget.add_argument("--slots-per-layer", type=int, help="per-layer budget")
    budget.add_argument("--slots", type=int, help="one pool shared by all layers")
    rp.add_argument(
        "--predictions",
        help=".npz with scores float [T, L, E] (and reuse scores 'reuse', if the predictor has "
        "a reuse head: eval-predictor --write-scores writes both)",
    )
    rp.add_argument(
        "--lookahead",
        action="store_true",
        help="also prefetch the trace's recorded gate-lookahead picks, each layer's when the "
        "layer before it starts (trace recorded with --lookahead)",
    )
    rp.add_argument(
        "--prefetch-threshold",
        type=float,
        default=0.0,
        help="prefetch only predictions scored at least this (the others still rank evictions)",
    )
    rp.add_argument("--bandwidth-gbps", type=float, help="timing model: copy bandwidth")
    rp.add_argument("--layer-compute-ms", type=float, help="timing model: compute per layer")
    rp.add_argument("--json", action="store_true", help="print the result as JSON")
    rp.set_defaults(run=_replay)

    tp = sub.add_parser("trace", help="record a model's routing on text files into a trace")
    tp.add_argument("--model", default="demo", help="'demo' (bundled) or a checkpoint folder")
    tp.add_argument("--text", nargs="+", required=True, help="text files; one label each")
    tp.add_argument("--out", required=True, help="trace .npz to write (atomically)")
    tp.add_argument("--generate", type=int, default=0, help="greedy tokens after each prompt")
    tp.add_argument("--batch-size", type=int, default=8)
    tp.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt")
    tp.add_argument("--max-sequences", type=int, default=32, help="prompts per text file")
    tp.add_argument(
        "--skip-fraction",
        type=float,
        default=0.0,
        help="start reading each file at this fraction (0.9: a corpus file's held-out 10%%)",
    )
    tp.add_argument(
        "--end-fraction",
        type=float,
        default=1.0,
        help="stop reading each file at this fraction (0.9: the training part, no held-out text)",
    )
    tp.add_argument("--device", default="cpu")
    tp.add_argument(
        "--lookahead", action="store_true", help="also record what gate lookahead would pick"
    )
    tp.set_defaults(run=_trace)

    tr = sub.add_parser("train-predictor", help="train a routing predictor on traces")
    tr.add_argument("--traces", nargs="+", required=True)
    tr.add_argument("--out", required=True, help="predictor folder to write")
    tr.add_argument(
        "--kind",
        default="path",
        choices=["path", "history", "combined"],
        help="combined: path predictor + history predictor (weighted by --history-weight)",
    )
    tr.add_argument("--history-weight", type=float, default=0.5)
    tr.add_argument("--exclude-source", help="leave this source (domain) out of training")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=32)
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--context", type=int, default=64, help="token ids the path predictor sees")
    tr.add_argument("--d-model", type=int, default=96)
    tr.add_argument("--depth", type=int, default=2)
    tr.add_argument(
        "--use-previous",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the path predictor also reads the previous token's routing (default: yes)",
    )
    tr.add_argument("--vocab-size", type=int, help="default: the traces' meta.vocab_size")
    tr.add_argument(
        "--reuse-hidden",
        type=int,
        default=128,
        help="width of the path predictor's reuse head (predicts uses 1-16 tokens ahead, "
        "for evictions); 0: none (default: 128)",
    )
    tr.add_argument("--reuse-epochs", type=int, default=3, help="epochs of the reuse head")
    tr.add_argument(
        "--from",
        dest="start_from",
        metavar="DIR",
        help="start from this saved path predictor (adds a reuse head if it has none); with "
        "--epochs 0 only the reuse head is trained",
    )
    tr.set_defaults(run=_train_predictor)

    ev = sub.add_parser("eval-predictor", help="recall/precision of a predictor on a trace")
    ev.add_argument("--predictor", required=True, help="predictor folder, or 'history' (online)")
    ev.add_argument("--traces", required=True, help="trace to evaluate on")
    ev.add_argument("--only-source", help="evaluate on this source (domain) only")
    ev.add_argument(
        "--write-scores", help="also write the scores (and reuse scores) .npz, for replay"
    )
    ev.add_argument("--json", action="store_true")
    ev.set_defaults(run=_eval_predictor)

    sp = sub.add_parser("routing-stats", help="usage, specialisation, reuse and affinity")
    sp.add_argument("--trace", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(run=_routing_stats)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceError, ValueError) as exc:
        print(f"expertflow {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
