"""CAM family: Grad-CAM, Grad-CAM++, XGrad-CAM, weighted Grad-CAM, LayerCAM.

Each combines the target layer's activation A (B, C, h, w) with the gradient g = dS_k/dA of the target
logit S_k. Maps are raw and signed (no ReLU): ``sum_c w_c A_c`` or an elementwise variant.
"""
from __future__ import annotations

from abc import abstractmethod

import torch
from torch import nn

from methods.base import Explainer, Explanation
from methods.hooks import LayerCapture, Post
from methods.options import Option, non_negative_real
from methods.targets import target_gradients


class CAM(Explainer):
    """Gradient-weighted class activation maps at ``layer``; subclasses define :meth:`combine`."""

    def __init__(self, model: nn.Module, layer: nn.Module, activation_post: Post | None = None):
        super().__init__(model)
        self.layer = layer
        self.activation_post = activation_post

    def explain(self, x: torch.Tensor, targets: torch.Tensor) -> Explanation:
        with torch.enable_grad(), LayerCapture(self.layer, self.activation_post) as capture:
            logits = capture.forward(self.model, x)
            (grads,) = target_gradients(logits, targets, capture.activation)
        self.check_gradients(grads, self.layer)
        activations = capture.activation.detach().float()  # combined in float32 (bf16 autocast: A and g bf16)
        return Explanation(self.combine(activations, grads.float()), logits.detach())

    @abstractmethod
    def combine(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) activations and gradients -> (B, 1, h, w) raw map."""


class WeightedCAM(CAM):
    """CAMs of the form M = sum_c w_c A_c; subclasses give the channel weights w_c."""

    def combine(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        weights = self.channel_weights(activations, grads)
        return (weights[:, :, None, None] * activations).sum(dim=1, keepdim=True)

    @abstractmethod
    def channel_weights(self, activations: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        """(B, C) weights w_c."""


class GradCAM(WeightedCAM):
    """Grad-CAM (Selvaraju et al. 2017): w_c = mean over positions of g."""

    name = "gradcam"

    def channel_weights(self, activations, grads):
        return grads.mean(dim=(2, 3))


ALPHA_EPS = Option("alpha_eps", "--alpha-eps", 0.0, non_negative_real,
                   "stabiliser added to the denominator of Grad-CAM++'s alpha_ij (0: the authors' code)", type=float)
ACTIVATION_SUM_EPS = Option("activation_sum_eps", "--activation-sum-eps", 1e-7, non_negative_real,
                            "stabiliser added to XGrad-CAM's normaliser sum_ij A_ij", type=float)


class GradCAMPlusPlus(WeightedCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018): w_c = sum_ij alpha_ij relu(g_ij),
    alpha_ij = g_ij^2 / (2 g_ij^2 + sum_ab A_ab g_ij^3).

    ``alpha_eps`` is added to the denominator (pytorch-grad-cam uses 1e-6); the default 0 follows the authors'
    code, which only guards zero denominators. With small gradients (g^2 near 1e-6, common at the last
    layer) the two differ noticeably.
    """

    name = "gradcam++"

    def __init__(self, *args, alpha_eps: float = ALPHA_EPS.default, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha_eps = ALPHA_EPS.validate(alpha_eps)

    def channel_weights(self, activations, grads):
        grads2 = grads.pow(2)
        denominator = 2 * grads2 + activations.sum(dim=(2, 3), keepdim=True) * grads2 * grads + self.alpha_eps
        denominator = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
        alpha = torch.where(grads != 0, grads2 / denominator, torch.zeros_like(grads))
        return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


class XGradCAM(WeightedCAM):
    """XGrad-CAM (Fu et al. 2020): w_c = sum_ij g_ij A_ij / (sum_ij A_ij + eps), eps: ``activation_sum_eps``."""

    name = "xgradcam"

    def __init__(self, *args, activation_sum_eps: float = ACTIVATION_SUM_EPS.default, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation_sum_eps = ACTIVATION_SUM_EPS.validate(activation_sum_eps)

    def channel_weights(self, activations, grads):
        return (grads * activations).sum(dim=(2, 3)) / (activations.sum(dim=(2, 3)) + self.activation_sum_eps)


class WGradCAM(WeightedCAM):
    """Weighted Grad-CAM ("WGradCAM" of the UCAG paper's Table 1, cited as zhang2021novel): the base map of
    SIGCAM in Zhang, Rao and Yang, "A Novel Visual Interpretability for Deep Neural Networks by Optimizing
    Activation Maps with Perturbation", AAAI 2021. Grad-CAM averages the gradients of a channel with
    equal coefficients; weighted Grad-CAM uses the feature map itself as the coefficients:
    w_c = mean_ij A_ij g_ij. (SIGCAM then refines this map with I-GOS mask optimisation; that second,
    perturbation stage is not part of WGradCAM.) Compared with XGrad-CAM, sum(A g) / sum(A), the weights
    keep the channel's activation level: w_c = XGrad-CAM's w_c * mean(A_c)."""

    name = "wgradcam"

    def channel_weights(self, activations, grads):
        return (grads * activations).mean(dim=(2, 3))


class LayerCAM(CAM):
    """LayerCAM (Jiang et al. 2021): M = sum_c relu(g_c) * A_c, elementwise."""

    name = "layercam"

    def combine(self, activations, grads):
        return (grads.clamp(min=0) * activations).sum(dim=1, keepdim=True)
