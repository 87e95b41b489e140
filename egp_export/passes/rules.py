"""Local rewrites as data: a rule is a pattern, a check and a rewrite.

    Rule(name, pattern, check, rewrite)

- ``pattern`` is data, matched backwards from an anchor node along first
  inputs: ``Chain(Op(is_module_layer, "layer"), Op(is_batch_norm, "bn"))``
  matches ``bn(layer(x))``; ``Skip(is_identity)`` matches zero or more
  eval-mode identities; ``Either(p, q)`` tries ``p`` then ``q``;
  ``Add(branch, skip)`` matches ``skip + branch(skip)`` in either operand
  order.
- ``check(match)`` returns a ``Reason`` for refusing, or None.
- ``rewrite(match)`` changes the graph's modules and returns what it did as
  an ``Applied`` record (kind, numbers and names, and the node the anchor's
  users read from now on).

``RuleSetPass`` owns everything else: the node loop, the rule that every
matched node but the anchor feeds only the next one (a value read elsewhere
cannot be rewritten away), rewiring, erasing what is left unused, and
recording rewrites and refusals, and carrying provenance: the matched nodes
a rewrite erased pass theirs on to the node that absorbed them (the
replacement, or the anchor; ``Applied.absorbed_by`` where the rewrite put
them elsewhere). A refusal is recorded only when no rule of the set applied
at that node.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.ops import is_add, named_modules
from egp_export.analysis.provenance import absorb
from egp_export.passes.base import GraphPass, Recorder
from egp_export.records import Reason, RefusalCode, RewriteKind

Predicate = Callable[[fx.Node, dict[str, nn.Module]], bool]


# Patterns --------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    """One node for which ``predicate(node, modules)`` holds, captured as ``name``."""

    predicate: Predicate
    name: str | None = None


@dataclass(frozen=True)
class Skip:
    """Zero or more nodes for which ``predicate`` holds (eval-mode identities, say), captured as a list."""

    predicate: Predicate
    name: str | None = None


@dataclass(frozen=True)
class Chain:
    """``elements`` applied in order, each reading the previous one's output as its first input."""

    elements: tuple

    def __init__(self, *elements) -> None:
        object.__setattr__(self, "elements", elements)


@dataclass(frozen=True)
class Either:
    """The first of ``patterns`` that matches."""

    patterns: tuple

    def __init__(self, *patterns) -> None:
        object.__setattr__(self, "patterns", patterns)


@dataclass(frozen=True)
class Add:
    """``skip + branch(skip)`` (either operand order; any spelling of add): ``branch`` is a Chain whose
    first node reads the add's other operand, captured as ``skip``."""

    branch: Chain | Either
    skip: str = "skip"
    name: str = "add"


@dataclass
class Match:
    gm: fx.GraphModule
    modules: dict[str, nn.Module]
    anchor: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)  # in graph order, anchor last
    captures: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str):
        return self.captures[name]


def _first_input(node: fx.Node) -> fx.Node | None:
    return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None


def _match_back(element, node: fx.Node | None, match: Match) -> fx.Node | None | bool:
    """Match ``element`` ending at ``node``; returns the node before the match (its input), or False."""
    if node is None:
        return False
    if isinstance(element, Op):
        if not element.predicate(node, match.modules):
            return False
        if element.name:
            match.captures[element.name] = node
        match.nodes.insert(0, node)
        return _first_input(node)
    if isinstance(element, Skip):
        skipped = []
        while node is not None and element.predicate(node, match.modules):
            skipped.insert(0, node)
            node = _first_input(node)
        if element.name:
            match.captures[element.name] = skipped
        match.nodes[:0] = skipped
        return node if node is not None else False
    if isinstance(element, Chain):
        for part in reversed(element.elements):
            node = _match_back(part, node, match)
            if node is False:
                return False
        return node
    if isinstance(element, Either):
        for pattern in element.patterns:
            trial = Match(match.gm, match.modules, match.anchor, list(match.nodes), dict(match.captures))
            before = _match_back(pattern, node, trial)
            if before is not False:
                match.nodes, match.captures = trial.nodes, trial.captures
                return before
        return False
    raise TypeError(f"not a pattern element: {element!r}")


