"""One registry of explainers by name, used by every script and by UCAG; with each method the options it takes
(:class:`methods.options.Option`, declared next to the method), from which the scripts make their flags."""
from __future__ import annotations

from collections.abc import Callable

import torch

from methods import cam, cameras, excitation, extremal, gradients, igcam, normgrad, perturbation, sise
from methods.adapters import (
    GRADCAM_LIB_PREFIX,
    CaptumExplainer,
    GradCamLibExplainer,
    captum_class,
    gradcam_lib_class,
)
from methods.base import Explainer
from methods.baselines import Center
from methods.cam import GradCAM, GradCAMPlusPlus, LayerCAM, WGradCAM, XGradCAM
from methods.errors import MethodError
from methods.options import Option
from methods.relevance import AGF, CLRP, LRP, RAP, RSP, SGLRP
from methods.relevance.explainers import LRP_OPTIONS
from methods.transformer import CPLRP, GradRollout, Rollout, TransformerAttribution
from methods.transformer.rollout import ROLLOUT_OPTIONS
from models.preprocessing import normalize
from models.spec import ModelSpec

Builder = Callable[..., Explainer]
_BUILDERS: dict[str, Builder] = {}
_ALIASES: dict[str, str] = {}
_OPTIONS: dict[str, tuple[Option, ...]] = {}


def register(name: str, *aliases: str, options: tuple[Option, ...] = ()) -> Callable[[Builder], Builder]:
    """Decorator: make ``builder(spec, **options) -> Explainer`` available as ``name``; ``options`` declares
    the keyword options the builder takes (the scripts make a flag of each). An option is one declaration:
    another one with the same name or flag is refused."""
    for option in options:
        for other in declared_options():
            if other is not option and (other.name == option.name or other.flag == option.flag):
                raise ValueError(f"{name}: option {option.name} ({option.flag}) clashes with another declaration "
                                 f"{other.name} ({other.flag}); register the same Option object")

    def decorate(builder: Builder) -> Builder:
        _BUILDERS[name] = builder
        _OPTIONS[name] = tuple(options)
        for alias in aliases:
            _ALIASES[alias] = name
        return builder
    return decorate


def declared_options() -> dict[Option, list[str]]:
    """Every declared option (in registration order) with the methods that take it."""
    methods: dict[Option, list[str]] = {}
    for name, options in _OPTIONS.items():
        for option in options:
            methods.setdefault(option, []).append(name)
    return methods


def available_methods() -> list[str]:
    return sorted(_BUILDERS)


def method_options(name: str) -> tuple[str, ...]:
    """The names of the options ``name`` takes."""
    return tuple(option.name for option in _OPTIONS.get(canonical_name(name), ()))


CAPTUM_PREFIX = "captum:"  # captum:<ClassName>: a Captum attribution class (methods.adapters.CaptumExplainer)


def canonical_name(name: str) -> str:
    """Registry name for ``name`` or an alias (case-insensitive); ``captum:<ClassName>`` names a Captum class
    (checked, with close matches for a typo); unknown names raise MethodError."""
    if name.lower().startswith(CAPTUM_PREFIX):
        return CAPTUM_PREFIX + captum_class(name[len(CAPTUM_PREFIX):]).__name__
    if name.lower().startswith(GRADCAM_LIB_PREFIX):
        return GRADCAM_LIB_PREFIX + gradcam_lib_class(name[len(GRADCAM_LIB_PREFIX):]).__name__
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _BUILDERS:
        raise MethodError(f"unknown method '{name}'; valid names: {', '.join(available_methods())}")
    return key


def build_explainer(name: str, spec: ModelSpec, **options) -> Explainer:
    """The explainer ``name`` for the model described by ``spec``; a bad option value raises MethodError."""
    key = canonical_name(name)
    if key.startswith(CAPTUM_PREFIX):
        return CaptumExplainer(spec.model, key[len(CAPTUM_PREFIX):], spec.layer, **options)
    if key.startswith(GRADCAM_LIB_PREFIX):
        tokens = spec.activation_post if spec.token_layout else None  # ViT/Swin tokens -> (B, C, h, w)
        return GradCamLibExplainer(spec.model, key[len(GRADCAM_LIB_PREFIX):], spec.layer, tokens, **options)
    try:
        return _BUILDERS[key](spec, **options)
    except ValueError as exc:
        raise MethodError(f"{name}: {exc}") from None


