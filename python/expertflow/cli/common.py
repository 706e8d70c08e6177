"""What several commands share: loading a model by name and loading traces, and refusing
bad outputs, devices and counts before any work is done."""

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


def check_output_file(option: str, path: str) -> None:
    """Refuses, before any work, a file output that cannot be written: its folder missing (or
    not a folder), or the path an existing folder."""
    from pathlib import Path

    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option}: {path} is a folder; give a file name to write")
    parent = target.parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{option}: the folder {parent} of {path} {what}")


def check_output_folder(option: str, path: str) -> None:
    """Refuses, before any work, a folder output that cannot be made: the path an existing
    file, or a file where one of its parent folders would go (missing parents are made)."""
    from pathlib import Path

    target = Path(path)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{option}: {path} is an existing file; give a folder to write")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{option}: {parent} (in {path}) is a file, not a folder")
            break


def check_device(option: str, spec: str | None) -> None:
    """Refuses a device torch cannot parse, one this build cannot use, or a GPU that is not
    there (None: the command's default, always usable)."""
    if spec is None:
        return
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{option}: expected 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from exc
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f"{option}: expected 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"{option}: {spec!r} asks for a GPU, but torch sees none (use cpu)")
    if device.index is not None and device.index >= count:
        raise ValueError(f"{option}: {spec!r}, but torch sees {count} GPU(s): cuda:0..{count - 1}")


def check_positive(args, *names: str, minimum: int = 1) -> None:
    """Refuses an integer option below ``minimum``, named as typed (``--batch-size``)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
