"""Relevance (LRP) family on torchvision VGG and ResNet models."""
from methods.relevance.explainers import AGF, CLRP, LRP, RAP, RSP, RULES, SGLRP
from methods.relevance.network import SUPPORTED, RelevanceNet, build_chain

__all__ = ["AGF", "CLRP", "LRP", "RAP", "RSP", "RULES", "SGLRP", "SUPPORTED", "RelevanceNet", "build_chain"]
