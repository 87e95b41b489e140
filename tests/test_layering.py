"""The package's layering, read from its source: an ordered list of layers, no upward import, no import cycles.

A module may import modules of its own layer or of a lower one, never of a
higher one. Every import counts, function-local ones included (they hide a
dependency, they do not remove it); imports under ``if TYPE_CHECKING:`` are
type hints only. The order, lowest first:

1. ``errors``, ``records``, ``version``: what every layer names.
2. ``analysis``: tracing, the op vocabulary, calibration facts on ``node.meta``.
3. ``algebra``: pure math on layers (folding, conv composition, the analytic
   cost model); no files, clocks or runtimes.
4. ``io``: checkpoints, datasets and atomic files. Above ``algebra`` so that
   the math cannot touch the file system; above ``analysis`` because it reads
   data into ``analysis.batches``' forms and traces checkpoints.
5. ``passes``: graph rewrites over analysis facts and algebra.
6. ``report``: renders typed records and plain dicts (it imports only
   ``records`` and ``io``). Below the compiler, which words its refusals
   through ``report.messages``: the issue's draft put ``report`` near the top,
   but nothing in it needs anything above ``io``.
7. the compile: ``compiler``, ``compiler_backoff``, ``measured_cost`` (the
   cost model's timing cache) and ``distributed`` (the torchrun runtime that
   compile and prune both run in).
8. ``export`` (ONNX), then 9. ``runtime`` (backends, profiler, gate, engines).
10. ``measures``, then 11. ``prune`` (which measures layers and trains).
12. ``demo`` and ``testing`` (the zoo), then 13. the entry points: ``cli``,
    ``__main__`` and the package's public facade ``egp_export/__init__.py``.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "egp_export"
ROOT = "egp_export"

# Lowest first. An entry names a module or a package (and everything under it); the bare root is the facade only.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("egp_export.errors", "egp_export.records", "egp_export.version")),
    ("analysis", ("egp_export.analysis",)),
    ("algebra", ("egp_export.algebra",)),
    ("io", ("egp_export.io",)),
    ("passes", ("egp_export.passes",)),
    ("report", ("egp_export.report",)),
    ("compile", ("egp_export.compiler", "egp_export.compiler_backoff", "egp_export.compile_options",
                 "egp_export.stages", "egp_export.plan_filters", "egp_export.padding", "egp_export.measured_cost",
                 "egp_export.distributed")),
    ("export", ("egp_export.export",)),
    ("runtime", ("egp_export.runtime",)),
    ("measures", ("egp_export.measures",)),
    ("prune", ("egp_export.prune",)),
    ("demo", ("egp_export.demo", "egp_export.testing")),
    ("entry points", ("egp_export.cli", "egp_export.__main__", ROOT)),
]

# What pure math never imports: files, clocks, processes, serialisation, runtimes.
IMPURE = frozenset({"os", "io", "json", "time", "pathlib", "shutil", "tempfile", "subprocess", "pickle", "onnx",
                    "onnxruntime"})


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported_names(path: Path, package: Path) -> set[str]:
    """Every module ``path`` imports (absolute and relative, at any depth), as dotted names."""
    module = _module_name(path, package)
    own_package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own_package.split(".")[: len(own_package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from egp_export.x import y` may import the submodule egp_export.x.y
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    modules = {_module_name(p, package): p for p in package.rglob("*.py")}
    return {
        name: {m for m in _imported_names(path, package) if m in modules and m != name}
        for name, path in modules.items()
    }


def layer_of(module: str) -> int | None:
    """The index of ``module``'s layer in LAYERS (the most specific entry wins), or None if it has none."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            matches = module == entry or (entry != ROOT and module.startswith(entry + "."))
            if matches and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def layer_violations(graph: dict[str, set[str]], exempt: frozenset[str] = frozenset()) -> list[str]:
    """Every import from a module into a higher layer, worded for a person."""
    violations = []
    for module, targets in sorted(graph.items()):
        if module in exempt:
            continue
        mine = layer_of(module)
        for target in sorted(targets):
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                violations.append(
                    f"{module} (layer {LAYERS[mine][0]}) imports {target} (layer {LAYERS[theirs][0]}, higher)"
                )
    return violations


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
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
    return cycles