def match_pattern(pattern, anchor: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> Match | None:
    """The match of ``pattern`` ending at ``anchor``, or None."""
    if isinstance(pattern, Add):
        if not is_add(anchor) or not all(isinstance(a, fx.Node) for a in anchor.args):
            return None
        for branch, skip in (anchor.args, anchor.args[::-1]):
            match = Match(gm, modules, anchor)
            before = _match_back(pattern.branch, branch, match)
            if before is not False and before is skip:
                match.captures[pattern.skip] = skip
                match.captures[pattern.name] = anchor
                match.nodes.append(anchor)
                return match
        return None
    match = Match(gm, modules, anchor)
    return match if _match_back(pattern, anchor, match) is not False else None


# Rules -----------------------------------------------------------------------


@dataclass
class Applied:
    """What a rule's rewrite did: its kind, the numbers and names behind it, and the node that now
    stands for the anchor (None: the anchor stays). ``kept`` names what was deliberately not done.
    ``absorbed_by``: the nodes whose layers now compute what the erased matched nodes did, where that is
    not the replacement (an affine map folded into its consumers)."""

    kind: RewriteKind
    detail: dict = field(default_factory=dict)
    replacement: fx.Node | None = None
    kept: Reason | None = None
    absorbed_by: tuple[fx.Node, ...] | None = None


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: Any
    check: Callable[[Match], Reason | None]
    rewrite: Callable[[Match], Applied]


def no_check(match: Match) -> Reason | None:
    return None


def _single_user_refusal(match: Match) -> Reason | None:
    for node in match.nodes[:-1]:
        if len(node.users) != 1:
            return Reason(RefusalCode.MULTIPLE_USERS, {"node": node.name, "users": len(node.users)})
    return None


class RuleSetPass(GraphPass):
    """Applies the first rule of ``rules`` that matches and passes its check, at every node in graph order."""

    rules: ClassVar[Sequence[Rule]] = ()

    def active_rules(self) -> Sequence[Rule]:
        """The rules this instance applies (configuration may select among them)."""
        return self.rules

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        modules = named_modules(gm)
        for anchor in list(gm.graph.nodes):
            if anchor.graph is not gm.graph or getattr(anchor, "_erased", False):
                continue  # erased by an earlier rewrite in this run
            refusals: list[tuple[Rule, Reason, Match]] = []
            for rule in self.active_rules():
                match = match_pattern(rule.pattern, anchor, gm, modules)
                if match is None or record.is_withheld(match.nodes):
                    continue
                reason = _single_user_refusal(match) or rule.check(match)
                if reason is not None:
                    refusals.append((rule, reason, match))
                    continue
                self._apply(rule, match, record, gm)
                modules.update(named_modules(gm))
                refusals = []
                break
            for rule, reason, match in refusals:
                record.refuse(anchor, reason, **self.attempt(rule, match))

    def attempt(self, rule: Rule, match: Match) -> dict:
        """What the refused rule tried, for the report (names only); none by default."""
        return {}

    @staticmethod
    def _apply(rule: Rule, match: Match, record: Recorder, gm: fx.GraphModule) -> None:
        names = [node.name for node in match.nodes]
        applied = rule.rewrite(match)
        if applied.replacement is not None and applied.replacement is not match.anchor:
            match.anchor.replace_all_uses_with(applied.replacement)
        erased = []
        for node in reversed(match.nodes):
            if node is not applied.replacement and not node.users and node.op not in ("placeholder", "output"):
                gm.graph.erase_node(node)
                erased.append(node)
        survivors = applied.absorbed_by or (applied.replacement if applied.replacement is not None else match.anchor,)
        for survivor in survivors:
            absorb(survivor, erased, applied.kind)
        record.rewrote(applied.kind, names, **applied.detail)
        if applied.kept is not None:
            record.refuse(match.anchor, applied.kept)
