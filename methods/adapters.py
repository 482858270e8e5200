"""Outside explainers as ordinary explainers (so UCAG, the scripts and the metrics take them as they are).

:class:`CallableExplainer`: any ``f(x, targets) -> maps`` or ``-> (maps, logits)``, behind one check of what
comes back (a tensor of the batch's size on x's device, floating point, finite; maps (B, h, w), (B, 1, h, w)
or (B, C, h, w), channels summed; logits (B, K)), each problem a one-line MethodError. :class:`CaptumExplainer`:
a Captum attribution class by name (``captum:<ClassName>`` in the scripts): input-level methods get the model,
layer methods (``Layer*``) the model and the toolkit's CAM layer, extra keyword arguments (baselines, steps,
window shapes, ...) are passed to ``attribute`` as given; Captum's maps keep their channels summed, raw and
signed, as the toolkit's own methods give them.
"""
from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from methods.base import Explainer, Explanation
from methods.errors import MethodError

ExplainFunction = Callable[[torch.Tensor, torch.Tensor], object]


def checked_maps(value, x: torch.Tensor, what: str) -> torch.Tensor:
    """``value`` as (B, 1, h, w) maps for the batch ``x``, or a MethodError naming what is wrong."""
    batch = x.shape[0]
    if not isinstance(value, torch.Tensor):
        raise MethodError(f"{what} returned {type(value).__name__}, not a tensor of maps")
    if value.device != x.device:
        raise MethodError(f"{what} returned maps on {value.device}, the batch is on {x.device}")
    if not value.is_floating_point():
        raise MethodError(f"{what} returned {value.dtype} maps, not floating point")
    if value.dim() == 3:
        value = value[:, None]
    if value.dim() != 4 or value.shape[0] != batch or min(value.shape[-2:]) < 1:
        raise MethodError(f"{what} returned maps of shape {tuple(value.shape)} for a batch of {batch}: expected "
                          "(B, h, w), (B, 1, h, w) or (B, C, h, w)")
    if value.shape[1] != 1:
        value = value.sum(dim=1, keepdim=True)
    if not bool(torch.isfinite(value).all()):
        raise MethodError(f"{what} returned maps with NaN or infinite values")
    return value


