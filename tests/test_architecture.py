"""The packages' dependencies point one way (docs/architecture.md), read from the source's imports.

    gateway ──▶ quota ──▶ metering
       └────▶ billing_sync ──▶ metering

Inside `gateway`, the command line is the top: nothing of the served product imports `gateway.cli`
(so `serve` never loads development helpers), and the configuration imports none of the parts it
configures. No module-level import cycle exists anywhere. Pure Python: it parses the files, imports
nothing.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateway", "quota", "metering", "billing_sync")

# What each part may import besides itself; the first matching prefix of a module's name decides.
ALLOWED: tuple[tuple[str, frozenset[str]], ...] = (
    ("metering", frozenset()),
    ("quota", frozenset({"metering"})),
    ("billing_sync", frozenset({"metering"})),
    ("gateway.cli", frozenset({"gateway", "quota", "metering", "billing_sync"})),
    ("gateway.config", frozenset({"metering", "quota", "billing_sync"})),
    ("gateway", frozenset({"gateway", "quota", "metering", "billing_sync"})),
)
# Parts of `gateway` that no other part of it may import.
GATEWAY_TOP = ("gateway.cli",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(source: str, module: str, *, top_level_only: bool) -> set[str]:
    """The project modules `module` imports (`from a.b import c` counts as a.b.c and a.b; the caller
    keeps the names that are modules). Imports under `if TYPE_CHECKING:` never run, so they are skipped;
    with `top_level_only`, imports inside functions (run later, lazily) are skipped too."""
    found: set[str] = set()

    def visit(nodes: Iterable[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: against the importing module's package
                    package = module.split(".")[: -node.level]
                    base = ".".join([*package, *([base] if base else [])])
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and top_level_only:
                continue
            else:
                for field in ("body", "orelse", "finalbody"):
                    visit(child for child in getattr(node, field, ()) if isinstance(child, ast.stmt))
                for handler in getattr(node, "handlers", ()):
                    visit(handler.body)

    visit(ast.parse(source).body)
    return {name for name in found if name.split(".")[0] in PACKAGES}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:  # Alembic's scripts are loaded by Alembic, not imported
                continue
            modules[module_name(path)] = path
    return modules


def import_graph(*, top_level_only: bool) -> dict[str, set[str]]:
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        targets = imports_of(path.read_text(), name, top_level_only=top_level_only)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def violations(graph: Mapping[str, set[str]]) -> list[str]:
    """Every import against the direction, as 'importer -> imported'."""
    found = []
    for importer, targets in sorted(graph.items()):
        allowed = next(rule for prefix, rule in ALLOWED if _within(importer, prefix))
        own = next(prefix for prefix, _ in ALLOWED if _within(importer, prefix))
        for target in sorted(targets):
            if any(_within(target, top) and not _within(importer, top) for top in GATEWAY_TOP):
                found.append(f"{importer} -> {target}")
            elif not _within(target, own) and not any(_within(target, part) for part in allowed):
                found.append(f"{importer} -> {target}")
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def without_package_inits(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """The graph without `pkg -> pkg.sub` edges: a package's `__init__` re-exporting its own submodules
    is how a package shows its face, not a cycle of design."""
    return {node: {t for t in targets if not _within(t, node)} for node, targets in graph.items()}


def test_no_module_imports_against_the_direction() -> None:
    graph = import_graph(top_level_only=False)  # lazy imports count too: they run all the same
    assert violations(graph) == []


def test_no_import_cycles() -> None:
    graph = without_package_inits(import_graph(top_level_only=True))
    assert cycles(graph) == []


def test_the_served_gateway_never_loads_the_command_line() -> None:
    graph = import_graph(top_level_only=False)
    for module in ("gateway.server", "gateway.app"):
        reachable, todo = set(), [module]
        while todo:
            for target in graph.get(todo.pop(), ()):
                if target not in reachable:
                    reachable.add(target)
                    todo.append(target)
        assert not [m for m in reachable if _within(m, "gateway.cli")], module


# The checks themselves fail on what they are meant to catch.
@pytest.mark.parametrize(("importer", "imported"), [
    ("metering.keys", "quota.plans"),
    ("quota.limiter", "gateway.errors"),
    ("quota.limiter", "billing_sync.worker"),
    ("billing_sync.worker", "quota.periods"),
    ("billing_sync.worker", "gateway.app"),
    ("gateway.proxy.handler", "gateway.cli.devservices"),
    ("gateway.config.settings", "gateway.proxy.handler"),
])
def test_a_wrong_way_import_is_caught(importer: str, imported: str) -> None:
    assert violations({importer: {imported}, imported: set()}) == [f"{importer} -> {imported}"]


def test_allowed_imports_pass() -> None:
    graph = {"gateway.app": {"quota.limiter", "billing_sync.worker", "gateway.config.settings"},
             "gateway.cli.main": {"gateway.cli.devservices", "gateway.server"},
             "quota.limiter": {"metering.store"}, "billing_sync.worker": {"metering.keys"}}
    assert violations(graph) == []


def test_a_cycle_is_caught() -> None:
    graph = {"gateway.config.settings": {"gateway.config.policy"}, "gateway.config.policy": {"gateway.config.settings"},
             "metering.keys": set()}
    assert cycles(graph) == [["gateway.config.policy", "gateway.config.settings"]]


def test_imports_are_read_from_every_form() -> None:
    source = (
        "import metering.keys\n"
        "from quota import plans\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from gateway.app import Worker\n"
        "def later():\n    from billing_sync import worker\n"
        "try:\n    import gateway.errors\nexcept ImportError:\n    pass\n"
    )
    assert imports_of(source, "x", top_level_only=True) == {"metering.keys", "quota", "quota.plans",
                                                            "gateway.errors"}
    assert "billing_sync.worker" in imports_of(source, "x", top_level_only=False)
