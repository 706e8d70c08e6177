"""What several commands share: loading a model by name and loading traces."""

from __future__ import annotations

from expertflow.traces import load_trace


def load_model(spec: str, device: str):
    """``(model, tokenizer)`` for ``demo`` or a local checkpoint folder; no network access."""
    import torch

    if spec == "demo":
        from expertflow.demo.model import load_demo_model

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


def load_traces(paths, exclude_source=None, only_source=None):
    traces = [load_trace(p) for p in paths]
    if exclude_source:
        traces = [t.select_sources(lambda s: s != exclude_source) for t in traces]
    if only_source:
        traces = [t.select_sources(lambda s: s == only_source) for t in traces]
    traces = [t for t in traces if t.num_tokens]
    if not traces:
        raise ValueError("--traces: no tokens left to use (check the source filters)")
    return traces
