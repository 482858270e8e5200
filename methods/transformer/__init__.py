"""Transformer explainers for timm ViT-style models: attention rollout, Chefer et al.'s gradient-weighted
attention (generic attention explainability, transformer attribution) and CP-LRP."""
from methods.transformer.capture import AttentionMode, attention_capture, explicit_attention
from methods.transformer.chefer import GradRollout, TransformerAttribution
from methods.transformer.cplrp import CPLRP
from methods.transformer.rollout import Rollout
from methods.transformer.vit import TransformerExplainer, ViTLayout, vit_layout

# registry names of the methods that need a ViT-style transformer
METHODS = ("cplrp", "gradrollout", "rollout", "transformer_attribution")

__all__ = ["CPLRP", "METHODS", "AttentionMode", "GradRollout", "Rollout", "TransformerAttribution",
           "TransformerExplainer", "ViTLayout", "attention_capture", "explicit_attention", "vit_layout"]
