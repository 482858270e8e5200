"""The install story: README's commands are the ones CI runs, and every dependency is pinned exactly."""
import importlib.util
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("readme_command", REPO / ".ci" / "readme_command.py")
readme_command_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_command_module)
readme_command = readme_command_module.readme_command


def requirement_names(path: Path) -> set[str]:
    """Direct dependencies named in a requirements file for the running interpreter (a line whose marker does not
    apply, e.g. tomli on Python >= 3.11, is left out), following its -r includes."""
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            names |= requirement_names(path.parent / line[3:].strip())
        else:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                names.add(canonicalize_name(requirement.name))
    return names


def pins(path: Path) -> dict[str, list[Requirement]]:
    pinned: dict[str, list[Requirement]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            requirement = Requirement(line)
            pinned.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return pinned


def test_readme_commands_install_from_the_constraints():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    main = readme_command(text, "ci: main command")
    tests = readme_command(text, "ci: test command")
    assert "-c constraints.txt" in main and "visualization.py" in main
    assert "-c constraints.txt" in tests and "requirements-dev.txt" in tests and "pytest" in tests


def test_readme_command_errors_name_the_problem():
    with pytest.raises(SystemExit, match="no '<!-- x -->' marker"):
        readme_command("text", "x")
    with pytest.raises(SystemExit, match="not followed by a ```bash block"):
        readme_command("<!-- x -->\n```text\nls\n```", "x")
    assert readme_command("<!-- x -->\n\n```bash\nls -l\n```", "x") == "ls -l"


def test_every_dependency_has_an_exact_pin_for_this_python():
    """Each direct and test dependency is pinned with == in constraints.txt, exactly once for the running
    interpreter (universal lock: markers may split a package by Python version)."""
    pinned = pins(REPO / "constraints.txt")
    environment = default_environment()
    direct = requirement_names(REPO / "requirements-dev.txt")
    assert {"torch", "torchvision", "pytest", "grad-cam", "captum", "zennit", "scikit-image", "ruff"} <= direct
    for name in sorted(direct):
        assert name in pinned, f"{name} has no pin in constraints.txt"
        active = [r for r in pinned[name] if r.marker is None or r.marker.evaluate(environment)]
        assert len(active) == 1, f"{name}: {len(active)} pins apply to this Python"
        (specifier,) = active[0].specifier
        assert specifier.operator == "==", f"{name} is not pinned exactly: {active[0]}"
