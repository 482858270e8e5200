"""Attention capture on timm ViTs: explicit SDPA against torch's, the model unchanged and restored, the CP-LRP
forward functions (values equal, backward modified)."""
import math

import pytest
import torch
import torch.nn.functional as F

from methods.transformer import rules
from methods.transformer.capture import AttentionMode, attention_capture, attention_probabilities, explicit_attention
from tests.vit_fixtures import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def mode_depth() -> int:
    return len(torch.overrides._get_current_function_mode_stack())


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def qkv(heads=3, kv_heads=3, length=5, source=5, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(2, heads, length, dim, dtype=torch.float64, generator=generator),
            torch.randn(2, kv_heads, source, dim, dtype=torch.float64, generator=generator),
            torch.randn(2, kv_heads, source, dim, dtype=torch.float64, generator=generator))


def sdpa_cases():
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(2, 1, 4, 6, generator=generator) > 0.4
    allowed[..., 0] = True  # every query keeps a key
    additive = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=generator)
    return {"plain": ((4, 6), {}), "bool-mask": ((4, 6), {"attn_mask": allowed}),
            "float-mask": ((4, 6), {"attn_mask": additive}), "causal": ((5, 5), {"is_causal": True}),
            "causal-rectangular": ((4, 6), {"is_causal": True}), "scale": ((4, 6), {"scale": 0.3}),
            "gqa": ((4, 6), {"enable_gqa": True})}


@pytest.mark.parametrize("case", list(sdpa_cases()))
def test_explicit_attention_equals_torch_sdpa(case):
    (length, source), kwargs = sdpa_cases()[case]
    q, k, v = qkv(kv_heads=1 if case == "gqa" else 3, length=length, source=source)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert torch.allclose(explicit_attention(q, k, v, **kwargs), expected, rtol=1e-12, atol=1e-12)
    # the same call inside the mode is intercepted (positional arguments too) and its probabilities recorded
    with AttentionMode() as mode:
        out = F.scaled_dot_product_attention(q, k, v, kwargs.get("attn_mask"), 0.0, kwargs.get("is_causal", False),
                                             scale=kwargs.get("scale"), enable_gqa=kwargs.get("enable_gqa", False))
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    (probabilities,) = mode.attentions
    assert probabilities.shape == (2, 3, length, source)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, 3, length, dtype=torch.float64))
    values = v.repeat_interleave(3, dim=1) if case == "gqa" else v
    assert torch.allclose(probabilities @ values, expected, rtol=1e-12, atol=1e-12)


def test_masks_and_causality_zero_the_excluded_keys():
    q, k, _ = qkv(length=5, source=5)
    causal = attention_probabilities(q, k, is_causal=True)
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert torch.all(causal[..., ~lower] == 0) and torch.all(causal[..., lower] > 0)
    allowed = torch.eye(5, dtype=torch.bool)
    identity = torch.eye(5, dtype=torch.float64).expand(2, 3, 5, 5)
    assert torch.equal(attention_probabilities(q, k, attn_mask=allowed), identity)
    with pytest.raises(ValueError, match="not both"):
        attention_probabilities(q, k, attn_mask=allowed, is_causal=True)


