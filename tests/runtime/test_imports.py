"""The runtime modules import each other in one direction only, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import egp_export

PACKAGE = Path(egp_export.__file__).parent


def _imports(path: Path) -> set[str]:
    """Every egp_export module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("egp_export"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("egp_export"))
    return found


def _runtime_graph() -> dict[str, set[str]]:
    modules = {f"egp_export.runtime.{p.stem}": p for p in (PACKAGE / "runtime").glob("*.py") if p.stem != "__init__"}
    return {name: _imports(path) & set(modules) - {name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path + [node, target]
            if target not in state and (found := visit(target, path + [node])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_runtime_modules_have_no_import_cycle():
    graph = _runtime_graph()
    assert "egp_export.runtime.tensorrt" in graph["egp_export.runtime.backends"]  # the builder is used by a backend
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