def _cam_builder(cls):
    def build(spec: ModelSpec, **options) -> Explainer:
        return cls(spec.model, spec.layer, spec.activation_post, **options)
    return build


register("gradcam", "grad-cam")(_cam_builder(GradCAM))
register("gradcam++", "gradcampp", "gradcamplusplus", "grad-cam++", options=(cam.ALPHA_EPS,))(
    _cam_builder(GradCAMPlusPlus))
register("xgradcam", "xgrad-cam", "axiom", options=(cam.ACTIVATION_SUM_EPS,))(_cam_builder(XGradCAM))
register("wgradcam", "wgrad-cam", "weighted-gradcam")(_cam_builder(WGradCAM))
register("layercam", "layer-cam")(_cam_builder(LayerCAM))
register("center")(lambda spec, **options: Center(spec.model))
register("normgrad", "norm-grad", options=normgrad.NORMGRAD_OPTIONS)(normgrad.build_normgrad)


def input_bounds(spec: ModelSpec) -> tuple:
    """Normalised values of black and white pixels: the z^B rule's box, on the model's device (the rule
    moves them to each input's device, a copy only when the model has moved since)."""
    param = next(spec.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    return (normalize(torch.zeros(1, 3, 1, 1, device=device), spec),
            normalize(torch.ones(1, 3, 1, 1, device=device), spec))


def _relevance_builder(cls):
    """LRP, CLRP, SGLRP: z^B at the input with the box of normalised black and white pixels."""
    def build(spec: ModelSpec, **options) -> Explainer:
        return cls(spec.model, input_bounds(spec), **options)
    return build


def _seeded_builder(cls):
    """RAP, RSP, AGF: z^B with each image's own min/max, no box from the preprocessing."""
    def build(spec: ModelSpec) -> Explainer:
        return cls(spec.model)
    return build


register("lrp", options=LRP_OPTIONS)(_relevance_builder(LRP))
register("clrp", "c-lrp", options=LRP_OPTIONS)(_relevance_builder(CLRP))
register("sglrp", "sg-lrp", options=LRP_OPTIONS)(_relevance_builder(SGLRP))
register("rap")(_seeded_builder(RAP))
register("rsp")(_seeded_builder(RSP))
register("agf")(_seeded_builder(AGF))


register("scorecam", "score-cam", options=perturbation.SCORECAM_OPTIONS)(perturbation.build_scorecam)
register("rise", options=perturbation.RISE_OPTIONS)(perturbation.build_rise)
register("extremal", "extremal-perturbation", "extremal_perturbation", options=extremal.EXTREMAL_OPTIONS)(
    extremal.build_extremal)
register("fullgrad", "full-grad", options=gradients.FULLGRAD_OPTIONS)(gradients.build_fullgrad)
register("gradient", "saliency", "vanilla")(gradients.build_gradient)
register("guided", "guided-backprop", "guidedbackprop")(gradients.build_guided)
register("deconv", "deconvnet")(gradients.build_deconv)
register("mwp", "excitation-backprop", "ebp", options=(excitation.SALIENCY_LAYER,))(excitation.build_mwp)
register("cmwp", "c-mwp", "contrastive-excitation-backprop", "c-ebp", options=(excitation.SALIENCY_LAYER,))(
    excitation.build_cmwp)

register("igcam", "integrated-gradcam", options=igcam.IGCAM_OPTIONS)(igcam.build_igcam)
register("cameras", options=cameras.CAMERAS_OPTIONS)(cameras.build_cameras)

register("sise", options=sise.SISE_OPTIONS)(sise.build_sise)
register("adasise", "ada-sise", options=sise.SISE_OPTIONS)(sise.build_adasise)


def _transformer_builder(cls):
    """The transformer methods on ``spec.model`` (a timm ViT-style model); any other model: MethodError."""
    def build(spec: ModelSpec, **options) -> Explainer:
        return cls(spec.model, spec.name, **options)
    return build


register("rollout", "attention-rollout", options=ROLLOUT_OPTIONS)(_transformer_builder(Rollout))
register("gradrollout", "grad-rollout", "generic-attention")(_transformer_builder(GradRollout))
register("transformer_attribution", "chefer", "transformer-attribution")(_transformer_builder(TransformerAttribution))
register("cplrp", "cp-lrp")(_transformer_builder(CPLRP))
