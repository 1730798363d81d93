"""The gateway's architecture, written down as import-linter contracts in pyproject.toml
(`[tool.importlinter]`): they hold, they fail when an import breaks them, every module has its
place in the layers, and no import cycle is left in `gateway` (type-checking imports included: a
cycle of types is a cycle too)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp

if sys.version_info >= (3, 11):
    import tomllib
else:  # import-linter's own dependency there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
# A known import that breaks the layers: metrics (near the bottom) reaching up into storage,
# which records through metrics (a cycle, as metrics had before it got its own vocabulary).
BREAKING_IMPORT = "from gateway.upload import uploader  # noqa: F401\n"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the `gateway` package under `tree`, with the contracts of its
    pyproject.toml."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        check=False,  # the caller reads the verdict
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """For each import that closes a cycle, the cycle: the importer, then the shortest chain
    from what it imports back to it."""
    return [
        (importer, *chain)
        for importer in sorted(graph.modules)
        for imported in sorted(graph.find_modules_directly_imported_by(importer))
        if (chain := graph.find_shortest_chain(imported, importer))
    ]


def broken_copy(tmp_path: Path) -> Path:
    """The project's gateway package and contracts under `tmp_path`, metrics importing the
    uploader."""
    shutil.copytree(
        ROOT / "gateway", tmp_path / "gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    metrics = tmp_path / "gateway" / "metrics.py"
    metrics.write_text(metrics.read_text() + BREAKING_IMPORT)
    return tmp_path


def test_the_contracts_hold() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_fail_when_an_import_breaks_the_layers(tmp_path: Path) -> None:
    result = lint_imports(broken_copy(tmp_path))
    assert result.returncode != 0
    assert "The gateway in layers" in result.stdout and "BROKEN" in result.stdout
    assert "gateway.metrics -> gateway.upload.uploader" in result.stdout, result.stdout


def test_every_module_has_its_place_in_the_layers() -> None:
    """A new module outside every layer would escape the layers contract."""
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = next(c for c in contracts["contracts"] if c["type"] == "layers")["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    graph = grimp.build_graph("gateway")
    packages = {module for module in graph.modules if graph.find_children(module)}
    unplaced = {
        module
        for module in graph.modules - packages
        if not any(module == name or module.startswith(f"{name}.") for name in placed)
    }
    assert unplaced == set()


def test_no_import_cycle_in_the_gateway() -> None:
    assert import_cycles(grimp.build_graph("gateway")) == []


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    tree = broken_copy(tmp_path)
    # In a process of its own: this one has imported the real `gateway` already.
    script = (
        "import json, grimp\n"
        "from tests.gateway.test_architecture import import_cycles\n"
        "print(json.dumps(import_cycles(grimp.build_graph('gateway'))))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": os.pathsep.join((str(tree), str(ROOT)))},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    cycles = json.loads(result.stdout)
    assert ["gateway.metrics", "gateway.upload.uploader", "gateway.metrics"] in cycles
