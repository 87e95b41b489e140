"""The one pass contract and the pass manager.

A pass is a callable ``pass_(gm) -> PassResult``. It may rewrite ``gm`` in
place (the manager owns the module it hands in) and says what it did: every
rewrite it made and every candidate it refused, as typed records
(``egp_export.records``). Passes read analyses from ``node.meta`` and never
run the model to decide.

The manager runs a list of steps in order; a step is a pass (run once) or a
``FixedPoint`` group of steps repeated until nothing changes (capped). After every modifying pass it removes dead code, lints
the graph, recompiles, refreshes shapes and, in debug mode, checks numerics
against the module as it was before the pass, naming the pass that broke it.
A manager can withhold rewrites (``withheld``: node names no folding or
merging rewrite may touch) and report every modifying pass to ``on_pass``
with the module as it would be compiled at that point.

A pass declares the facts it reads (``requires``: shapes, calibrated sites);
before running it the manager checks that they are on the graph and raises a
``PassError`` naming the pass and the missing fact, instead of letting the
pass find nothing and silently do nothing. An exception the pass itself
raises is re-raised as a ``PassError`` naming the pass (the original chained);
a project exception keeps its type and gains a note naming the pass.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.fx as fx

from egp_export.analysis import inputs
from egp_export.analysis.activations import activation_spec
from egp_export.analysis.fx import keeps_effects, propagate_shapes
from egp_export.analysis.numerics import FP32_RTOL, compare
from egp_export.analysis.ops import named_modules
from egp_export.analysis.provenance import mark_rewritten, seed_provenance
from egp_export.analysis.stats import site_stats
from egp_export.errors import EgpExportError, PassError, VerificationError
from egp_export.records import Reason, Refusal, Rewrite, RewriteKind


@dataclass
class PassResult:
    module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


class Recorder:
    """What one run of a pass did: handed to ``run`` so that per-run state stays out of the pass object."""

    def __init__(self, pass_name: str, result: PassResult, withheld: frozenset[str] = frozenset()) -> None:
        self.pass_name = pass_name
        self.result = result
        self.withheld = withheld

    def is_withheld(self, nodes: Sequence[fx.Node]) -> bool:
        """Whether a rewrite of ``nodes`` touches a node the manager withholds (a rewrite withdrawn by the compiler)."""
        return any(node.name in self.withheld for node in nodes)

    def rewrote(self, kind: RewriteKind, nodes: Sequence[fx.Node | str], **detail) -> None:
        """Record a rewrite of ``nodes``; those given as nodes and still in the graph were changed in place by it
        (their provenance records ``kind``; nodes a rewrite replaced pass theirs on with ``provenance.absorb``)."""
        self.result.modified = True
        for node in nodes:
            if isinstance(node, fx.Node) and not getattr(node, "_erased", False):
                mark_rewritten(node, kind)
        names = tuple(n if isinstance(n, str) else n.name for n in nodes)
        self.result.rewrites.append(Rewrite(self.pass_name, kind, names, detail))

    def refuse(self, node: fx.Node | str, reason: Reason, **attempt) -> None:
        name = node if isinstance(node, str) else node.name
        self.result.refusals.append(Refusal(self.pass_name, name, reason, attempt))


class Fact(enum.Enum):
    """An analysis result a pass reads from ``node.meta``; computed before the pass runs, never by it."""

    SHAPES = "shapes"  # node.meta["tensor_meta"]: analysis.fx.propagate_shapes(gm, example)
    CALIBRATED_SITES = "calibrated sites"  # node.meta["egp_activation"]: analysis.stats.calibrate(gm, batches)


def _inputs_without_shapes(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.users and "tensor_meta" not in n.meta]


def _sites_without_statistics(gm: fx.GraphModule) -> list[str]:
    # The sites calibrate() observes: every supported activation with a graph input.
    modules = named_modules(gm)
    return [
        n.name for n in gm.graph.nodes
        if n.all_input_nodes and activation_spec(n, modules) is not None and site_stats(n) is None
    ]


# Fact -> (the nodes of a graph that lack it, what computes it).
FACT_CHECKS: dict[Fact, tuple[Callable[[fx.GraphModule], list[str]], str]] = {
    Fact.SHAPES: (
        _inputs_without_shapes,
        "run egp_export.analysis.fx.propagate_shapes(gm, example) first, or give the PassManager example_input",
    ),
    Fact.CALIBRATED_SITES: (
        _sites_without_statistics,
        "run egp_export.analysis.stats.calibrate(gm, batches) on this graph first",
    ),
}


def missing_facts(gm: fx.GraphModule, required: frozenset[Fact]) -> str | None:
    """What of ``required`` is not on ``gm`` (the fact, where, and what computes it), or None when all is there."""
    for fact in sorted(required, key=lambda f: f.value):
        lacking, remedy = FACT_CHECKS[fact]
        nodes = lacking(gm)
        if nodes:
            shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
            return f"{fact.value} (missing at {shown}): {remedy}"
    return None


class GraphPass:
    """Base class: subclasses declare ``name`` (and ``requires``) once and implement ``run(gm, record)``.

    A pass object holds configuration only (tolerance, cost model, ...); what
    one run finds lives in ``run``'s locals and in the ``Recorder``, so the
    same object can run again, to a fixed point, on any graph. ``requires``
    lists the facts ``run`` reads from ``node.meta``; calling the pass (alone
    or from a manager) on a graph without them raises ``PassError``.
    """

    name: ClassVar[str] = "pass"
    requires: ClassVar[frozenset[Fact]] = frozenset()

    def __call__(self, gm: fx.GraphModule, withheld: frozenset[str] = frozenset()) -> PassResult:
        require(self, gm)
        result = PassResult(gm, False)
        self.run(gm, Recorder(self.name, result, withheld))
        return result

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        raise NotImplementedError


def require(graph_pass, gm: fx.GraphModule) -> None:
    """Raise ``PassError`` when ``gm`` lacks a fact ``graph_pass`` declares in ``requires``."""
    missing = missing_facts(gm, getattr(graph_pass, "requires", frozenset()))
    if missing is not None:
        raise PassError(f"pass '{graph_pass.name}' needs {missing}.")


def run_named(graph_pass, gm: fx.GraphModule, withheld: frozenset[str]) -> PassResult:
    """Run one pass; what it raises names it (a PassError chaining the original, or a project error with a note)."""
    require(graph_pass, gm)
    try:
        # A pass that knows nothing of withholding keeps the plain contract, pass_(gm).
        return graph_pass(gm, withheld) if withheld else graph_pass(gm)
    except PassError:
        raise
    except EgpExportError as error:  # already says what the user can do: keep its type (and exit code)
        error.add_note(f"raised in pass '{graph_pass.name}'")
        raise
    except Exception as error:
        raise PassError(
            f"pass '{graph_pass.name}' failed: {type(error).__name__}: {_first_line(error)}. This is a bug in "
            "egp-export or a construct the pass does not handle: report it with the model (the original error is "
            "chained below)."
        ) from error


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


@dataclass
class FixedPoint:
    """Run ``steps`` in order, again and again until none modifies the graph, at most ``cap`` times.

    A step is a pass or another ``FixedPoint`` (onnx-ir's nested
    ``PassManager(..., steps=N)``). Its refusals are those of its last
    iteration: the state the graph ended in.
    """

    steps: Sequence[GraphPass | FixedPoint]
    cap: int = 8

    @property
    def name(self) -> str:
        return "fixed_point(" + ", ".join(step.name for step in self.steps) + ")"


Step = GraphPass | FixedPoint


@dataclass
class PipelineResult:
    module: fx.GraphModule
    rewrites: list[Rewrite]
    refusals: list[Refusal]
    steps_run: list[tuple[str, int]]  # (pass or group name, iterations)


def finalize(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint, recompile: the invariants every pass must leave behind."""
    gm.graph.eliminate_dead_code(is_impure_node=keeps_effects(gm))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _as_float64(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.double() if x is not None and x.is_floating_point() else x


def _widen(gm: fx.GraphModule, example: torch.Tensor | None) -> bool:
    """Cast a float32 ``gm`` to float64 in place if it then runs on ``example`` in float64; whether it did.

    A module with other floating dtypes, or whose forward casts to float32 itself (``x.float()``), stays as it is.
    """
    tensors = [*gm.parameters(), *gm.buffers()]
    if example is None or any(t.is_floating_point() and t.dtype != torch.float32 for t in tensors):
        return False
    gm.double()
    try:
        with torch.no_grad():
            output = gm(_as_float64(example))
        leaves = [t for t in torch.utils._pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
        if any(t.is_floating_point() and t.dtype != torch.float64 for t in leaves):
            raise TypeError("float32 output")
    except Exception:  # any failure: the module does not run in float64 as is
        gm.float()
        return False
    return True


# What ``PassManager(on_pass=...)`` is called with after each modifying pass: the pass's name, the module as it would
# be compiled at that point (rounded to float32 when the manager works in float64; a copy then) and its rewrites.
PassObserver = Callable[[str, fx.GraphModule, list[Rewrite]], None]


class PassManager:
    """Runs steps in order; with ``debug_inputs`` checks numerics after each modifying pass.

    ``withheld``: node names that the folding and merging passes (the rule
    sets, conv-chain merging) leave alone, so a rewrite the compiler withdrew
    is not made again on a fresh trace. ``on_pass`` is told about every
    modifying pass (``PassObserver``); it may raise to stop the run.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        example_input: torch.Tensor | None = None,
        debug_inputs: torch.Tensor | None = None,
        debug_rtol: float = FP32_RTOL,
        float64: bool = False,
        withheld: frozenset[str] = frozenset(),
        on_pass: PassObserver | None = None,
    ) -> None:
        self.float64 = float64
        self.withheld = frozenset(withheld)
        self.on_pass = on_pass
        self._widened = False
        self.steps = list(steps)
        self.example_input = example_input
        self.debug_inputs = debug_inputs
        self.debug_rtol = debug_rtol

    def _after(self, pass_name: str, before: fx.GraphModule | None, gm: fx.GraphModule) -> None:
        finalize(gm)
        if self.example_input is not None:
            propagate_shapes(gm, self.example_input)
        if before is not None and self.debug_inputs is not None:
            with torch.no_grad():
                # Each run on its own copy: a model may write into its input.
                error = compare(inputs.call_on_copy(before, self.debug_inputs), inputs.call_on_copy(gm, self.debug_inputs))
            if not error.within(self.debug_rtol):
                raise VerificationError(
                    f"pass '{pass_name}' changed the model's output by max_rel={error.max_rel:.3g} "
                    f"(max_abs={error.max_abs:.3g}, allowed {self.debug_rtol:g}); this is a bug in that pass."
                )

    def run(self, gm: fx.GraphModule) -> PipelineResult:
        """Run the steps in list order; a ``FixedPoint`` group repeats until nothing changes (capped).

        Shapes are propagated first when ``gm`` has none and ``example_input``
        is given. With ``float64`` (and a float32 module that runs in float64), the
        steps fold and merge on a float64 copy of every weight and the result
        is rounded to float32 once at the end: k folds into one layer round
        once, not k times.
        """
        rewrites: list[Rewrite] = []
        steps_run: list[tuple[str, int]] = []
        seed_provenance(gm)  # what each node comes from, carried by every pass (analysis/provenance.py)
        widened = self._widened = self.float64 and _widen(gm, self.example_input)
        example, debug = self.example_input, self.debug_inputs
        if widened:
            self.example_input, self.debug_inputs = _as_float64(example), _as_float64(debug)
        if self.example_input is not None and _inputs_without_shapes(gm):
            propagate_shapes(gm, self.example_input)  # the fact the manager keeps fresh after every pass
        try:
            _, refusals = self._run_sequence(self.steps, gm, rewrites, steps_run)
        finally:
            self.example_input, self.debug_inputs, self._widened = example, debug, False
            if widened:
                gm.float()
        return PipelineResult(gm, rewrites, refusals, steps_run)

    def _run_sequence(self, steps, gm, rewrites, steps_run) -> tuple[bool, list[Refusal]]:
        changed, refusals = False, []
        for step in steps:
            if isinstance(step, FixedPoint):
                step_changed, step_refusals = self._run_fixed_point(step, gm, rewrites, steps_run)
            else:
                result = self._run_pass(step, gm, rewrites)
                steps_run.append((step.name, 1))
                step_changed, step_refusals = result.modified, result.refusals
            changed = changed or step_changed
            refusals.extend(step_refusals)
        return changed, refusals

    def _run_fixed_point(self, group: FixedPoint, gm, rewrites, steps_run) -> tuple[bool, list[Refusal]]:
        # One pass to a fixed point is reported as (pass, iterations); a group of several lists each run.
        single = len(group.steps) == 1 and isinstance(group.steps[0], GraphPass)
        changed_at_all, refusals, iteration = False, [], 0
        while iteration < group.cap:
            iteration += 1
            inner: list[tuple[str, int]] = []
            changed, refusals = self._run_sequence(group.steps, gm, rewrites, inner)
            changed_at_all = changed_at_all or changed
            if not single:
                steps_run.extend(inner)
            if not changed:
                break
        if single:
            steps_run.append((group.steps[0].name, iteration))
        return changed_at_all, refusals

    def _run_pass(self, graph_pass: GraphPass, gm: fx.GraphModule, rewrites: list[Rewrite]) -> PassResult:
        before = copy.deepcopy(gm) if self.debug_inputs is not None else None
        result = run_named(graph_pass, gm, self.withheld)
        if result.module is not gm:
            raise RuntimeError(f"pass '{graph_pass.name}' returned a different module; passes rewrite in place")
        if result.modified:
            self._after(graph_pass.name, before, gm)
        rewrites.extend(result.rewrites)
        if result.modified and self.on_pass is not None:
            self.on_pass(graph_pass.name, copy.deepcopy(gm).float() if self._widened else gm, result.rewrites)
        return result
