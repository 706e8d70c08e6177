"""The native path decoder (csrc/core/path_decoder) against the torch network it mirrors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expertflow import _C
from expertflow.prediction import REUSE_HORIZONS, PathPredictor
from expertflow.prediction.path.net import PathNet


def random_net(d_model, heads, depth, context, use_previous, layers=3, experts=5, seed=0):
    torch.manual_seed(seed)
    net = PathNet(50, layers, experts, d_model, depth, heads, context, use_previous)
    with torch.no_grad():
        for param in net.parameters():  # untrained weights are too small to test anything
            # bfloat16 values, as PathPredictor keeps them: the decoder stores bfloat16.
            param.copy_(torch.randn(param.shape).mul(0.3).bfloat16().float())
    return net.eval()


def decoder_of(net: PathNet, **override):
    sizes = dict(
        vocab_size=net.embed.num_embeddings,
        context=net.context,
        d_model=net.embed.embedding_dim,
        depth=len(net.stack.layers),
        heads=net.stack.layers[0].self_attn.num_heads,
        ffn=net.stack.layers[0].linear1.out_features,
        outputs=net.head.out_features,
        use_previous=net.previous is not None,
    )
    return _C.PathDecoder(net.state_dict(), **(sizes | override))


SHAPES = [  # d_model, heads, depth, context, use_previous
    (16, 4, 2, 12, True),
    (20, 5, 1, 9, False),  # 4-wide heads, one layer, odd context
    (12, 1, 3, 16, True),  # one head
    (40, 8, 2, 33, False),
]


@pytest.mark.parametrize(("d_model", "heads", "depth", "context", "use_previous"), SHAPES)
def test_extend_and_scores_match_the_torch_network(d_model, heads, depth, context, use_previous):
    net = random_net(d_model, heads, depth, context, use_previous)
    decoder = decoder_of(net)
    rng = np.random.default_rng(d_model + depth)
    for trial in range(4):
        length = int(rng.integers(1, context + 1)) if trial else context  # a full window too
        ids = rng.integers(0, 50, length)
        with torch.no_grad():
            reference = net.features(torch.from_numpy(ids)[None])[0]  # [length, d]
        # Fed in random chunks: every chunk's last feature equals the whole window's.
        cuts = np.sort(rng.choice(np.arange(1, length), min(3, length - 1), replace=False))
        kv, start = None, 0
        for end in [*cuts.tolist(), length]:
            feature, kv = decoder.extend(ids[start:end].tolist(), kv)
            torch.testing.assert_close(feature, reference[end - 1], atol=2e-5, rtol=1e-5)
            start = end
        assert kv.shape == (length, depth, 2, d_model)
        previous = torch.from_numpy((rng.random((2, net.head.out_features)) < 0.3).astype("f4"))
        features = reference[-2:] if length > 1 else reference[-1:].expand(2, -1)
        with torch.no_grad():
            zeros = torch.zeros_like(previous)
            expected = torch.sigmoid(net.head_logits(features, previous)).flatten(1)
            without = torch.sigmoid(net.head_logits(features, zeros)).flatten(1)
        torch.testing.assert_close(decoder.scores(features, previous), expected, atol=2e-6, rtol=0)
        torch.testing.assert_close(decoder.scores(features, None), without, atol=2e-6, rtol=0)


def test_extend_leaves_the_cached_keys_values_as_they_were():
    """Two rows may share one cached window (equal histories) and grow it differently."""
    decoder = decoder_of(random_net(16, 4, 2, 12, True))
    _, past = decoder.extend([1, 2, 3], None)
    kept = past.clone()
    first, longer = decoder.extend([4], past)
    second, _ = decoder.extend([5], past)
    assert torch.equal(past, kept) and longer.shape[0] == 4
    assert not torch.allclose(first, second)


def test_predict_step_with_equal_rows_matches_the_torch_reference():
    predictor = PathPredictor(3, 5, 2, vocab_size=50, d_model=16, context=12)
    predictor.net.load_state_dict(random_net(16, 4, 2, 12, True).state_dict())
    reference = PathPredictor(3, 5, 2, vocab_size=50, d_model=16, context=12)
    reference.net.load_state_dict(predictor.net.state_dict())
    reference.native = False
    histories = [[1, 2, 3], [1, 2, 3], [7]]
    previous = np.array([[[0, 1]] * 3, [[2, 3]] * 3, [[4, 0]] * 3])
    for token in (9, 9, 4, 11, 2, 8, 8, 30, 1, 2, 3, 4, 5):  # past a window boundary
        expected = reference.predict_step(histories, previous)
        np.testing.assert_allclose(predictor.predict_step(histories, previous), expected, atol=2e-5)
        for h in histories:
            h.append(token)


def test_float32_weights_are_used_as_bfloat16():
    """Weights that are not bfloat16 values are rounded by the decoder: it then computes what
    the torch network computes with the rounded weights, and PathPredictor rounds its own."""
    net = random_net(16, 4, 2, 12, True)
    with torch.no_grad():
        for param in net.parameters():
            param.add_(torch.randn(param.shape) * 1e-3)  # off the bfloat16 grid
    decoder = decoder_of(net)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if param.dim() == 2 and not name.startswith(("embed", "position")):
                param.copy_(param.bfloat16().float())  # the linear layers' weights
        expected = net.features(torch.tensor([[3, 1, 4, 1, 5]]))[0, -1]
    feature, _ = decoder.extend([3, 1, 4, 1, 5])
    torch.testing.assert_close(feature, expected, atol=2e-5, rtol=1e-5)
    predictor = PathPredictor(3, 5, 2, vocab_size=50, d_model=16, context=12)
    for param in predictor.net.parameters():
        assert torch.equal(param, param.bfloat16().float())


def test_bad_input_is_refused_naming_what_is_wrong():
    net = random_net(16, 4, 2, 12, True)
    decoder = decoder_of(net)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        decoder.extend([3, 50])
    with pytest.raises(ValueError, match="context"):
        decoder.extend(list(range(13)))
    _, past = decoder.extend(list(range(12)))
    with pytest.raises(ValueError, match="context"):
        decoder.extend([1], past)
    with pytest.raises(ValueError, match="past must be"):
        decoder.extend([1], torch.zeros(3, 2, 2, 8))
    with pytest.raises(ValueError, match="past must be a CPU float32"):
        decoder.extend([1], torch.zeros(3, 2, 2, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="features must be"):
        decoder.scores(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="previous must be"):
        decoder.scores(torch.zeros(2, 16), torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"'previous.weight' must be \[16, 14\], got \[16, 15\]"):
        decoder_of(net, outputs=14)
    with pytest.raises(ValueError, match="'previous.weight' is missing"):
        _C.PathDecoder(
            {k: v for k, v in net.state_dict().items() if not k.startswith("previous")},
            vocab_size=50,
            context=12,
            d_model=16,
            depth=2,
            heads=4,
            ffn=64,
            outputs=15,
            use_previous=True,
        )
    with pytest.raises(ValueError, match="divisible by heads"):
        decoder_of(net, heads=3)


def test_outputs_are_float32_whatever_the_default_dtype():
    decoder = decoder_of(random_net(16, 4, 2, 12, True))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        feature, kv = decoder.extend([1, 2])
        scores = decoder.scores(feature[None])
    finally:
        torch.set_default_dtype(before)
    assert feature.dtype == kv.dtype == scores.dtype == torch.float32


@pytest.mark.parametrize("use_previous", [True, False])
def test_reuse_scores_match_the_torch_reuse_head(use_previous):
    net = random_net(16, 4, 2, 12, use_previous, seed=3)
    net.add_reuse_head(24)
    with torch.no_grad():
        for param in net.reuse.parameters():
            param.copy_(torch.randn(param.shape).mul(0.3).bfloat16().float())
    decoder = decoder_of(net, reuse_hidden=24, reuse_horizons=len(REUSE_HORIZONS))
    assert decoder.has_reuse and not decoder_of(random_net(16, 4, 2, 12, use_previous)).has_reuse
    rng = np.random.default_rng(7)
    features = torch.from_numpy(rng.normal(size=(5, 16)).astype("f4"))
    previous = torch.from_numpy((rng.random((5, net.head.out_features)) < 0.3).astype("f4"))
    probs, reuse = decoder.scores(features, previous, with_reuse=True)
    with torch.no_grad():
        want_probs, want_reuse = net.scores(features, previous if use_previous else None, True)
    torch.testing.assert_close(probs, want_probs.flatten(1), atol=2e-6, rtol=0)
    torch.testing.assert_close(reuse, want_reuse.flatten(1), atol=2e-6, rtol=0)
    # The mean over horizons of probabilities: within [0, 1], and not just the head's scores.
    assert 0 < float(reuse.min()) and float(reuse.max()) < 1
    assert not torch.allclose(reuse, probs, atol=1e-2)
    torch.testing.assert_close(decoder.scores(features, previous), probs)


def test_reuse_head_weights_and_requests_are_checked():
    net = random_net(16, 4, 2, 12, True)
    with pytest.raises(ValueError, match="with_reuse=True needs a decoder with a reuse head"):
        decoder_of(net).scores(torch.zeros(1, 16), with_reuse=True)
    with pytest.raises(ValueError, match="'reuse.0.weight' is missing"):
        decoder_of(net, reuse_hidden=8, reuse_horizons=5)
    with pytest.raises(ValueError, match="reuse head needs both or neither"):
        decoder_of(net, reuse_hidden=8)
    net.add_reuse_head(8)
    with pytest.raises(ValueError, match=r"'reuse.2.weight' must be \[45, 8\], got \[75, 8\]"):
        decoder_of(net, reuse_hidden=8, reuse_horizons=3)
