"""Weights files every model family reads the same way: a state_dict from a checkpoint, whether it fits a model
(one line naming the first mismatching keys), and the warning for random weights."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from models.errors import ModelError


def read_state_dict(path: str) -> dict:
    """A state_dict from a file: plain, nested under 'state_dict'/'model', or saved from DataParallel."""
    file = Path(path)
    if not file.is_file():
        raise ModelError(f"weights file not found: {file}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors all mean the same to a user
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise ModelError(f"cannot read weights file {file}: not a PyTorch checkpoint saved with torch.save "
                         f"({exc.__class__.__name__}: {first})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {file} does not hold a state_dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def state_dict_mismatch(expected: dict, given: dict, shown: int = 3) -> str:
    """'' when ``given`` fits a model whose state_dict is ``expected``; otherwise one line naming the first
    missing, unexpected and differently shaped keys."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
        if keys:
            more = f", ... ({len(keys)} in all)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label}: " + ", ".join(keys[:shown]) + more)
    return "; ".join(parts)


def check_fits(model: nn.Module, state_dict: dict, name: str, path: str) -> None:
    """A one-line ModelError naming the first mismatching keys when ``state_dict`` does not fit ``model``."""
    detail = state_dict_mismatch(model.state_dict(), state_dict)
    if detail:
        raise ModelError(f"weights file {path} does not fit {name}: {detail}")


def load_into(model: nn.Module, state_dict: dict, name: str, path: str) -> None:
    check_fits(model, state_dict, name, path)
    model.load_state_dict(state_dict)


def warn_random(name: str) -> None:
    """A warning that ``name`` runs with random weights (smoke runs, tests)."""
    warnings.warn(f"{name} uses RANDOM weights: maps show the pipeline, not a trained model's evidence",
                  stacklevel=3)