def test_attention_dropout_keeps_or_rescales_each_probability():
    """dropout_p > 0 (SDPA in training): each used weight is 0 or P / (1 - p); with v = I the output is them."""
    q, k, _ = qkv(length=6, source=6)
    torch.manual_seed(0)
    with AttentionMode() as mode:
        out = F.scaled_dot_product_attention(q, k, torch.eye(6, dtype=torch.float64).expand(2, 3, 6, 6), dropout_p=0.5)
    (probabilities,) = mode.attentions
    kept = out != 0
    assert 0 < int(kept.sum()) < out.numel()
    assert torch.allclose(out[kept], 2 * probabilities[kept])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_capture_leaves_the_forward_and_the_model_unchanged(fused):
    model = tiny_vit(depth=3)
    for block in model.blocks:
        block.attn.fused_attn = fused
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    attentions = [block.attn for block in model.blocks]
    with torch.no_grad(), attention_capture(attentions) as mode:
        assert all(a.fused_attn for a in attentions) and mode_depth() == 1
        captured = model(x)
    assert (captured - plain).abs().max() <= 1e-6
    assert [tuple(a.shape) for a in mode.attentions] == [(2, 2, 17, 17)] * 3
    assert all(torch.allclose(a.sum(-1), torch.ones(2, 2, 17)) for a in mode.attentions)
    assert [a.fused_attn for a in attentions] == [fused] * 3 and mode_depth() == 0
    assert hook_count(model) == 0
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_capture_restores_the_model_after_an_exception(fused):
    model = tiny_vit()
    for block in model.blocks:
        block.attn.fused_attn = fused

    def explode(module, inputs, output):
        assert mode_depth() == 1
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"), \
                attention_capture([b.attn for b in model.blocks], relevance_rules=True):
            model(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert [b.attn.fused_attn for b in model.blocks] == [fused, fused]
    assert mode_depth() == 0 and hook_count(model) == 0


def test_relevance_rules_keep_the_values():
    model = tiny_vit(depth=3).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        plain = model(x)
        with attention_capture([b.attn for b in model.blocks], relevance_rules=True) as mode:
            ruled = model(x)
    assert torch.allclose(ruled, plain, rtol=1e-12, atol=1e-12)
    assert len(mode.attentions) == 3 and not any(a.requires_grad for a in mode.attentions)


def test_attention_gradients_exist_for_a_frozen_model():
    """Nothing before the first attention requires grad: its probabilities become the graph's leaf."""
    model = tiny_vit()
    model.requires_grad_(False)
    with torch.enable_grad(), attention_capture([b.attn for b in model.blocks], attention_grads=True) as mode:
        logits = model(torch.randn(1, 3, 32, 32))
        grads = torch.autograd.grad(logits[0, 1], mode.attentions)
    assert mode.attentions[0].is_leaf and not mode.attentions[1].is_leaf
    assert all(g.abs().sum() > 0 for g in grads)


def test_layer_norm_rule_values_and_constant_std():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    weight, bias = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    out = rules.layer_norm(x, (6,), weight, bias, 1e-6)
    assert torch.allclose(out, F.layer_norm(x, (6,), weight, bias, 1e-6), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, g)
    std = (x.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt().detach()
    gw = g * weight / std  # d/dx of (x - mean(x)) * w / std with std constant: centred gw
    assert torch.allclose(grad, gw - gw.mean(-1, keepdim=True), rtol=1e-12, atol=1e-12)
    two_dims = rules.layer_norm(x, (4, 6), eps=1e-5)
    assert torch.allclose(two_dims, F.layer_norm(x, (4, 6), eps=1e-5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_rule_passes_relevance_unchanged(approximate):
    """Value gelu(x); gradient gelu(x) / x (the gate), so x * grad = gelu(x) * upstream: relevance passes as is."""
    x = torch.linspace(-4, 4, 41, dtype=torch.float64, requires_grad=True)
    out = rules.gelu(x, approximate)
    assert torch.allclose(out, F.gelu(x, approximate=approximate), rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, x, upstream)
    assert torch.allclose(x * grad, out * upstream, rtol=1e-12, atol=1e-12)
    (plain,) = torch.autograd.grad(F.gelu(x, approximate=approximate), x, upstream)
    assert not torch.allclose(plain, grad)
    assert math.isclose(float(rules.gelu_gate(torch.zeros(1, dtype=torch.float64))), 0.5)


def test_silu_rule():
    x = torch.linspace(-4, 4, 17, dtype=torch.float64, requires_grad=True)
    out = rules.silu(x)
    assert torch.allclose(out, F.silu(x))
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(grad, torch.sigmoid(x))
