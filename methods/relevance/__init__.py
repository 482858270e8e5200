"""Relevance (LRP) family on torchvision VGG and ResNet models."""
from methods.relevance.explainers import AGF, CLRP, LRP, RAP, RSP, RULES, SGLRP, SeededPropagation
from methods.relevance.network import SUPPORTED, Composite, RelevanceNet, build_chain

__all__ = ["AGF", "CLRP", "LRP", "RAP", "RSP", "RULES", "SGLRP", "SUPPORTED", "Composite", "RelevanceNet",
           "SeededPropagation", "build_chain"]
