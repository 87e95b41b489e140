"""The one pass contract and the pass manager.

A pass is a callable ``pass_(gm) -> PassResult``. It may rewrite ``gm`` in
place (the manager owns the module it hands in) and says what it did: every
rewrite it made and every candidate it refused, with the reason. Passes read
analyses from ``node.meta`` and never run the model to decide.

The manager runs a short list of named steps; a step either runs once or to a
fixed point (capped). After every modifying pass it removes dead code, lints
the graph, recompiles, refreshes shapes and, in debug mode, checks numerics
against the module as it was before the pass, naming the pass that broke it.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from egp_export.analysis.fx import keeps_effects, propagate_shapes
from egp_export.analysis.numerics import FP32_RTOL, compare
from egp_export.errors import VerificationError


@dataclass(frozen=True)
class Rewrite:
    """One change a pass made."""

    pass_name: str
    nodes: tuple[str, ...]
    action: str

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "nodes": list(self.nodes), "action": self.action}


@dataclass(frozen=True)
class Refusal:
    """One candidate a pass looked at and left alone, and why."""

    pass_name: str
    node: str
    reason: str

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "node": self.node, "reason": self.reason}


@dataclass
class PassResult:
    module: fx.GraphModule
    modified: bool
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)


class GraphPass:
    """Base class: subclasses set ``name`` and implement ``run``, recording via ``rewrote``/``refuse``."""

    name = "pass"

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        self._result = PassResult(gm, False)
        self.run(gm)
        return self._result

    def run(self, gm: fx.GraphModule) -> None:
        raise NotImplementedError

    def rewrote(self, nodes: Sequence[fx.Node | str], action: str) -> None:
        self._result.modified = True
        names = tuple(n if isinstance(n, str) else n.name for n in nodes)
        self._result.rewrites.append(Rewrite(self.name, names, action))

    def refuse(self, node: fx.Node | str, reason: str) -> None:
        name = node if isinstance(node, str) else node.name
        self._result.refusals.append(Refusal(self.name, name, reason))


@dataclass
class Step:
    """A named pipeline step: one pass, run once or to a fixed point (at most ``cap`` times)."""

    name: str
    make_pass: Callable[[], Callable[[fx.GraphModule], PassResult]]
    fixed_point: bool = True
    cap: int = 8


@dataclass
class PipelineResult:
    module: fx.GraphModule
    rewrites: list[Rewrite]
    refusals: list[Refusal]
    steps_run: list[tuple[str, int]]  # (step name, iterations)


def finalize(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint, recompile: the invariants every pass must leave behind."""
    gm.graph.eliminate_dead_code(is_impure_node=keeps_effects(gm))
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


class PassManager:
    """Runs steps in order; with ``debug_inputs`` checks numerics after each modifying pass."""

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        example_input: torch.Tensor | None = None,
        debug_inputs: torch.Tensor | None = None,
        rounds: int = 3,
        debug_rtol: float = FP32_RTOL,
    ) -> None:
        self.steps = list(steps)
        self.example_input = example_input
        self.debug_inputs = debug_inputs
        self.rounds = rounds
        self.debug_rtol = debug_rtol

    def _after(self, step: Step, before: fx.GraphModule | None, gm: fx.GraphModule) -> None:
        finalize(gm)
        if self.example_input is not None:
            propagate_shapes(gm, self.example_input)
        if before is not None and self.debug_inputs is not None:
            with torch.no_grad():
                error = compare(before(self.debug_inputs), gm(self.debug_inputs))
            if not error.within(self.debug_rtol):
                raise VerificationError(
                    f"pass '{step.name}' changed the model's output by max_rel={error.max_rel:.3g} "
                    f"(max_abs={error.max_abs:.3g}, allowed {self.debug_rtol:g}); this is a bug in that pass."
                )

    def run(self, gm: fx.GraphModule) -> PipelineResult:
        """Run once-steps once and the fixed-point steps in rounds until nothing changes.

        Refusals of fixed-point steps are those of the last round (the state the
        graph ended in); rewrites accumulate.
        """
        rewrites: list[Rewrite] = []
        once_refusals: list[Refusal] = []
        loop_refusals: list[Refusal] = []
        steps_run: list[tuple[str, int]] = []
        loop_steps = [s for s in self.steps if s.fixed_point]
        for step in self.steps:
            if step.fixed_point:
                continue
            result = self._run_step(step, gm, rewrites)
            once_refusals.extend(result.refusals)
            steps_run.append((step.name, 1))
        for _ in range(self.rounds):
            loop_refusals = []
            changed = False
            for step in loop_steps:
                for iteration in itertools.count(1):
                    result = self._run_step(step, gm, rewrites)
                    changed = changed or result.modified
                    if not result.modified or iteration >= step.cap:
                        loop_refusals.extend(result.refusals)
                        steps_run.append((step.name, iteration))
                        break
            if not changed:
                break
        return PipelineResult(gm, rewrites, once_refusals + loop_refusals, steps_run)

    def _run_step(self, step: Step, gm: fx.GraphModule, rewrites: list[Rewrite]) -> PassResult:
        before = copy.deepcopy(gm) if self.debug_inputs is not None else None
        result = step.make_pass()(gm)
        if result.module is not gm:
            raise RuntimeError(f"pass '{step.name}' returned a different module; passes rewrite in place")
        if result.modified:
            self._after(step, before, gm)
        rewrites.extend(result.rewrites)
        return result
