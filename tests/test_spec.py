"""ModelSpec: typed, frozen facts; a changed layer or weights is a new spec, never an edited one."""
import ast
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from models import ModelSpec, load_model
from models.tokens import ChannelsLastMap

REPO = Path(__file__).resolve().parents[1]
FIELDS = {field.name for field in dataclasses.fields(ModelSpec)}


def toy(**facts) -> ModelSpec:
    return ModelSpec("toy", nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), "0", ("a", "b"), **facts)


def test_a_spec_is_frozen_and_its_facts_are_typed_fields():
    spec = toy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, "target_layer", "1")  # what ``spec.target_layer = "1"`` does  # noqa: B010
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, "weights", "random")  # noqa: B010
    with pytest.raises(TypeError, match="fixd_input"):  # a misspelt fact is refused, not read as False
        toy(fixd_input=True)
    assert (spec.fixed_input, spec.resize_antialias, spec.resize_interpolation, spec.caffe) == (
        False, True, "bilinear", False)
    assert spec.timm_model is None and spec.input_multiple is None and spec.crop_pct is None
    assert spec.num_classes == 2 and spec.layer is spec.model[0]


def test_with_layer_is_a_new_spec_that_keeps_only_a_token_layout():
    relu = toy(activation_post=torch.relu)
    moved = relu.with_layer("1")
    assert (moved.target_layer, moved.activation_post) == ("1", None)  # DenseNet's ReLU belongs to its own layer
    assert (relu.target_layer, relu.activation_post) == ("0", torch.relu)
    layout = ChannelsLastMap()
    assert toy(activation_post=layout).with_layer("1").activation_post is layout  # one layout for every block
    assert moved.model is relu.model and moved.categories == relu.categories


def test_load_model_returns_new_specs_for_the_layer_and_the_weights():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        default = load_model("densenet121", "random")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        moved = load_model("densenet121", "random", target_layer="features.denseblock4")
    assert (default.target_layer, default.activation_post, default.weights) == ("features", torch.relu, "random")
    assert (moved.target_layer, moved.activation_post, moved.weights) == ("features.denseblock4", None, "random")


def spec_assignments(source: str) -> list[str]:
    """``x.<ModelSpec field> = ...`` where x's name says it is a spec (``spec``, ``vit_spec``, ``self.spec``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            for leaf in target.elts if isinstance(target, ast.Tuple) else [target]:
                if (isinstance(leaf, ast.Attribute) and leaf.attr in FIELDS
                        and "spec" in ast.unparse(leaf.value).lower()):
                    found.append(f"{node.lineno}: {ast.unparse(leaf)}")
    return found


def test_no_code_assigns_to_a_spec():
    assert spec_assignments("spec.mean, spec.std = 0, 1\nself.spec.weights += 'x'\nspec.name: str = 'y'\n") == [
        "1: spec.mean", "1: spec.std", "2: self.spec.weights", "3: spec.name"]
    paths = [path for path in REPO.rglob("*.py") if not any(part.startswith(".") for part in path.parts)]
    assert not [f"{path.relative_to(REPO)}:{hit}" for path in paths
                for hit in spec_assignments(path.read_text(encoding="utf-8"))]