def _through_own_package(cycle: list[str]) -> bool:
    """A package's __init__ importing its own modules, which import siblings through the package: not a cycle."""
    return any(b.startswith(a + ".") for a, b in zip(cycle, cycle[1:]))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


def test_every_module_has_a_layer(graph):
    assert [m for m in sorted(graph) if layer_of(m) is None] == [], "add the module to LAYERS in tests/test_layering.py"


def test_no_module_imports_a_higher_layer(graph):
    assert layer_violations(graph) == []


def test_nothing_but_the_cli_imports_the_cli(graph):
    violations = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        for target in targets
        if target.startswith("egp_export.cli") and not module.startswith("egp_export.cli")
        and module != "egp_export.__main__"
    ]
    assert violations == []


def test_no_import_cycles(graph):
    assert import_cycles(graph) == []


def test_algebra_is_pure_math():
    impure = {
        f"{_module_name(path, PACKAGE)} imports {name}"
        for path in (PACKAGE / "algebra").rglob("*.py")
        for name in _imported_names(path, PACKAGE)
        if name.split(".")[0] in IMPURE
    }
    assert impure == set()


# The checker fires -----------------------------------------------------------------------------------------------


def test_an_upward_import_in_a_synthetic_map_is_reported():
    graph = {
        "egp_export.records": set(),
        "egp_export.analysis.ops": {"egp_export.records"},
        "egp_export.passes.base": {"egp_export.analysis.ops"},
        "egp_export.algebra.affine": {"egp_export.passes.base", "egp_export.analysis.ops"},  # algebra -> passes: up
    }
    assert layer_violations(graph) == [
        "egp_export.algebra.affine (layer algebra) imports egp_export.passes.base (layer passes, higher)"
    ]
    # The exemption is by name and covers nothing else.
    assert layer_violations(graph, exempt=frozenset({"egp_export.algebra.affine"})) == []
    graph["egp_export.algebra.convchain"] = {"egp_export.io.fileio"}
    assert layer_violations(graph) == [
        "egp_export.algebra.affine (layer algebra) imports egp_export.passes.base (layer passes, higher)",
        "egp_export.algebra.convchain (layer algebra) imports egp_export.io.fileio (layer io, higher)",
    ]


def test_a_cycle_in_a_synthetic_map_is_reported():
    graph = {"egp_export.a": {"egp_export.b"}, "egp_export.b": {"egp_export.c"}, "egp_export.c": {"egp_export.a"}}
    assert import_cycles(graph) == ["egp_export.a -> egp_export.b -> egp_export.c -> egp_export.a"]


def test_a_function_local_upward_import_planted_in_a_copy_of_the_package_fails(tmp_path):
    copy = tmp_path / "egp_export"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(import_graph(copy)) == []  # the copy is as clean as the package
    ops = copy / "analysis" / "ops.py"
    clean = ops.read_text()
    ops.write_text(clean + "\n\ndef _planted():\n    from ..compiler import compile\n\n    return compile\n")
    assert layer_violations(import_graph(copy)) == [
        "egp_export.analysis.ops (layer analysis) imports egp_export.compiler (layer compile, higher)"
    ]
    # The same import under `if TYPE_CHECKING:` is a type hint only.
    ops.write_text(clean + "\n\nif TYPE_CHECKING:\n    from ..compiler import compile\n")
    assert layer_violations(import_graph(copy)) == []


def test_a_module_without_a_layer_is_reported():
    assert layer_of("egp_export.unplaced") is None
    assert layer_of("egp_export") == len(LAYERS) - 1
    assert layer_of("egp_export.padding") == [name for name, _ in LAYERS].index("compile")
