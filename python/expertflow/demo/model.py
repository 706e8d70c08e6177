"""The bundled demo MoE language model: its shape, its corpus split, and loading it offline.

The model is a small transformers ``MixtralForCausalLM`` trained on the five-domain corpus
(``shared/data/corpus``) by :mod:`expertflow.demo.training`; the weights (bf16 safetensors) and
the byte-level BPE tokenizer ship in ``expertflow/assets/demo-moe``. It is the default model of
``expertflow demo``, the source of real routing traces, and a test fixture.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = [
    "DEMO_MODEL_DIR",
    "DEMO_PREDICTOR_DIR",
    "DOMAINS",
    "HELD_OUT_FRACTION",
    "demo_model_config",
    "domain_texts",
    "load_demo_model",
    "load_demo_predictor",
    "load_demo_tokenizer",
]

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo-moe"
DEMO_PREDICTOR_DIR = Path(__file__).resolve().parent / "assets" / "demo-moe-predictor"
DOMAINS = ("arxiv", "code", "shakespeare", "web", "wikipedia")
# The last 10% of every corpus file is never trained on (model, tokenizer or predictor).
HELD_OUT_FRACTION = 0.1


def demo_model_config(vocab_size: int):
    """The demo model's shape: 6 layers x 16 experts (top-2), hidden 256; about 11.7M parameters,
    23 MB as bf16. Small enough to train on 2 CPU cores in under an hour, and 16 experts per
    layer leave room for caching to matter (a quarter of the experts is 4 per layer)."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=128,  # per expert
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        num_local_experts=16,
        num_experts_per_tok=2,
        router_aux_loss_coef=0.02,
        output_router_logits=False,  # switched on by the trainer only
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def domain_texts(corpus: str | Path, split: str) -> dict[str, str]:
    """``{domain: text}`` of the corpus's ``"train"`` (first 90%) or ``"held_out"`` (last 10%)
    part of every ``*.txt`` file, cut at a line boundary."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise ValueError(f"corpus: {corpus} is not a directory")
    texts = {}
    for path in sorted(corpus.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        cut = text.find("\n", int(len(text) * (1 - HELD_OUT_FRACTION)))
        cut = len(text) if cut < 0 else cut + 1
        texts[path.stem] = text[:cut] if split == "train" else text[cut:]
    if not texts:
        raise ValueError(f"corpus: no non-empty *.txt files in {corpus}")
    return texts


def load_demo_tokenizer(path: str | Path | None = None):
    from transformers import PreTrainedTokenizerFast

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def load_demo_model(dtype: torch.dtype = torch.float32, path: str | Path | None = None):
    """``(model, tokenizer)`` of the bundled demo model, on the CPU, in eval mode, with no network
    access. ``dtype`` defaults to float32 (the weights are stored as bf16, so float32 and bf16
    copies hold the same values)."""
    from transformers import MixtralForCausalLM

    path = Path(path) if path is not None else DEMO_MODEL_DIR
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"no model.safetensors in {path}: train one with "
            "`python -m expertflow.demo.training --corpus DIR --out DIR`"
        )
    model = MixtralForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.eval(), load_demo_tokenizer(path)


def load_demo_predictor(path: str | Path | None = None):
    """The routing predictor shipped with the demo model: the path predictor (d 160, 4 layers,
    bfloat16 weights) trained on its routing traces of the corpus's training part, 90% top-2
    recall on held-out text (README, "Routing predictor")."""
    from expertflow.prediction import load_predictor

    return load_predictor(Path(path) if path is not None else DEMO_PREDICTOR_DIR)
