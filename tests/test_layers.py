"""The packages form layers: each imports only from the layers below it (and itself).

common (exceptions, image files, drawing) < models < methods < ucag < evaluation < app (flags, one-line
errors) < the scripts. Library packages take plain values: none of them parses command lines.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ["common", "models", "methods", "ucag", "evaluation", "app"]
SCRIPTS = ["visualization", "insdel", "density", "pointing_game", "segmentation", "reproduce"]
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


def module_name(path: Path, root: Path = REPO) -> str:
    """'models.registry' for models/registry.py, 'models' for models/__init__.py."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_edges(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` imports, wherever the import stands (``from pkg import mod``
    counts as importing ``pkg.mod`` when that is a module, and ``pkg`` itself only for names defined there)."""
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            edges |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & known
            edges |= submodules
            if node.module in known and len(submodules) < len(node.names):  # a name from the module itself
                edges.add(node.module)
    return edges


def import_cycles(files: list[Path], root: Path = REPO) -> list[list[str]]:
    """Cycles of imports between modules of one package (a module importing another that imports it back,
    directly or through others of that package)."""
    known = {module_name(path, root) for path in files}
    graph = {module_name(path, root): {m for m in import_edges(path, known)
                                       if m.split(".")[0] == module_name(path, root).split(".")[0]}
             for path in files}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_cycle_inside_a_package(layer):
    assert import_cycles(modules_of(layer)) == []


def test_the_cycle_check_sees_a_cycle(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import f\n")
    (package / "b.py").write_text("def f():\n    from pkg import a\n")
    (package / "c.py").write_text("import pkg.a\n")
    assert import_cycles(sorted(package.glob("*.py")), tmp_path) == [["pkg.a", "pkg.b", "pkg.a"]]
