"""The package's layering, read from its source: which subpackage may import which, and no import cycles.

Every import counts, function-local ones included (they hide cycles, not
remove them); imports under ``if TYPE_CHECKING:`` are type hints only.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "egp_export"

# Subpackage -> subpackages it must not import.
FORBIDDEN = {
    "analysis": {"export", "runtime", "prune", "measures", "report", "cli"},
    "passes": {"export", "runtime", "prune", "measures", "report", "cli"},
    "algebra": {"export", "runtime", "prune", "measures", "report", "cli"},
    "export": {"runtime", "prune", "cli"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """Modules of this package that ``path`` imports (absolute and relative, at any depth)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("egp_export"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("egp_export"):
                found.add(target)
                # `from egp_export.x import y` may import the submodule egp_export.x.y
                found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _subpackage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else None


def test_subpackages_import_only_what_their_layer_allows(graph):
    violations = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _subpackage(target) in FORBIDDEN.get(_subpackage(module), set())
    ]
    assert violations == []


def test_nothing_but_the_cli_imports_the_cli(graph):
    violations = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if _subpackage(target) == "cli" and _subpackage(module) != "cli" and module != "egp_export.__main__"
    ]
    assert violations == []


def test_no_import_cycles(graph):
    # Package __init__ files re-export their modules: an edge into a package is an edge into what it re-exports.
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                if not _through_own_package(cycle):
                    cycles.append(" -> ".join(cycle))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert cycles == []


def _through_own_package(cycle: list[str]) -> bool:
    """A package's __init__ importing its own modules, which import siblings through the package: not a cycle."""
    return any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:]))


def test_the_checker_sees_function_local_imports(tmp_path):
    source = tmp_path / "egp_export" / "analysis"
    source.mkdir(parents=True)
    module = source / "sneaky.py"
    module.write_text("def f():\n    from egp_export.cli.main import main\n    return main\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "egp_export"
    try:
        assert "egp_export.cli.main" in _imports(module)
    finally:
        PACKAGE = saved
