"""EfficientSelfAttention against fairseq's own MultiheadAttention, and its statistics."""

from __future__ import annotations

import pytest
import torch
from fairseq.logging import metrics
from fairseq.modules import MultiheadAttention

from fairseq_plugin.config import AttentionConfig
from fairseq_plugin.modules import EfficientSelfAttention

T, B, C, H = 12, 3, 16, 2


def inputs():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(T, B, C, generator=gen)  # (T, B, C)
    padding = torch.zeros(B, T, dtype=torch.bool)  # (B, T), True = padded
    padding[1, 9:] = True
    padding[2, 5:] = True
    return x, padding


def pair(**cfg):
    """A fairseq MultiheadAttention and an EfficientSelfAttention with the same weights."""
    torch.manual_seed(0)
    reference = MultiheadAttention(C, H, self_attention=True).eval()
    ours = EfficientSelfAttention(C, H, AttentionConfig(**cfg)).eval()
    missing = ours.load_state_dict(reference.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return reference, ours


@pytest.mark.parametrize("cfg", [{}, {"attention_type": "i_clustered", "clusters": 3, "topk": T}])
def test_matches_fairseq_multihead_attention(cfg):
    """softmax, and i_clustered with topk >= length (exact), equal fairseq's attention on real tokens."""
    reference, ours = pair(**cfg)
    x, padding = inputs()
    expected, _ = reference(x, x, x, key_padding_mask=padding, need_weights=False)
    got, weights = ours(x, x, x, key_padding_mask=padding)
    assert weights is None and got.shape == (T, B, C)
    real = ~padding.T  # (T, B)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)


def test_clustered_approximates_but_differs():
    reference, ours = pair(attention_type="clustered", clusters=2)
    x, padding = inputs()
    expected, _ = reference(x, x, x, key_padding_mask=padding)
    got, _ = ours(x, x, x, key_padding_mask=padding)
    assert torch.isfinite(got).all() and not torch.allclose(got, expected, atol=1e-4)


def test_attn_mask_softmax_delegates_and_others_refuse():
    reference, ours = pair()
    x, _ = inputs()
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)  # (T, T) additive, causal
    torch.testing.assert_close(ours(x, x, x, attn_mask=mask)[0], reference(x, x, x, attn_mask=mask)[0])
    _, clustered = pair(attention_type="clustered")
    with pytest.raises(ValueError, match="attn_mask is only supported with --attention-type softmax, not clustered"):
        clustered(x, x, x, attn_mask=mask)


