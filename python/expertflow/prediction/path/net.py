"""The path predictor's network: token and position embeddings, a causal transformer stack,
and heads with one logit per (layer, expert): the next step's routing and (optionally) its
reuse within :data:`~expertflow.prediction.REUSE_HORIZONS` tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertflow.prediction._checks import checked_int
from expertflow.prediction.base import REUSE_HORIZONS

__all__ = ["PathNet", "checked_sizes"]


def checked_sizes(*, vocab_size, d_model, depth, heads, context, reuse_hidden) -> dict:
    """The network's sizes as ints, each refused with a ValueError naming it unless valid:
    torch would otherwise stop at the first forward or deep in construction (``d_model=15``
    with 4 heads: an AssertionError from ``nn.MultiheadAttention``)."""
    sizes = {
        "vocab_size": checked_int("vocab_size", vocab_size, 1),
        "d_model": checked_int("d_model", d_model, 1),
        "depth": checked_int("depth", depth, 1),
        "heads": checked_int("heads", heads, 1),
        "context": checked_int("context", context, 1),
        "reuse_hidden": checked_int("reuse_hidden", reuse_hidden, 0),
    }
    if sizes["d_model"] % sizes["heads"]:
        raise ValueError(
            f"d_model must be a multiple of heads={sizes['heads']} (each head gets d_model / "
            f"heads features), got d_model={sizes['d_model']}"
        )
    return sizes


class PathNet(nn.Module):
    """Token + position embeddings, a causal transformer stack, one logit per (layer, expert).
    With ``use_previous`` the routing the previous token really took (known at decode time)
    joins each position's features before the head: the ids say which context this is, the
    last routing says where in it the model's hidden state just was.

    The submodules' names are the saved format (``path_predictor.pt``'s keys) and what the
    native decoder reads: rename none of them."""

    def __init__(
        self,
        vocab_size,
        num_layers,
        num_experts,
        d_model,
        depth,
        heads,
        context,
        use_previous,
        reuse_hidden=0,
    ):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(context, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.stack = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.previous = None
        if use_previous:
            self.previous = nn.Linear(num_layers * num_experts, d_model)
            self.fuse = nn.Sequential(
                nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Linear(2 * d_model, d_model)
            )
        self.head = nn.Linear(d_model, num_layers * num_experts)
        self.out_shape = (num_layers, num_experts)
        self.reuse = None
        if reuse_hidden:
            self.add_reuse_head(reuse_hidden)

    def add_reuse_head(self, hidden: int) -> None:
        """The reuse head: an MLP on the head's input, one logit per horizon and output."""
        outputs = len(REUSE_HORIZONS) * self.head.out_features
        self.reuse = nn.Sequential(
            nn.Linear(self.head.in_features, hidden), nn.GELU(), nn.Linear(hidden, outputs)
        )

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids [B, T]`` (T <= context) -> ``[B, T, d_model]``, each position causal."""
        t = ids.shape[1]
        x = self.embed(ids) + self.position(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.norm(self.stack(x, mask=mask, is_causal=True))

    def extend(self, ids, positions, past=None, past_valid=None):
        """The stack run on new ids after cached keys/values, so a decode step costs one
        token, not a whole window. ``ids``/``positions`` ``[B, n]``; ``past`` the cached keys
        and values ``[B, depth, 2, H, T, d / H]`` (None: nothing cached); ``past_valid``
        ``[B, T]`` which cached columns are real where rows of different lengths were padded
        (None: all). Returns features ``[B, n, d_model]`` (equal to :meth:`features` on the
        whole window) and the new ids' keys/values ``[B, depth, 2, H, n, d / H]``.

        Functional calls on the layers' weights rather than module calls: at one token the
        cost is per-op overhead, not arithmetic."""
        b, n = ids.shape
        x = F.embedding(ids, self.embed.weight) + F.embedding(positions, self.position.weight)
        mask, causal = None, past is None and n > 1
        if past is not None and (n > 1 or past_valid is not None):
            mask = _attention_mask(past_valid, b, n, past.shape[4])
        new = []
        for i, layer in enumerate(self.stack.layers):
            x, k, v = _layer_extend(layer, x, None if past is None else past[:, i], mask, causal)
            new += (k, v)
        x = F.layer_norm(
            x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps
        )
        kv = torch.stack(new, dim=1)  # [B, depth * 2, H, n, d / H]
        return x, kv.view(b, len(self.stack.layers), 2, *kv.shape[2:])

    def head_input(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Features ``[..., d]`` and the previous token's multi-hot routing ``[..., L * E]``
        (zeros where there is none) -> what the heads read ``[..., d]``."""
        if self.previous is not None:
            x = x + self.previous(previous)
            x = x + self.fuse(x)
        return x

    def head_logits(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Features and previous routing (as :meth:`head_input`) -> logits ``[..., L, E]``."""
        x = self.head_input(x, previous)
        return self.head(x).view(*x.shape[:-1], *self.out_shape)

    def reuse_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """:meth:`head_input`'s output -> ``[..., len(REUSE_HORIZONS), L, E]`` logits."""
        return self.reuse(fused).view(*fused.shape[:-1], len(REUSE_HORIZONS), *self.out_shape)

    def scores(self, x, previous, with_reuse: bool):
        """Probabilities ``[..., L, E]`` and (``with_reuse``) reuse scores ``[..., L, E]``,
        the mean over horizons of the reuse head's probabilities (else None)."""
        fused = self.head_input(x, previous)
        probs = torch.sigmoid(self.head(fused).view(*fused.shape[:-1], *self.out_shape))
        if not with_reuse:
            return probs, None
        return probs, torch.sigmoid(self.reuse_logits(fused)).mean(dim=-3)

    def forward(self, ids: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        """``ids [B, T]``, ``previous [B, T, L * E]`` -> logits ``[B, T, L, E]``."""
        return self.head_logits(self.features(ids), previous)


def _attention_mask(past_valid, b: int, n: int, past_len: int) -> torch.Tensor:
    """``[B, 1, n, past_len + n]`` bool: each new id sees the real cached columns
    (``past_valid [B, past_len]``, None: all) and the new ids up to itself."""
    seen = past_valid
    if seen is None:
        seen = torch.ones((b, past_len), dtype=torch.bool)
    return torch.cat(
        [
            seen[:, None, :].expand(b, n, seen.shape[1]),
            torch.ones((n, n), dtype=torch.bool).tril().expand(b, n, n),
        ],
        dim=2,
    )[:, None]


def _layer_extend(layer: nn.TransformerEncoderLayer, x, past, mask, causal: bool):
    """One pre-norm encoder layer on new positions ``x [B, n, d]`` after cached keys/values
    ``past [B, 2, H, T, d / H]`` (None: none). Returns ``x`` and the new keys and values
    ``[B, H, n, d / H]`` each."""
    b, n = x.shape[:2]
    attn, n1, n2 = layer.self_attn, layer.norm1, layer.norm2
    h = F.layer_norm(x, n1.normalized_shape, n1.weight, n1.bias, n1.eps)
    qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)
    q, k_new, v_new = qkv.view(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    k, v = k_new, v_new
    if past is not None:
        k = torch.cat([past[:, 0], k], dim=2)
        v = torch.cat([past[:, 1], v], dim=2)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    a = a.transpose(1, 2).reshape(b, n, -1)
    x = x + F.linear(a, attn.out_proj.weight, attn.out_proj.bias)
    h = F.layer_norm(x, n2.normalized_shape, n2.weight, n2.bias, n2.eps)
    h = layer.activation(F.linear(h, layer.linear1.weight, layer.linear1.bias))
    x = x + F.linear(h, layer.linear2.weight, layer.linear2.bias)
    return x, k_new, v_new
