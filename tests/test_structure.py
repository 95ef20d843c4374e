"""The package's import graph, read from the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import mlx_paligemma

ROOT = Path(mlx_paligemma.__file__).parent
PACKAGE = "mlx_paligemma"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((PACKAGE, *parts))


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (a package's __init__ only when named itself)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                # `from . import x`, `from .a import b`: x and a.b may be modules themselves
                targets.update(f"{module}.{a.name}" if f"{module}.{a.name}" in files else module for a in node.names)
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read_right():
    graph = import_graph()
    assert f"{PACKAGE}.api" in graph[PACKAGE]  # from .api import ...
    assert f"{PACKAGE}.torch_backend.cpu_kernels" in graph[f"{PACKAGE}.torch_backend.gemma"]  # from . import cpu_kernels
    assert f"{PACKAGE}.config" in graph[f"{PACKAGE}.torch_backend.gemma"]  # from ..config import ...
    assert f"{PACKAGE}.demo" in graph[f"{PACKAGE}.api"]  # an import inside a function counts
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_cpu_kernels_is_a_leaf():
    assert import_graph()[f"{PACKAGE}.torch_backend.cpu_kernels"] == set()


def test_the_library_never_imports_the_developer_tools():
    graph = import_graph()
    users = {m for m, targets in graph.items() if any(t.startswith(f"{PACKAGE}.dev") for t in targets)}
    # `paligemma bench` is dispatched by the command line
    assert {u for u in users if not u.startswith(f"{PACKAGE}.dev")} == {f"{PACKAGE}.cli"}
