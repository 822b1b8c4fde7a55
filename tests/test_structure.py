"""The layout keeps its promises: imports point down the floors, and the CLI only calls the library.

Floors, from the ground up: 1 the core of ``vitdeploy/`` → 2 ``runtimes/`` → 3 ``exporters/`` →
4 ``benchmarks/`` → 5 ``vitdeploy/pipeline.py``, ``vitdeploy/tune/`` (user features), ``vitdeploy/cli/``,
``vitdeploy/serving/``. A module
may import from its own floor or lower ones, at module level or inside a function (a lazy import
is still a dependency). Found by reading the source (``ast``), so a new module is checked as soon
as it exists.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"vitdeploy": "vitdeploy", "runtimes": "vitdeploy.runtimes", "exporters": "vitdeploy.exporters",
            "benchmarks": "vitdeploy.benchmarks"}
TOP = ("vitdeploy.pipeline", "vitdeploy.tune", "vitdeploy.cli", "vitdeploy.serving", "vitdeploy.__main__")


def floor(module: str) -> int:
    """The floor of a ``vitdeploy...`` module name."""
    if any(module == top or module.startswith(top + ".") for top in TOP):  # vitdeploy.tune_manifest is core
        return 5
    for prefix, level in (("vitdeploy.benchmarks", 4), ("vitdeploy.exporters", 3), ("vitdeploy.runtimes", 2)):
        if module == prefix or module.startswith(prefix + "."):
            return level
    return 1


def modules() -> dict[str, Path]:
    """Every project module by its installed name."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported(name: str, path: Path) -> list[tuple[str, int]]:
    """``(module, line)`` for every vitdeploy import in the file, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    results = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            results += [(alias.name, node.lineno) for alias in node.names if alias.name.startswith("vitdeploy")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("vitdeploy"):
                # `from vitdeploy.exporters import tensorrt_build` imports the submodule
                results += [(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target, node.lineno)
                            for alias in node.names]
    return results


MODULES = modules()


def test_the_walk_sees_every_floor():
    floors = {floor(name) for name in MODULES}
    assert floors == {1, 2, 3, 4, 5}
    assert len(MODULES) > 50


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_floors(name):
    own = floor(name)
    upward = [f"{target} (floor {floor(target)}) at line {line}" for target, line in imported(name, MODULES[name])
              if floor(target) > own]
    assert not upward, f"{name} (floor {own}) imports upward: {upward}"


def test_cli_modules_import_no_other_cli_module():
    for name, path in MODULES.items():
        if not name.startswith("vitdeploy.cli.") or name == "vitdeploy.cli.common":
            continue
        others = [target for target, _ in imported(name, path)
                  if target.startswith("vitdeploy.cli") and target not in ("vitdeploy.cli.common", name)]
        assert not others, f"{name} imports other CLI modules {others}; shared CLI code belongs in cli/common.py"


def test_runtimes_never_import_torch_at_module_level():
    for name, path in MODULES.items():
        if floor(name) != 2:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:  # module level only: runtimes import torch lazily, when opened
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "torch" or n.startswith("torch.") for n in names), f"{name} imports torch at import time"


STUDIES = ROOT / "studies"


def test_the_installed_package_holds_no_study_and_imports_none():
    """One-off studies are scripts in studies/ (run, never imported by vitdeploy); the package keeps only
    what a user command imports."""
    studies = {path.stem for path in STUDIES.glob("*.py")}
    assert {"cpu_int8", "ort_overheads", "outliers", "study"} <= studies
    for name, path in MODULES.items():
        assert path.stem not in studies, f"{name} has the name of a study in studies/"
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imports = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        imports += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level]
        assert not studies & {i.split(".")[0] for i in imports}, f"{name} imports a study"


def test_no_module_cites_an_issue_number():
    import re

    cites = re.compile(r"\bissues? [0-9]")  # this project's issues; upstream ones are cited as #N
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".md", ".sh", ".json"):
                lines = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if cites.search(line)]
                assert not lines, f"{path.relative_to(ROOT)} cites an issue number at line(s) {lines}"
