"""Provenance: which modules of the original model, and which rewrites, each graph node stands for.

A fact stored on fx nodes, ``node.meta[PROVENANCE_KEY]``, like the shapes
``ShapeProp`` stores. ``seed_provenance`` writes it on a freshly captured
graph: a ``call_module`` node comes from its module, a functional op or method
from the module whose ``forward`` called it (torch.fx's ``nn_module_stack``;
``""`` is the model's own ``forward``). The passes carry it: a node that
replaces or absorbs others inherits the union of their provenance plus the
rewrite's kind (``absorb``), so after the pipeline a merged conv names every
conv, BatchNorm and linearized activation it came from. The ONNX export writes
it on the file's nodes (``egp_export.export.provenance``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch.fx as fx

from egp_export.records import RewriteKind

PROVENANCE_KEY = "egp_provenance"
# gm.meta flag: the graph was seeded, so a node without provenance was inserted by something that did not record it.
SEEDED_KEY = "egp_provenance_seeded"
ROOT = ""  # the qualified name of the model itself (``model.get_submodule("")`` is the model)


def _union(*groups: Iterable) -> tuple:
    """Order-preserving union without repeats."""
    return tuple(dict.fromkeys(item for group in groups for item in group))


@dataclass(frozen=True)
class Provenance:
    """Where one node comes from: modules of the original model (qualified names), the original graph's call sites
    (node names, as the compile report names sites and rewrites) and the rewrites applied, in order."""

    modules: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    rewrites: tuple[RewriteKind, ...] = ()

    def union(self, *others: Provenance) -> Provenance:
        every = (self, *others)
        return Provenance(
            _union(*(p.modules for p in every)), _union(*(p.sites for p in every)), _union(*(p.rewrites for p in every))
        )

    def rewritten(self, kind: RewriteKind) -> Provenance:
        return Provenance(self.modules, self.sites, _union(self.rewrites, (kind,)))

    @property
    def empty(self) -> bool:
        return not self.modules and not self.sites

    def to_dict(self) -> dict:
        return {"modules": list(self.modules), "sites": list(self.sites), "rewrites": [k.value for k in self.rewrites]}


def owner_module(node: fx.Node) -> str:
    """The qualified name of the module whose forward created ``node`` (ROOT for the model's own forward)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ROOT
    path = list(stack.values())[-1]
    return str(path[0] if isinstance(path, tuple) else path)


def captured_provenance(node: fx.Node) -> Provenance | None:
    """What a node of a freshly captured graph comes from; None for inputs and the output."""
    if node.op == "call_module":
        return Provenance((str(node.target),), (node.name,))
    if node.op in ("call_function", "call_method"):
        return Provenance((owner_module(node),), (node.name,))
    if node.op == "get_attr":
        owner = str(node.target).rpartition(".")[0]
        return Provenance((owner,), (node.name,))
    return None


def seed_provenance(gm: fx.GraphModule) -> None:
    """Store every node's captured provenance on a graph that has none yet (a graph already seeded keeps its own)."""
    if gm.meta.get(SEEDED_KEY):
        return
    for node in gm.graph.nodes:
        found = captured_provenance(node)
        if found is not None and PROVENANCE_KEY not in node.meta:
            node.meta[PROVENANCE_KEY] = found
    gm.meta[SEEDED_KEY] = True


def provenance_of(node: fx.Node, gm: fx.GraphModule) -> Provenance | None:
    """The node's provenance: stored, or (on a graph never seeded: the user's own module) as captured.

    None for a node of a seeded graph that nothing recorded: a pass inserted it without ``absorb``.
    """
    stored = node.meta.get(PROVENANCE_KEY)
    if stored is not None:
        return stored
    return None if gm.meta.get(SEEDED_KEY) else captured_provenance(node)


def absorb(survivor: fx.Node, absorbed: Iterable[fx.Node], kind: RewriteKind | None = None) -> None:
    """``survivor`` now computes what ``absorbed`` did too: it inherits their provenance, and ``kind`` is recorded."""
    own = survivor.meta.get(PROVENANCE_KEY, Provenance())
    merged = own.union(*(n.meta.get(PROVENANCE_KEY, Provenance()) for n in absorbed if n is not survivor))
    survivor.meta[PROVENANCE_KEY] = merged.rewritten(kind) if kind is not None else merged


def mark_rewritten(node: fx.Node, kind: RewriteKind) -> None:
    """Record that ``kind`` changed ``node``'s layer in place (dead channels removed from it, say)."""
    absorb(node, (), kind)
