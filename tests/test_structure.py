"""The package's import graph, read from the source (every import, also those inside functions)."""

from __future__ import annotations

import ast
import re
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


def readme_layout() -> dict[str, str]:
    """The README's layout block: each entry's name (`cli.py`, `  api.py`, `  mlx_backend/`) -> its role."""
    block = (ROOT.parent / "README.md").read_text().split("## Layout", 1)[1].split("```")[1]
    entries: dict[str, str] = {}
    name = None
    for line in block.strip("\n").splitlines():
        if line.startswith(" " * 8):  # the role goes on
            entries[name] += " " + line.strip()
        else:
            indent, name, role = re.match(r"( *)(\S+)\s*(.*)", line).groups()
            name = indent + name
            entries[name] = role.strip()
    return entries


def test_the_readme_layout_lists_every_module():
    entries = readme_layout()
    assert {n for n in entries if n.endswith(".py") and n[0] != " "} == {p.name for p in ROOT.parent.glob("*.py")}  # a clone's
    package = {n.strip() for n in entries if n.startswith("  ")}
    assert package == {p.name for p in ROOT.glob("*.py")} | {f"{p.parent.name}/" for p in ROOT.glob("*/__init__.py")}
    for folder in (p.parent for p in ROOT.glob("*/__init__.py")):
        role = entries[f"  {folder.name}/"]
        if folder.name == "torch_backend":  # "the same files in PyTorch, + ..."
            role += " " + entries["  mlx_backend/"]
        words = set(re.findall(r"\w+", role))
        assert {p.stem for p in folder.glob("*.py")} - {"__init__"} <= words, folder.name
    assert all(entries.values()), [n for n, role in entries.items() if not role]
