"""The layers stay layers: data flows one way (intervention <- client_sdk; intervention <- actors <-
serve_app), nothing on the server imports the client, and no package imports itself in a circle.

Imports are read from the source: module level, inside functions, and under `if TYPE_CHECKING:`
alike (a cycle of annotations is still a tangle; a Protocol says what a layer needs instead).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("intervention", "client_sdk", "actors", "serve_app", "fixtures")
# package -> the packages of this project it may import
ALLOWED = {
    "intervention": set(),
    "client_sdk": {"intervention"},
    "actors": {"intervention"},
    "serve_app": {"intervention", "actors"},
    "fixtures": set(),
}


def _imports(path: Path) -> set[str]:
    """Every module of this project that `path` imports."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _graph() -> dict[str, set[str]]:
    modules = {
        ".".join(p.relative_to(ROOT).with_suffix("").parts): p
        for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
    }
    modules = {name.removesuffix(".__init__"): p for name, p in modules.items()}
    return {name: {m for m in _imports(p) if m in modules and m != name} for name, p in modules.items()}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    graph = _graph()
    bad = sorted(
        (name, dep) for name, deps in graph.items() if name.split(".")[0] == package
        for dep in deps if dep.split(".")[0] not in ALLOWED[package] | {package}
    )
    assert not bad, f"{package} imports what it must not: {bad}"


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles_inside_a_package(package: str) -> None:
    graph = {n: {d for d in deps if d.split(".")[0] == package}
             for n, deps in _graph().items() if n.split(".")[0] == package and n != package}
    # the package's __init__ re-exports its modules: it is the top, not part of a cycle
    visiting, done, cycle = set(), set(), []

    def visit(node: str, path: list[str]) -> None:
        if node in done or cycle:
            return
        if node in visiting:
            cycle.extend(path[path.index(node):] + [node])
            return
        visiting.add(node)
        for dep in sorted(graph.get(node, ())):
            visit(dep, path + [node])
        visiting.discard(node)
        done.add(node)

    for node in sorted(graph):
        visit(node, [])
    assert not cycle, " -> ".join(cycle)
