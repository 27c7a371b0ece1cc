"""Module boundaries: no import cycle in localgpt/, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "localgpt"


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Each module → the localgpt modules it imports anywhere in its body (a lazy import inside a function is
    still a dependency: it only moves the cycle to run time)."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("localgpt"):
                found.add(node.module)
                found |= {f"{node.module}.{alias.name}" for alias in node.names} & modules  # submodules by name
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("localgpt")}
        graph[module_name(path)] = (found & modules) - {module_name(path)}
    return graph


def test_no_import_cycles():
    graph, cycles = imports(), []
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            if state.get(dependency) == "open":
                cycles.append(" -> ".join(path[path.index(dependency):] + [dependency]))
            elif dependency not in state:
                visit(dependency, path + [dependency])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_lazy_imports():
    graph = imports()
    assert "localgpt.gguf" in graph["localgpt.hub"]  # imported inside a function
    assert "localgpt.backends.native" in graph["localgpt.backends"]
    assert "localgpt.families" in graph["localgpt.config"] or "localgpt.config" in graph["localgpt.families"]