def checked_logits(value, x: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[0] != x.shape[0]:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise MethodError(f"{what} returned logits {shape} for a batch of {x.shape[0]}: expected (B, K)")
    if value.device != x.device:
        raise MethodError(f"{what} returned logits on {value.device}, the batch is on {x.device}")
    return value


class CallableExplainer(Explainer):
    """``function(x, targets)`` as an explainer of ``model``; ``name`` labels it in tables and errors."""

    def __init__(self, model: nn.Module, function: ExplainFunction, name: str = "callable", signed: bool = False):
        super().__init__(model)
        if not callable(function):
            raise MethodError(f"{name}: expected a callable f(x, targets) -> maps, got {type(function).__name__}")
        self.function, self.name, self.signed = function, name, signed

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        result = self.function(x, targets)
        maps, logits = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
        maps = checked_maps(maps, x, self.name)
        logits = self.predict(x) if logits is None else checked_logits(logits, x, self.name)
        return Explanation(maps, logits.detach())

    def __repr__(self) -> str:
        return f"CallableExplainer({self.name})"


def named_class(name: str, module, names: list[str], what: str) -> type:
    """The class ``name`` of ``module`` among ``names`` (case-insensitive); else a MethodError naming the closest
    matches (or every name)."""
    exact = {n.lower(): n for n in names}.get(name.lower())
    if exact is not None:
        return getattr(module, exact)
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; it has {', '.join(names)}"
    raise MethodError(f"unknown {what} class '{name}'{hint}")


def captum_class(name: str) -> type:
    """The Captum attribution class ``name`` (captum.attr)."""
    try:
        from captum import attr
    except ImportError:
        raise MethodError("captum:<ClassName> needs Captum: pip install captum") from None
    names = sorted(n for n, value in vars(attr).items() if not n.startswith("_") and isinstance(value, type)
                   and issubclass(value, attr.Attribution) and "attribute" in dir(value))
    return named_class(name, attr, names, "Captum attribution")


class CaptumExplainer(CallableExplainer):
    """A Captum attribution method on ``model``: ``Layer*`` classes at ``layer`` (the toolkit's CAM layer),
    the others on the input; ``attribute_options`` go to ``attribute`` as given."""

    def __init__(self, model: nn.Module, class_name: str, layer: nn.Module | None = None, **attribute_options):
        cls = captum_class(class_name)
        takes_layer = "layer" in inspect.signature(cls.__init__).parameters
        if takes_layer and layer is None:
            raise MethodError(f"captum:{class_name} is a layer method: it needs the model's layer")
        self.method = cls(model, layer) if takes_layer else cls(model)
        self.attribute_options = attribute_options
        super().__init__(model, self._attribute, name=f"captum:{class_name}")

    def _attribute(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True)  # Captum warns when it has to switch gradients on itself
            return self.method.attribute(inputs, target=targets, **self.attribute_options).detach()


def captum_version() -> str:
    import captum
    return captum.__version__


GRADCAM_LIB_PREFIX = "gradcam-lib:"  # gradcam-lib:<ClassName>: a pytorch-grad-cam CAM class


def gradcam_lib_class(name: str) -> type:
    """The pytorch-grad-cam CAM class ``name``."""
    try:
        import pytorch_grad_cam
        from pytorch_grad_cam.base_cam import BaseCAM
    except ImportError:
        raise MethodError("gradcam-lib:<ClassName> needs pytorch-grad-cam: pip install grad-cam") from None
    names = sorted(n for n, value in vars(pytorch_grad_cam).items()
                   if isinstance(value, type) and issubclass(value, BaseCAM) and value is not BaseCAM)
    return named_class(name, pytorch_grad_cam, names, "pytorch-grad-cam")


def has_raw_maps(cls: type) -> bool:
    """Whether ``cls`` computes its map through BaseCAM's own steps (forward, compute_cam_per_layer), so its raw
    map (before the library's ReLU, min-max and cv2 resize) can be taken from ``get_cam_image``."""
    from pytorch_grad_cam.base_cam import BaseCAM
    return cls.forward is BaseCAM.forward and cls.compute_cam_per_layer is BaseCAM.compute_cam_per_layer


class GradCamLibExplainer(CallableExplainer):
    """A pytorch-grad-cam CAM class on ``model`` at ``layer`` (``reshape_transform``: tokens to (B, C, h, w), the
    toolkit's token layout for ViT/Swin). Raw path (``normalised=False``, where :func:`has_raw_maps`): the
    library's activations, gradients and ``get_cam_image`` give the signed map at the layer's resolution, as
    the toolkit's own CAMs. Otherwise (``normalised=True``, or a class with its own pipeline such as FullGrad or
    AblationCAM) the library's final map: ReLU'd and min-max normalised per image in NumPy at the input size,
    which loses each crop's scale that UCAG's confidence-weighted fold relies on (a warning says so). A new
    CAM object per call: the library's hooks come off the model every time."""

    def __init__(self, model: nn.Module, class_name: str, layer: nn.Module, reshape_transform=None,
                 normalised: bool = False):
        self.cls = gradcam_lib_class(class_name)
        self.layer, self.reshape_transform = layer, reshape_transform
        self.normalised = normalised or not has_raw_maps(self.cls)
        if self.normalised and not normalised:
            warnings.warn(f"gradcam-lib:{self.cls.__name__} has no raw map in pytorch-grad-cam: its maps come ReLU'd "
                          "and min-max normalised per image, so UCAG's fold loses each crop's scale",
                          RuntimeWarning, stacklevel=2)
        super().__init__(model, self._cam, name=f"gradcam-lib:{self.cls.__name__}")

    def _cam(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
        classes = [ClassifierOutputTarget(int(t)) for t in targets.tolist()]
        cam = self.cls(model=self.model, target_layers=[self.layer], reshape_transform=self.reshape_transform)
        try:
            with torch.enable_grad():
                if self.normalised:
                    return torch.from_numpy(cam(input_tensor=x, targets=classes)).to(x.device, torch.float32)
                outputs = cam.activations_and_grads(x)
                if cam.uses_gradients:
                    self.model.zero_grad()
                    sum(target(output) for target, output in zip(classes, outputs, strict=True)).backward()
                activations = cam.activations_and_grads.activations[0].cpu().numpy()
                gradients = cam.activations_and_grads.gradients[0].cpu().numpy() if cam.uses_gradients else None
                raw = cam.get_cam_image(x, self.layer, classes, activations, gradients, False)
        finally:
            cam.activations_and_grads.release()
            self.model.zero_grad(set_to_none=True)
        return torch.from_numpy(np.ascontiguousarray(raw)).to(x.device, torch.float32)


def gradcam_lib_version() -> str:
    from importlib.metadata import version
    return version("grad-cam")
