"""r21d's modules import each other one way: the intra-package import graph has no cycle.

Every ``import`` / ``from ... import`` statement of every module under r21d/ counts, at module
level and inside functions alike (a lazy import inside a function is still a dependency: it only
hides the cycle from the import system). r21d.triton_kernels lives outside r21d/ and imports
nothing of r21d; it is a leaf here.

r21d.bench (the benchmark tooling, a layer above the library that nothing of the library
imports) is left out of the cycle check: its gpu_check subpackage's modules import each other
lazily both ways (accuracy <-> plan, machine <-> plan, ...). The library's modules, r21d/*.py, may
not.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.utils import REPO_ROOT

PACKAGE = "r21d"
ROOT = REPO_ROOT / PACKAGE


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name ``from <level dots><target>`` means inside ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The r21d modules ``name`` imports (every statement, nested ones included)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, is_package, node.level, node.module)
            for alias in node.names:
                # ``from . import ops``: the submodule r21d.ops; ``from .ops import f``: r21d.ops
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    # only modules of r21d/ are nodes: r21d.triton_kernels (triton_kernels/, mapped into the
    # package by setup.py) and third-party modules are leaves
    return {target for target in found if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (as the list of its modules, first repeated last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        color[node] = GREY
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if color.get(nxt, BLACK) == GREY:
                return stack[stack.index(nxt):] + [nxt]
            if color.get(nxt) == WHITE:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        color[node] = BLACK
        return None

    for node in sorted(graph):
        if color[node] == WHITE:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_sees_the_known_modules():
    graph = import_graph()
    for name in ("r21d", "r21d.ops", "r21d.dispatch", "r21d.unit_ops", "r21d.functional",
                 "r21d.fused_site", "r21d.bench.host"):
        assert name in graph
    assert "r21d.triton_kernels" not in graph  # outside r21d/: a leaf, not a node
    assert "r21d.dispatch" in graph["r21d.functional"]
    # a lazy import inside a function counts: cpu_launch imports dispatch in its function
    assert "r21d.dispatch" in graph["r21d.bench.cpu_launch"]


def library_graph() -> dict[str, set[str]]:
    """The import graph without r21d.bench (see the module docstring)."""
    bench = f"{PACKAGE}.bench"

    def library(name: str) -> bool:
        return name != bench and not name.startswith(bench + ".")

    return {name: {t for t in targets if library(t)}
            for name, targets in import_graph().items() if library(name)}


def test_no_import_cycle():
    cycle = find_cycle(library_graph())
    assert cycle is None, "r21d import cycle: " + " -> ".join(cycle)


def test_the_library_never_imports_the_bench():
    graph = import_graph()
    for name in library_graph():
        assert not any(t.startswith(f"{PACKAGE}.bench") for t in graph[name]), name


def test_ops_dispatch_unit_ops_go_one_way():
    graph = import_graph()
    assert "r21d.ops" not in graph["r21d.dispatch"]
    assert "r21d.ops" not in graph["r21d.unit_ops"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("source, expected", [
    ("from . import ops", {"r21d.ops"}),
    ("from .ops import FUSED_CALLS", {"r21d.ops"}),
    ("def f():\n    from .dispatch import choose\n", {"r21d.dispatch"}),
    ("import r21d.fuse", {"r21d.fuse"}),
    ("from .triton_kernels import _layout", set()),
])
def test_imports_parser(tmp_path, source, expected):
    path = tmp_path / "mod.py"
    path.write_text(source)
    known = {"r21d", "r21d.ops", "r21d.dispatch", "r21d.fuse", "r21d.mod"}
    assert _imports("r21d.mod", path, known) == expected
