"""The layers of docs/ARCHITECTURE.md hold: no module imports one of a higher layer, and no import
circle exists, counting imports inside functions too (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.paths import REPO

PACKAGE = REPO / "dcp_forge"

# Bottom to top. A module may import modules of its own layer or below. The first matching prefix
# decides a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("dcp_forge._version", "dcp_forge.errors", "dcp_forge._torch_compat", "dcp_forge.gc_pause"),
    ("dcp_forge.core", "dcp_forge.rng", "dcp_forge.statefuls", "dcp_forge.rank_exchange"),
    ("dcp_forge.format",),
    ("dcp_forge.storage", "dcp_forge.collectives"),
    ("dcp_forge.planners", "dcp_forge.replication"),
    ("dcp_forge.ops", "dcp_forge.loading"),
    ("dcp_forge.async_save", "dcp_forge.async_staging", "dcp_forge.async_process", "dcp_forge.teardown",
     "dcp_forge.tiers"),
    ("dcp_forge.coordinator",),
    ("dcp_forge.manager",),
    ("dcp_forge.integrations", "dcp_forge.trainers"),
    ("dcp_forge.cli", "dcp_forge"),  # the package facade re-exports everything, lazily
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes if p != "dcp_forge"):
            return index
    if module == "dcp_forge":
        return len(LAYERS) - 1
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py: add it where it belongs")


def imports_of(path: Path) -> set[str]:
    """The dcp_forge modules ``path`` imports (resolved; ``from . import x`` counts as module x)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("dcp_forge"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dcp_forge"):
                continue
            for alias in node.names:  # "from .storage import lifecycle" imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if module_exists(candidate) else target)
    found.discard(me)
    return found


def module_exists(name: str) -> bool:
    relative = Path(*name.split(".")[1:])
    return (PACKAGE / relative).with_suffix(".py").exists() or (PACKAGE / relative / "__init__.py").exists()


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(module):
    mine = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > mine)
    assert not upward, f"{module} (layer {mine}) imports higher layers: {upward}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if not m.startswith("dcp_forge.storage")))
def test_storage_is_used_through_its_package_interface(module):
    inside = sorted(t for t in GRAPH[module] if t.startswith("dcp_forge.storage."))
    assert not inside, f"{module} reaches past dcp_forge.storage's interface into {inside}"


def test_no_import_circles():
    # A package imports its own submodules' names through __init__; a circle through a package facade
    # is still a circle, so packages take part like modules do.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH.get(module, ())):
            if target == "dcp_forge":  # the lazy facade (PEP 562): it imports nothing when loaded
                continue
            if state.get(target) == 1:
                circle = stack[stack.index(target):] + [target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if state.get(target) is None:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if state.get(module) is None:
            visit(module)
