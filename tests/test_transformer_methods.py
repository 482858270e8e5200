"""Transformer explainers (rollout, gradrollout, transformer_attribution, cplrp) against explicitly written ViT
math, conservation of CP-LRP, batching, token layouts, dynamic input sizes and the builders' refusals.

The references use :func:`manual_forward`, a ViT forward written out here (the model's own patch embedding,
position embedding and head; attention, LayerNorm and GELU spelled out), so they share no code with
``methods.transformer``; attention gradients come from torch.autograd on that graph.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from methods import build_explainer, method_options
from methods.errors import MethodError
from methods.transformer import CPLRP, GradRollout, Rollout, TransformerAttribution
from methods.transformer.rollout import discard_lowest, rollout_matrix
from models import load_model
from models.spec import ModelSpec
from tests.vit_fixtures import tiny_vit

ALL = (Rollout, GradRollout, TransformerAttribution, CPLRP)


pytestmark = pytest.mark.usefixtures("one_thread")


def manual_forward(model, x, rules=False):
    """(logits, [A^(b)]) of a timm ViT. rules: the CP-LRP forward (LayerNorm's std and GELU's gate constant,
    each A^(b) a detached leaf), otherwise the plain graph with A^(b) in it."""
    def norm(module, t):
        if not rules:
            return module(t)
        centred = t - t.mean(-1, keepdim=True)
        std = (centred.pow(2).mean(-1, keepdim=True) + module.eps).sqrt()
        return centred / std.detach() * module.weight + module.bias

    def act(t):
        return t * (0.5 * (1 + torch.erf(t / math.sqrt(2)))).detach() if rules else F.gelu(t)

    tokens = model._pos_embed(model.patch_embed(x))
    attentions = []
    for block in model.blocks:
        attn = block.attn
        batch, count, dim = tokens.shape
        heads, head_dim = attn.num_heads, dim // attn.num_heads
        qkv = F.linear(norm(block.norm1, tokens), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.reshape(batch, count, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1)
        if rules:
            a = a.detach().requires_grad_(True)
        attentions.append(a)
        tokens = tokens + attn.proj((a @ v).transpose(1, 2).reshape(batch, count, dim))
        tokens = tokens + block.mlp.fc2(act(block.mlp.fc1(norm(block.norm2, tokens))))
    return model.forward_head(norm(model.norm, tokens)), attentions


def target_sum(logits, targets):
    return logits[torch.arange(len(targets)), targets].sum()


def patch_rows(matrix, prefix, grid):
    return matrix[:, 0, prefix:].reshape(matrix.shape[0], 1, *grid)


def gradient_weighted(grads, values):
    relevance = torch.eye(values[0].shape[-1], dtype=values[0].dtype).expand(values[0].shape[0], -1, -1)
    for g, v in zip(grads, values, strict=True):
        relevance = relevance + (g * v).clamp(min=0).mean(1) @ relevance
    return relevance


def zero_biases(model):
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            module.bias.data.zero_()
    return model


MODELS = {
    "vit": lambda: tiny_vit().double(),
    "registers": lambda: tiny_vit(reg_tokens=3, dynamic_img_size=True).double(),
    "distilled": lambda: tiny_vit(cls=VisionTransformerDistilled).double(),
}


def image(batch=2, height=32, width=32, seed=1):
    return torch.randn(batch, 3, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(MODELS))
def test_the_reference_forward_is_the_model(name):
    model = MODELS[name]()
    x = image(2, 32, 48) if name == "registers" else image()
    with torch.no_grad():
        expected = model(x)
        assert torch.allclose(manual_forward(model, x)[0], expected, rtol=1e-12, atol=1e-12)
        assert torch.allclose(manual_forward(model, x, rules=True)[0], expected, rtol=1e-12, atol=1e-12)


# ---- rollout ----------------------------------------------------------------------------------------------

def test_rollout_on_numbers_worked_by_hand():
    """Tokens (cls, p1, p2). A1: everyone attends p1 except p2 itself -> Abar1 = (A1 + I) / 2 =
    [[.5, .5, 0], [0, 1, 0], [0, 0, 1]]; A2 = [[0, 0, 1], [1, 0, 0], [0, 0, 1]] -> Abar2 = [[.5, 0, .5], [.5, .5, 0],
    [0, 0, 1]]. Class row of Abar2 Abar1 = .5 [.5, .5, 0] + .5 [0, 0, 1] = [.25, .25, .5]; the other order,
    Abar1 Abar2, would give [.5, .25, .25]."""
    a1 = torch.tensor([[0.0, 1, 0], [0, 1, 0], [0, 0, 1]])
    a2 = torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 0, 1]])
    matrix = rollout_matrix([a1.view(1, 1, 3, 3), a2.view(1, 1, 3, 3)])
    assert torch.allclose(matrix[0, 0], torch.tensor([0.25, 0.25, 0.5]))
    # two heads (a1, a2) in one block: max -> [[0,1,1],[1,1,0],[0,0,1]] + I, rows / (3, 3, 2);
    # min -> all 0 but [2, 2] = 1, + I, rows / (1, 1, 2); mean -> (max + min) / 2 here, + I, rows / 2
    heads = torch.stack([a1, a2]).view(1, 2, 3, 3)
    third = 1 / 3
    assert torch.allclose(rollout_matrix([heads], "max")[0],
                          torch.tensor([[third, third, third], [third, 2 * third, 0], [0, 0, 1]]))
    assert torch.allclose(rollout_matrix([heads], "min")[0], torch.eye(3))
    assert torch.allclose(rollout_matrix([heads], "mean")[0],
                          torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.75, 0], [0, 0, 1]]))


def test_discard_zeroes_the_lowest_entries_of_each_image():
    fused = torch.tensor([[[0.15, 0.5, 0.35], [0.3, 0.6, 0.1], [0.05, 0.25, 0.7]]])
    expected = torch.tensor([[[0.0, 0.5, 0.35], [0.3, 0.6, 0.0], [0.0, 0.25, 0.7]]])
    batch = torch.cat([fused, fused.flip(-1)])
    out = discard_lowest(batch, 0.34)  # floor(9 * 0.34) = 3 entries per image
    assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[0].flip(-1))
    assert torch.equal(discard_lowest(batch, 0.1), batch)  # floor(0.9) = 0


@pytest.mark.parametrize("depth", [1, 2])
def test_rollout_equals_explicit_attention_math(depth):
    model = tiny_vit(depth=depth).double()
    x = image()
    with torch.no_grad():
        _, attentions = manual_forward(model, x)
    eye = torch.eye(17, dtype=torch.float64)
    expected = eye
    for a in attentions:  # later block on the left
        expected = (0.5 * a.mean(1) + 0.5 * eye) @ expected
    maps, logits = Rollout(model)(x)
    assert torch.allclose(maps, patch_rows(expected, 1, (4, 4)), rtol=1e-12, atol=1e-14)
    assert torch.allclose(logits, model(x).detach(), rtol=1e-12, atol=1e-12)
    if depth == 2:  # the order matters here: the reversed product gives another map
        reversed_order = (0.5 * attentions[0].mean(1) + 0.5 * eye) @ (0.5 * attentions[1].mean(1) + 0.5 * eye)
        assert not torch.allclose(maps, patch_rows(reversed_order, 1, (4, 4)), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.6])
def test_rollout_rows_sum_to_one(fusion, discard):
    model = tiny_vit(depth=3, reg_tokens=2).double()
    matrix, _ = Rollout(model, head_fusion=fusion, discard_ratio=discard).matrix(image())
    assert matrix.shape == (2, 19, 19) and bool((matrix >= 0).all())
    assert torch.allclose(matrix.sum(-1), torch.ones(2, 19, dtype=torch.float64), rtol=1e-12)


def test_uniform_attention_gives_a_uniform_map():
    """q = k = 0 in every block: A = 1/N, Abar = (U + I) / 2 with U^2 = U, so the product of L blocks is
    I / 2^L + (1 - 2^-L) U: every patch gets (1 - 2^-L) / N in the class row."""
    model = tiny_vit(depth=3).double()
    for block in model.blocks:
        block.attn.qkv.weight.data[:32] = 0
        block.attn.qkv.bias.data[:32] = 0
    maps, _ = Rollout(model)(image())
    assert torch.allclose(maps, torch.full((2, 1, 4, 4), (1 - 2 ** -3) / 17, dtype=torch.float64), rtol=1e-12)


class IdentityAttentionViT(VisionTransformer):
    """Every token attends only itself (a boolean attn_mask, honoured by the capture)."""

    def forward(self, x):
        count = self.num_prefix_tokens + self.patch_embed.num_patches
        return super().forward(x, attn_mask=torch.eye(count, dtype=torch.bool, device=x.device))


def test_identity_attention_gives_a_zero_map():
    """A = I: rollout = I, and (grad A * A)^+ is diagonal, so R stays diagonal: no patch in the class row."""
    model = tiny_vit(cls=IdentityAttentionViT).double()
    x = image()
    rollout = Rollout(model)
    matrix, _ = rollout.matrix(x)
    assert torch.allclose(matrix, torch.eye(17, dtype=torch.float64).expand(2, 17, 17))
    for cls in (Rollout, GradRollout, TransformerAttribution):
        maps, _ = cls(model)(x, [1, 2])
        assert maps.shape == (2, 1, 4, 4) and torch.equal(maps, torch.zeros_like(maps)), cls.name


# ---- Chefer et al. ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_gradrollout_matches_hand_computation(name):
    model = MODELS[name]()
    x, targets = image(), torch.tensor([1, 3])
    logits, attentions = manual_forward(model, x)
    grads = torch.autograd.grad(target_sum(logits, targets), attentions)
    expected = gradient_weighted(grads, [a.detach() for a in attentions])
    maps, out = GradRollout(model)(x, targets)
    prefix = model.num_prefix_tokens
    assert torch.allclose(maps, patch_rows(expected, prefix, (4, 4)), rtol=1e-10, atol=1e-14)
    assert torch.allclose(out, logits.detach(), rtol=1e-12, atol=1e-12)
    assert maps.abs().sum() > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_transformer_attribution_matches_hand_computation(name):
    """Abar^(b) = E_h[(grad A * R_A)^+], R_A = A * dS/dA / 2 under the CP-LRP backward, R = R + Abar R."""
    model = MODELS[name]()
    x, targets = image(), torch.tensor([4, 0])
    logits, attentions = manual_forward(model, x)
    grads = torch.autograd.grad(target_sum(logits, targets), attentions)
    ruled_logits, leaves = manual_forward(model, x, rules=True)
    lrp_grads = torch.autograd.grad(target_sum(ruled_logits, targets), leaves)
    relevance = [0.5 * a.detach() * g for a, g in zip(leaves, lrp_grads, strict=True)]
    expected = gradient_weighted(grads, relevance)
    maps, _ = TransformerAttribution(model)(x, targets)
    assert torch.allclose(maps, patch_rows(expected, model.num_prefix_tokens, (4, 4)), rtol=1e-10, atol=1e-14)
    plain = gradient_weighted(grads, [a.detach() for a in attentions])  # gradrollout's: another map
    assert not torch.allclose(maps, patch_rows(plain, model.num_prefix_tokens, (4, 4)), rtol=1e-3)


# ---- CP-LRP -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_cplrp_matches_gradient_times_input_of_the_rules_forward(name):
    model = MODELS[name]()
    x, targets = image().requires_grad_(True), torch.tensor([2, 2])
    logits, _ = manual_forward(model, x, rules=True)
    (grad,) = torch.autograd.grad(target_sum(logits, targets), x)
    maps, out = CPLRP(model)(x.detach(), targets)
    assert maps.shape == (2, 1, 32, 32)
    assert torch.allclose(maps, (x * grad).sum(1, keepdim=True).detach(), rtol=1e-10, atol=1e-14)
    assert torch.allclose(out, model(x).detach(), rtol=1e-12, atol=1e-12)


def additive_tokens(model):
    names = ("cls_token", "dist_token", "reg_token", "pos_embed")
    return [getattr(model, n) for n in names if getattr(model, n, None) is not None]


@pytest.mark.parametrize("name", list(MODELS))
def test_cplrp_conserves_the_logit_without_biases(name):
    """Biases 0: input relevance + the shares of the class/distillation/register tokens and the position
    embedding = the target logit (float64: 1e-10); with those tokens at zero too the input alone carries it."""
    model = zero_biases(MODELS[name]())
    x = image(1, 32, 48) if name == "registers" else image(1)
    logits, relevance, shares = CPLRP(model).relevance(x, torch.tensor([3]), *additive_tokens(model))
    total = relevance.sum() + sum(share.sum() for share in shares)
    assert abs(float(total - logits[0, 3])) <= 1e-10 * abs(float(logits[0, 3]))
    assert all(share.abs().sum() > 0 for share in shares) and relevance.abs().sum() > 0
    for token in additive_tokens(model):
        token.data.zero_()
    x = torch.cat([x, image(1, *x.shape[-2:], seed=5)])
    maps, logits = CPLRP(model)(x, [3, 1])
    explained = logits[[0, 1], [3, 1]]
    assert torch.allclose(maps.flatten(1).sum(1), explained, rtol=1e-10, atol=0)


def test_conservation_fails_without_the_rules_or_with_biases():
    """The checks above can fail: plain Gradient x Input, or biases, leave a gap."""
    model = zero_biases(tiny_vit().double())
    x = image(1).requires_grad_(True)
    tokens = additive_tokens(model)
    logit = model(x)[0, 3]
    grads = torch.autograd.grad(logit, [x, *tokens])
    plain_total = sum(float((t.detach() * g).sum()) for t, g in zip([x, *tokens], grads, strict=True))
    assert abs(plain_total - float(logit.detach())) > 1e-3 * abs(float(logit.detach()))
    for module in model.modules():
        if getattr(module, "bias", None) is not None:
            module.bias.data.fill_(0.1)
    logits, relevance, shares = CPLRP(model).relevance(x.detach(), torch.tensor([3]), *tokens)
    total = relevance.sum() + sum(share.sum() for share in shares)
    assert abs(float(total - logits[0, 3])) > 1e-3 * abs(float(logits[0, 3]))


# ---- every method -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_batch_equals_single_images(cls):
    model = tiny_vit(reg_tokens=1)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 2, 4])
    explainer = cls(model)
    maps, logits = explainer(x, targets)
    for i in range(3):
        single, single_logits = explainer(x[i:i + 1], targets[i:i + 1])
        assert torch.allclose(maps[i], single[0], rtol=1e-4, atol=1e-6 * maps.abs().max())
        assert torch.allclose(logits[i], single_logits[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("size,grid", [((224, 320), (14, 20)), ((320, 320), (20, 20)), ((322, 322), (21, 21))],
                         ids=["224x320", "320x320", "322x322-padded"])
def test_dynamic_input_sizes(cls, size, grid):
    """Patch 16, positions for 224: other sizes through dynamic_img_size; 322 needs timm's dynamic padding
    (322 = 20 * 16 + 2: 21 patches a side; without padding timm refuses 322)."""
    model = tiny_vit(img_size=224, patch_size=16, dynamic_img_size=True, dynamic_img_pad=size[0] % 16 != 0)
    maps, logits = cls(model)(torch.randn(1, 3, *size), [1])
    assert maps.shape == ((1, 1, *size) if cls is CPLRP else (1, 1, *grid))
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0 and logits.shape == (1, 5)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_explainers_restore_the_model(cls, fused):
    model = tiny_vit()
    model.train()
    model.head.weight.requires_grad_(False)
    for block in model.blocks:
        block.attn.fused_attn = fused
    explainer = cls(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps, _ = explainer(x, [1, 2])
        assert not torch.is_grad_enabled()
    assert torch.isfinite(maps).all()

    def explode(module, inputs, output):
        raise RuntimeError("boom")

    handle = model.blocks[-1].register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explainer(x, [1, 2])
    finally:
        handle.remove()
    for _ in range(2):
        assert [b.attn.fused_attn for b in model.blocks] == [fused, fused]
        assert all(m.training for m in model.modules()) and model.head.weight.requires_grad is False
        assert all(p.grad is None for p in model.parameters())
        assert len(torch.overrides._get_current_function_mode_stack()) == 0


def test_precision_choices_under_bf16_autocast():
    """rollout/gradrollout may run in bfloat16 (float32 maps come back); transformer_attribution and cplrp
    opt out and give exactly their float32 maps."""
    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    for cls in ALL:
        explainer = cls(model)
        reference, _ = explainer(x, [1, 2])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            maps, logits = explainer(x, [1, 2])
        assert maps.dtype == torch.float32 and logits.dtype == torch.float32 and torch.isfinite(maps).all()
        if cls.mixed_precision:
            assert (maps - reference).abs().max() <= 0.1 * reference.abs().max()
        else:
            assert torch.equal(maps, reference)


def test_rollout_ignores_the_target_but_checks_it():
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    rollout = Rollout(model)
    assert torch.equal(rollout(x, [0]).maps, rollout(x, [4]).maps)
    with pytest.raises(ValueError, match="out of range"):
        rollout(x, [5])


# ---- registry ---------------------------------------------------------------------------------------------

def spec(model, name="tiny_vit"):
    return ModelSpec(name, model, "", [str(i) for i in range(5)])


def test_registry_names_aliases_and_options():
    model_spec = spec(tiny_vit())
    for name, cls in [("rollout", Rollout), ("attention-rollout", Rollout), ("gradrollout", GradRollout),
                      ("transformer_attribution", TransformerAttribution), ("Chefer", TransformerAttribution),
                      ("cplrp", CPLRP), ("CP-LRP", CPLRP)]:
        assert type(build_explainer(name, model_spec)) is cls
    assert method_options("rollout") == ("head_fusion", "discard_ratio")
    built = build_explainer("rollout", model_spec, head_fusion="max", discard_ratio=0.9)
    assert (built.head_fusion, built.discard_ratio) == ("max", 0.9)
    with pytest.raises(MethodError, match="head_fusion must be one of mean, max, min, got 'median'"):
        build_explainer("rollout", model_spec, head_fusion="median")
    with pytest.raises(MethodError, match=r"discard_ratio must be in \[0, 1\), got 1"):
        build_explainer("rollout", model_spec, discard_ratio=1)
    assert CPLRP.signed and not Rollout.signed
    assert {cls.memory_format for cls in ALL} == {"contiguous"}


def test_builders_refuse_models_that_are_not_vit_style():
    resnet = load_model("resnet18", "random")
    for method in ("rollout", "gradrollout", "chefer"):
        with pytest.raises(MethodError) as error:
            build_explainer(method, resnet)
        assert str(error.value) == (f"{method}: needs a ViT-style transformer with a class token "
                                    "(timm VisionTransformer/DeiT); resnet18 has none")
    with pytest.raises(MethodError, match=r"^cplrp: needs a ViT-style transformer \(timm VisionTransformer/DeiT\); "
                                          r"resnet18 has none$"):
        build_explainer("cplrp", resnet)
    torch.manual_seed(0)
    swin = SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(1,), num_heads=(1,),
                           num_classes=5)
    for method in ("rollout", "cplrp"):
        with pytest.raises(MethodError, match="swin has none"):
            build_explainer(method, spec(swin, "swin"))
    pooled = tiny_vit(global_pool="avg")  # a class token that the head does not read
    with pytest.raises(MethodError, match="its head reads global_pool='avg', not the class token"):
        build_explainer("rollout", spec(pooled))
    maps, _ = build_explainer("cplrp", spec(pooled))(torch.randn(1, 3, 32, 32), [1])  # cplrp needs no class token
    assert maps.shape == (1, 1, 32, 32)
    with pytest.raises(MethodError, match="tiny_vit has no class token"):
        build_explainer("gradrollout", spec(tiny_vit(class_token=False, global_pool="avg")))
    with pytest.raises(MethodError, match="pools its tokens by attention"):
        build_explainer("cplrp", spec(tiny_vit(class_token=False, global_pool="map")))


def test_rollout_flags_reach_the_builder():
    from app.flags import Parser, add_common_flags
    from app.setup import explainer_options
    parser = Parser(prog="t")
    add_common_flags(parser)
    args = parser.parse_args(["rollout", "--head-fusion", "max", "--discard-ratio", "0.9"])
    assert explainer_options(args, "rollout") == {"head_fusion": "max", "discard_ratio": 0.9}
    with pytest.warns(UserWarning) as record:
        assert explainer_options(args, "cplrp") == {}
    assert sorted(str(w.message) for w in record) == ["--discard-ratio has no effect on cplrp",
                                                      "--head-fusion has no effect on cplrp"]
