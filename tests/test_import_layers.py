"""The package's shape: no import circle, and each stage imports only the stages below it (docs/ARCHITECTURE.md).

The imports are read from the source (every ``import`` and ``from ... import``, also those inside
functions and under ``TYPE_CHECKING``), so a lazy import does not hide a circle.
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clip_ping"

# Top-level modules every stage may import: what every stage shares.
SHARED = {"errors", "io", "config", "environment", "distributed"}
# What each top-level module or package may import besides itself. A unit missing here fails the test:
# a new package or top-level module takes its place in this table (and in docs/ARCHITECTURE.md).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "io": {"errors"},
    "config": {"errors"},
    "environment": {"errors"},
    "distributed": {"errors"},
    "data": SHARED,
    "model": SHARED,
    "teachers": SHARED | {"model"},
    "banks": SHARED | {"data", "teachers"},
    "knn": SHARED | {"data", "banks"},
    "objectives": SHARED | {"data", "model", "teachers", "banks", "knn"},
    "hub": SHARED | {"model"},
    "training": SHARED | {"data", "model", "teachers", "banks", "knn", "objectives", "hub"},
    "evaluation": SHARED | {"data", "model", "teachers", "hub", "training"},
    "report": SHARED | {"training"},
}
# The modules that face the user: they may import every stage, and no stage imports them.
FRONT = {"__init__", "api", "cli", "plan", "demo"}


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (dotted names; a package is its ``__init__``)."""
    root = package.parent
    modules: dict[str, Path] = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(root).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module or ""
                # `from pkg import sub` imports the module pkg.sub where there is one, else a name of pkg
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        # the root package is always initialised before any of its modules runs: importing a name from it
        # (``from . import __version__``) reads it, it does not start it
        graph[name] = {t for t in targets if t in modules and t not in (name, package.name)}
    return graph


def unit_of(module: str) -> str:
    """The top-level module or package a module belongs to (``clip_ping.banks.format`` -> ``banks``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets if unit_of(t) != unit_of(module))
    return units


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan): each holds an import circle."""
    counter = itertools.count()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = next(counter)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_no_import_circle_between_modules(graph):
    assert circles(graph) == []


def test_no_import_circle_between_packages(graph):
    assert circles(package_graph(graph)) == []


def test_each_package_imports_only_what_the_layering_allows(graph):
    units = package_graph(graph)
    unplaced = sorted(set(units) - set(ALLOWED) - FRONT)
    assert not unplaced, f"place these in ALLOWED (and docs/ARCHITECTURE.md): {unplaced}"
    breaches = {
        f"clip_ping.{unit}": sorted(targets - ALLOWED[unit]) for unit, targets in units.items()
        if unit in ALLOWED and targets - ALLOWED[unit]
    }
    assert breaches == {}, "imports the layering forbids (docs/ARCHITECTURE.md); the modules: " + "; ".join(
        f"{m} -> {sorted(t)}" for m, t in sorted(graph.items()) if unit_of(m) in ALLOWED
        and {unit_of(x) for x in t} - ALLOWED[unit_of(m)] - {unit_of(m)})


def test_no_stage_imports_the_modules_that_face_the_user(graph):
    backwards = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                       if unit_of(m) not in FRONT and unit_of(t) in FRONT)
    assert backwards == []


def test_the_top_level_holds_at_most_ten_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 10, top


def test_the_checks_see_a_circle_and_a_forbidden_import(tmp_path):
    """The checks above can fail: a lazy circle through a package's face, and a stage importing upwards."""
    fake = tmp_path / "clip_ping"
    (fake / "banks").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("")
    (fake / "banks" / "__init__.py").write_text("from .extract import run\n")
    (fake / "banks" / "extract.py").write_text("def run():\n    from ..training import trainer\n")
    (fake / "training").mkdir()
    (fake / "training" / "__init__.py").write_text("")
    (fake / "training" / "trainer.py").write_text("from ..banks import run\nfrom .. import errors\n")
    graph = import_graph(fake)
    assert graph["clip_ping.training.trainer"] == {"clip_ping.banks", "clip_ping.errors"}
    assert circles(graph) == [["clip_ping.banks", "clip_ping.banks.extract", "clip_ping.training.trainer"]]
    assert circles(package_graph(graph)) == [["banks", "training"]]
    assert package_graph(graph)["banks"] - ALLOWED["banks"] == {"training"}
