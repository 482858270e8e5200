"""The packages form layers: each imports only from the layers below it (and itself).

common (exceptions, image files, drawing) < models < methods < ucag < evaluation < app (flags, one-line
errors) < the scripts. Library packages take plain values: none of them parses command lines.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["common", "models", "methods", "ucag", "evaluation", "app"]
SCRIPTS = ["visualization", "insdel", "density", "pointing_game", "segmentation"]
LEVEL = {name: level for level, name in enumerate(LAYERS)} | {name: len(LAYERS) for name in SCRIPTS}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, wherever the import stands (functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def modules_of(layer: str) -> list[Path]:
    return sorted((REPO / layer).rglob("*.py")) if (REPO / layer).is_dir() else [REPO / f"{layer}.py"]


@pytest.mark.parametrize("layer", LAYERS + SCRIPTS)
def test_no_import_runs_up_the_layers(layer):
    files = modules_of(layer)
    assert files, layer
    wrong = [f"{path.relative_to(REPO)} imports {name}" for path in files for name in imported_modules(path)
             if name in LEVEL and LEVEL[name] > LEVEL[layer]]
    assert not wrong, wrong


@pytest.mark.parametrize("layer", LAYERS[:-1])
def test_library_code_parses_no_command_line(layer):
    wrong = [str(path.relative_to(REPO)) for path in modules_of(layer) if "argparse" in imported_modules(path)]
    assert not wrong, wrong


def test_the_check_sees_a_violation(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from app.cli import Parser\n    import evaluation.driver\n")
    assert imported_modules(module) == {"app", "evaluation"}
