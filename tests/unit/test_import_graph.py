"""The shape of the house, read from the source (every import, top-level or inside a function):

- no cycle between modules;
- `rewardmodel` (what a reward model is: inputs, rendering, loading, stats) imports no other package of ours;
- `service` never imports `training` (training may use the service, e.g. Best-of-N evaluation, not the reverse);
- `clients` need only `clients` and `protos` (users install them beside their trainers, without torch);
- nothing imports `rewardserve` (the command and the import face sit above everything).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("rewardserve", "rewardmodel", "service", "training", "clients", "protos")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            found[module_name(path)] = path
    return found


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` is or lies in (`a.b.c` -> `a.b` when c is a name in a.b)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    # a package's __init__ is what `from pkg import x` names first; our __init__ files are empty, so an import
    # of `pkg.x` counts as an import of module `pkg.x` (resolve picks the longest), not of `pkg`
    return {name: imports_of(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_finder_sees_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def top(name: str) -> str:
    return name.split(".")[0]


ALLOWED = {
    "rewardmodel": {"rewardmodel"},
    "clients": {"clients", "protos"},
    "protos": {"protos"},
    "service": {"service", "rewardmodel", "protos"},
    "training": {"training", "rewardmodel", "service", "clients", "protos"},
    "rewardserve": set(PACKAGES),
}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_they_may(graph, package):
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items() if top(module) == package
        for target in targets if top(target) not in ALLOWED[package]
    )
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"


def test_nothing_imports_the_command(graph):
    wrong = sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if top(t) == "rewardserve" and top(m) != "rewardserve")
    assert not wrong


def test_the_graph_is_read(graph):
    """Guards the reader itself: known arrows are found, relative imports resolve."""
    assert "service.house" in graph["service.http_api.score_routes"]
    assert "rewardmodel.rendering" in graph["training.data"]
    assert "service.runtime" in graph["rewardserve.cli"]  # a lazy import inside a function counts