@pytest.mark.parametrize("bool_mask", [False, True])
def test_attn_mask_path_applies_softmax_temp_and_padding(bool_mask):
    """--softmax-temp reaches the attn_mask path too (fairseq's module would use 1/sqrt(E))."""
    _, ours = pair(softmax_temp=0.9)
    x, padding = inputs()
    causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = masked
    additive = torch.zeros(T, T).masked_fill(causal, float("-inf"))
    got, _ = ours(x, x, x, key_padding_mask=padding, attn_mask=causal if bool_mask else additive)
    # by hand: softmax(0.9 q kᵀ + mask) v, then the output projection
    q, k, v = (proj(x).view(T, B, H, C // H).permute(1, 2, 0, 3) for proj in (ours.q_proj, ours.k_proj, ours.v_proj))
    scores = 0.9 * q @ k.transpose(-1, -2) + additive  # (B, H, T, T)
    scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    attn = (torch.softmax(scores, -1) @ v).permute(2, 0, 1, 3).reshape(T, B, C)  # (T, B, C)
    expected = ours.out_proj(attn)
    real = ~padding.T  # (T, B)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-6)
    default, _ = pair()[1](x, x, x, key_padding_mask=padding, attn_mask=additive)
    assert not torch.allclose(default[real], got[real], atol=1e-4), "softmax_temp changed nothing"


def test_hardmax_is_exact_in_eval_and_soft_in_training():
    _, ours = pair(attention_type="hardmax", hardmax_temperature=1e3)
    x, padding = inputs()
    exact = ours.eval()(x, x, x, key_padding_mask=padding)[0]
    soft = ours.train()(x, x, x, key_padding_mask=padding)[0]  # temperature 1e3: nearly uniform
    assert not torch.allclose(exact, soft, atol=1e-3)
    q = ours.q_proj(x).view(T, B, H, C // H).permute(1, 2, 0, 3)  # (B, H, T, E)
    k = ours.k_proj(x).view(T, B, H, C // H).permute(1, 2, 0, 3)
    v = ours.v_proj(x).view(T, B, H, C // H).permute(1, 2, 0, 3)
    scores = (q @ k.transpose(-1, -2)).masked_fill(padding[:, None, None, :], float("-inf"))
    hard = torch.nn.functional.one_hot(scores.argmax(-1), T).to(v.dtype) @ v  # ties have measure zero here
    expected = ours.out_proj(hard.permute(2, 0, 1, 3).reshape(T, B, C))
    real = ~padding.T
    torch.testing.assert_close(exact[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, keys",
    [
        ({}, set()),
        ({"attention_type": "clustered", "clusters": 3}, {"attn_cluster_size_cv"}),
        ({"attention_type": "i_clustered", "clusters": 3, "topk": 4}, {"attn_cluster_size_cv", "attn_topk_mass"}),
        ({"attention_type": "hardmax"}, {"attn_hardmax_leaders"}),
        ({"attention_type": "i_clustered", "attention_stats": False}, set()),
    ],
)
def test_statistics_are_logged_as_fairseq_metrics(cfg, keys):
    _, ours = pair(**cfg)
    x, padding = inputs()
    with metrics.aggregate(new_root=True) as agg:
        ours(x, x, x, key_padding_mask=padding)
        values = agg.get_smoothed_values()
    assert {k for k in values if k.startswith("attn_")} == keys
    for key in keys:
        assert 0 <= values[key] < (10 if key == "attn_cluster_size_cv" else 1.0 + 1e-6), (key, values[key])
    if "attn_hardmax_leaders" in keys:  # leaders among the 12 + 9 + 5 real tokens of 2 heads
        assert values["attn_hardmax_leaders"] > 0


def test_attention_dropout_is_ignored_with_a_warning(caplog):
    from fairseq_plugin.modules import attention

    attention._warned.discard("attention_dropout")
    with caplog.at_level("WARNING"):
        module = EfficientSelfAttention(C, H, AttentionConfig(), dropout=0.1)
    assert module.dropout_module.p == 0.0
    assert "attention_dropout=0.1 is ignored" in caplog.text


def test_checkpointed_clustered_layer_recomputes_the_same_gradients():
    """build_layer with --checkpoint-activations: the i-clustered layer is wrapped, and the
    recomputation in the backward (the forward's RNG state restored) gives the same gradients."""
    from fairseq.models.transformer import TransformerConfig

    from fairseq_plugin.modules.encoder import build_layer

    attention = AttentionConfig(attention_type="i_clustered", clusters=3, topk=4)
    layers = {}
    for flag in (False, True):
        cfg = TransformerConfig()
        cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = C, 2 * C, H
        cfg.checkpoint_activations = flag
        torch.manual_seed(0)
        layers[flag] = build_layer(cfg, attention)
    assert hasattr(layers[True], "precheckpoint_forward") and not hasattr(layers[False], "precheckpoint_forward")
    x, padding = inputs()
    grads = {}
    for flag, layer in layers.items():
        xx = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the hash planes come from the global RNG
        layer(xx, padding).square().sum().backward()
        grads[flag] = (xx.grad, layer.self_attn.q_proj.weight.grad)
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "cfg",
    [{}, {"attention_type": "clustered", "clusters": 3}, {"attention_type": "i_clustered", "clusters": 3, "topk": T},
     {"attention_type": "hardmax"}],
    ids=["softmax", "clustered", "i_clustered", "hardmax"],
)
def test_half_precision_layer_keeps_its_dtype_and_trains(cfg, dtype):
    """What fairseq's --fp16 / --bf16 do to a layer (model.half() / .to(bfloat16), inputs in that
    dtype), on CPU: the output keeps the dtype, real tokens and every gradient are finite, and the
    exact types (softmax; i_clustered with topk >= length) stay within the dtype's rounding of the
    fp32 layer. The ops themselves are checked in each dtype in tests/ops."""
    from fairseq.models.transformer import TransformerConfig

    from fairseq_plugin.modules.encoder import build_layer

    tcfg = TransformerConfig()
    tcfg.encoder.embed_dim, tcfg.encoder.ffn_embed_dim, tcfg.encoder.attention_heads = C, 2 * C, H
    tcfg.dropout = 0.0  # the fp32 and half layers must see the same function
    torch.manual_seed(0)
    layer = build_layer(tcfg, AttentionConfig(**cfg)).train()
    x, padding = inputs()
    torch.manual_seed(1)  # the hash planes come from the global RNG
    expected = layer(x, padding)
    half = layer.to(dtype)
    xx = x.to(dtype).requires_grad_(True)
    torch.manual_seed(1)
    got = half(xx, padding)
    assert got.dtype == dtype and got.shape == expected.shape
    real = ~padding.T  # (T, B)
    assert torch.isfinite(got[real]).all()
    got[real].float().square().sum().backward()
    grads = {name: p.grad for name, p in half.named_parameters()}
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads.values()), [
        name for name, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert torch.isfinite(xx.grad).all()
    if cfg.get("attention_type", "softmax") in ("softmax", "i_clustered"):
        scale = expected[real].abs().max()
        assert (got[real].float() - expected[real]).abs().max() <= 0.05 * scale
