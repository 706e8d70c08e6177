"""Loading a model to chat with or serve: the bundled demo or a checkpoint folder, offloaded,
with its tokenizer, its generation defaults and a one-line summary of where its bytes are.

Every option is checked (:class:`~expertflow.runtime.options.OffloadOptions`) before anything
is read: a bad ``--slots`` must not cost a whole model load first.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

__all__ = ["Loaded", "OffloadChoices", "check_sampling", "load_model", "summary_line"]

# The demo model's default budget: a quarter of its 6 x 16 experts, as `expertflow demo`.
DEMO_SLOTS = 24


@dataclass
class OffloadChoices:
    """The offload options the commands take (``None``: the default described in --help)."""

    device: str | None = None
    slots: int | None = None
    gpu_memory: str | None = None
    policy: str = "expertflow"
    budget: str = "per_layer"
    predictor: str | None = None  # a folder, "demo" (the bundled one) or "none"
    expert_format: str = "auto"
    group_size: int | None = None
    cpu_experts: str = "never"


@dataclass
class Loaded:
    """A model ready to decode: ``name`` (what the API calls it), the offloaded ``model``, its
    ``tokenizer``, ``eos`` ids, ``sampling`` defaults (``temperature``, ``top_p``, ``top_k``
    from its generation config when it samples; empty: greedy) and ``context`` length."""

    name: str
    model: nn.Module
    tokenizer: object
    eos: set[int]
    context: int | None
    sampling: dict = field(default_factory=dict)
    budget: str = "per_layer"

    def sampling_for(self, temperature=None, top_p=None, seed=None):
        """A request's sampling (None: greedy). Options left out (None) take the model's
        defaults; no temperature, or 0, is greedy. Without a seed a sampled request gets a
        random one (as OpenAI's API: the same request gives other text)."""
        from expertflow.serving.sampling import _Sampling

        temperature = self.sampling.get("temperature") if temperature is None else temperature
        top_p = self.sampling.get("top_p") if top_p is None else top_p
        check_sampling(temperature, top_p, seed)
        if not temperature:
            return None
        seed = secrets.randbits(63) if seed is None else seed
        top_k = self.sampling.get("top_k") or None  # 0 in a generation config: no top-k
        return _Sampling(True, float(temperature), top_k, top_p, seed)


def check_sampling(temperature, top_p, seed) -> None:
    """Refuses a temperature, top_p or seed that no request could use, naming it."""
    from expertflow.serving.sampling import SEED_RANGE

    _check_number("temperature", temperature, lambda t: 0 <= t < math.inf, "a number >= 0")
    _check_number("top_p", top_p, lambda p: 0 < p <= 1, "a number in (0, 1]")
    if seed is not None:
        _check_number("seed", seed, lambda s: SEED_RANGE[0] <= s <= SEED_RANGE[1], "an int in "
                      "[-2**63, 2**64)", integer=True)  # fmt: skip


def _check_number(name: str, value, ok, expected: str, integer: bool = False) -> None:
    if value is None:
        return
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def load_model(spec: str, choices: OffloadChoices) -> Loaded:
    """``spec``: ``"demo"`` or a local checkpoint folder (config.json + safetensors)."""
    import torch

    from expertflow.runtime.options import OffloadOptions

    device = choices.device or ("cuda" if torch.cuda.is_available() else "cpu")
    demo = spec == "demo"
    path = None if demo else _checkpoint_folder(spec)
    slots, gpu_memory = choices.slots, choices.gpu_memory
    if slots is None and gpu_memory is None:
        if not demo:
            raise ValueError(
                "--gpu-memory or --slots is needed for a checkpoint: the device budget for its "
                "weights and cached experts, e.g. --gpu-memory 20GiB"
            )
        slots = DEMO_SLOTS
    predictor = _predictor_arg(choices.predictor, demo, choices.policy)
    # Checked whole before any loading (OffloadOptions raises ValueError naming the option).
    OffloadOptions(device, slots, gpu_memory, choices.policy, choices.budget, predictor,
                   expert_format=choices.expert_format, group_size=choices.group_size,
                   cpu_experts=choices.cpu_experts)  # fmt: skip
    common = dict(device=device, slots=slots, gpu_memory=gpu_memory, policy=choices.policy,
                  budget=choices.budget, predictor=predictor, expert_format=choices.expert_format,
                  group_size=choices.group_size, cpu_experts=choices.cpu_experts)  # fmt: skip
    if demo:
        import expertflow
        from expertflow.demo.model import load_demo_model

        model, tokenizer = load_demo_model()
        expertflow.offload(model, **common)
        loaded = _loaded("demo", model, tokenizer, None)
    else:
        loaded = _loaded(path.name, _from_checkpoint(path, common), _tokenizer(path), path)
    loaded.budget = choices.budget
    return loaded


def _predictor_arg(predictor: str | None, demo: bool, policy: str):
    """The bundled predictor for the demo model under the expertflow policy by default."""
    from expertflow.demo.model import DEMO_PREDICTOR_DIR

    if predictor == "none" or (predictor is None and not (demo and policy == "expertflow")):
        return None
    if predictor in (None, "demo"):
        return str(DEMO_PREDICTOR_DIR)
    if not Path(predictor).is_dir():
        raise ValueError(f"--predictor: {predictor} is not a folder (nor 'demo' or 'none')")
    return predictor


def _checkpoint_folder(spec: str) -> Path:
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"--model: {spec} is neither 'demo' nor a folder with a config.json")
    return path


def _from_checkpoint(path: Path, options: dict) -> nn.Module:
    from expertflow.runtime.pretrained import from_pretrained

    return from_pretrained(path, **options)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ValueError(
            f"--model: no usable tokenizer in {path} ({type(exc).__name__}: {exc})"
        ) from exc


def _loaded(name: str, model: nn.Module, tokenizer, path: Path | None) -> Loaded:
    """The generation defaults: the checkpoint's generation_config.json when there is one
    (read here: the model's own generation config may come from config.json alone), the
    model's otherwise; the tokenizer's EOS token ends a reply too."""
    config = getattr(model, "generation_config", None)
    if path is not None and (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
    eos = getattr(config, "eos_token_id", None)
    eos = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        eos.add(tokenizer.eos_token_id)
    sampling = {}
    if getattr(config, "do_sample", False):
        sampling = {k: getattr(config, k, None) for k in ("temperature", "top_p", "top_k")}
        sampling = {k: v for k, v in sampling.items() if v is not None}
    context = getattr(model.config, "max_position_embeddings", None)
    return Loaded(name, model, tokenizer, eos, context, sampling)


def summary_line(loaded: Loaded) -> str:
    """``demo: 24 of 96 expert slots (per_layer), device 17.6 MiB of 44.6 MiB whole (61%
    saved), host store 26.0 MiB, on cpu``."""
    from expertflow.runtime.memory import memory_report

    state = loaded.model._expertflow
    report = memory_report(loaded.model)
    cache = state.cache
    experts = sum(getattr(module, "num_experts", 0) for _, _, module in state.originals)
    total = f" of {experts}" if experts else ""
    return (
        f"{loaded.name}: {cache.num_slots}{total} expert slots ({loaded.budget}), device "
        f"{_mib(report['device_bytes'])} of {_mib(report['full_model_bytes'])} whole "
        f"({report['saving_percent']:.0f}% saved), host store {_mib(report['host_bytes'])}, "
        f"{report['expert_format']} experts, on {cache.device}"
    )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
