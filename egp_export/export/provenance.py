"""Writing provenance into the ONNX file: every node names the source modules and rewrites it came from.

A per-node comparison of the file (Polygraphy, ONNX Runtime) maps back to the
PyTorch model through the ``pkg.egp_export.*`` keys of each node's
``metadata_props`` (listed in ``egp_export.export.inspect``, which reads them).

How the nodes are found. Neither exporter says which node of a torch.fx graph
an ONNX node came from: both name nodes by the module whose call created them
(dynamo: ``pkg.torch.onnx.name_scopes``; TorchScript: the node name
``/scope/.../Op``), and ops a graph module calls itself get no scope. So a
GraphModule is exported as ``scoped_module(gm)``: the same graph with every
call wrapped in a module named after its node (``egp_<node>``), which computes
exactly what the call did; each ONNX node's scope then names its fx node, and
the fx node's provenance (``analysis/provenance.py``) is written on it. A
graph node that left no ONNX node of its own (the exporter's optimizer fused
it, as TorchScript folds an eval BatchNorm into the conv before it, or an
identity) passes its provenance on to the nearest nodes that feed it (they
compute its output now), failing those to the nearest that read it.
onnx-simplifier keeps node and value names but drops
``metadata_props``: a simplified node takes the provenance of the exported
nodes of its name or of its outputs' producers (a fusion keeps both); a node
it removed hands its provenance on the same way, and a node it wrote under a
new name (MatMul+Add -> Reshape, Gemm, Reshape) takes that of the model nodes
around it, its note saying it was added. A plain ``nn.Module``
is exported as it is; its nodes name the innermost module scope the exporter
recorded (where an exporter fuses an eval BatchNorm into a conv itself, the
fused node names one of the two: a compiled graph has folded it already).

What the scoping costs (``python tools/bench_provenance.py --rounds 1``, the
zoo's ResNet-18 compiled, on the shared 2-core machine under load): the same
46 (TorchScript) / 45 (dynamo) ops and the same ONNX Runtime error (2.26e-4,
the fp32 module's own noise level); the exporter's own time 0.53 s scoped vs
0.34 s as it is with TorchScript, 16.3 s vs 10.1 s with dynamo (torch.export
traces one more module boundary per node).
"""

from __future__ import annotations

import ast
import functools
import json
from dataclasses import dataclass, field

import onnx
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.provenance import ROOT, Provenance, provenance_of
from egp_export.export.inspect import (
    EXPORTER,
    GRAPH_NODE,
    MODEL,
    MODEL_KEY,
    NOTE,
    ORIGIN,
    PREFIX,
    REWRITES,
    SIMPLIFIER,
    SOURCE_MODULES,
    SOURCE_SITES,
    VERSION,
    NodeProvenance,
)

SCOPE_PREFIX = "egp_"
_TORCH_SCOPES = "pkg.torch.onnx.name_scopes"
_CALLS = ("call_module", "call_function", "call_method")


# Exporting with scopes -------------------------------------------------------


class _Call(nn.Module):
    """One graph node's call as a module, so that the exporters scope the ONNX nodes it creates by its name."""

    def __init__(self, node: fx.Node, module: nn.Module | None) -> None:
        super().__init__()
        self.op, self.target = node.op, node.target
        self.training = module.training if module is not None else False  # never .train(): it would reach `module`
        if module is not None:
            self.module = module

    def forward(self, *args, **kwargs):
        if self.op == "call_module":
            return self.module(*args, **kwargs)
        if self.op == "call_function":
            return self.target(*args, **kwargs)
        return getattr(args[0], self.target)(*args[1:], **kwargs)


@dataclass
class Scoped:
    """What the exporter traces (``module``) and which graph node each scope name stands for."""

    module: nn.Module
    graph: fx.GraphModule | None  # None: a plain module, exported as it is
    scopes: dict[str, fx.Node] = field(default_factory=dict)
    module_names: frozenset[str] = frozenset()  # a plain module's qualified submodule names


def scoped_module(module: nn.Module) -> Scoped:
    """``module`` with every call of its fx graph wrapped in a module named after the node (a GraphModule), or as it
    is. The wrapped module shares every parameter and computes exactly the same: it calls the same ops in order."""
    if not isinstance(module, fx.GraphModule):
        return Scoped(module, None, module_names=frozenset(name for name, _ in module.named_modules()))
    attributes: dict[str, object] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    scopes: dict[str, fx.Node] = {}
    for node in module.graph.nodes:
        if node.op in _CALLS:
            name = _free_name(SCOPE_PREFIX + node.name, attributes)
            attributes[name] = _Call(node, module.get_submodule(str(node.target)) if node.op == "call_module" else None)
            scopes[name] = node
            env[node] = graph.call_module(name, fx.map_arg(node.args, env.__getitem__), fx.map_arg(node.kwargs, env.__getitem__))
            continue
        env[node] = graph.node_copy(node, env.__getitem__)
        if node.op == "get_attr":
            attributes[str(node.target)] = functools.reduce(getattr, str(node.target).split("."), module)
    wrapped = fx.GraphModule(attributes, graph, type(module).__name__)
    wrapped.training = module.training
    return Scoped(wrapped, module, scopes)


def _free_name(name: str, taken: dict) -> str:
    """``name``, or with a suffix where a wrapper or the first part of an attribute path has it already."""
    roots = {key.split(".")[0] for key in taken}
    candidate, suffix = name, 0
    while candidate in roots or hasattr(nn.Module, candidate):
        suffix += 1
        candidate = f"{name}_{suffix}"
    return candidate


# Mapping ONNX nodes to graph nodes ----------------------------------------------


def _torch_scopes(node: onnx.NodeProto) -> list[str]:
    for entry in node.metadata_props:
        if entry.key == _TORCH_SCOPES:
            try:
                scopes = ast.literal_eval(entry.value)
            except (ValueError, SyntaxError):
                return []
            return [str(s) for s in scopes] if isinstance(scopes, (list, tuple)) else []
    return []


def _scope_names(node: onnx.NodeProto) -> list[str]:
    """The scope names an exporter recorded for ``node``, outermost first (dynamo metadata, else the TorchScript name)."""
    scopes = _torch_scopes(node)
    if scopes:
        return scopes
    parts = node.name.split("/")
    return parts[1:-1] if node.name.startswith("/") else []


def _plain_module_scope(node: onnx.NodeProto, names: frozenset[str]) -> str | None:
    """The innermost module (qualified name, one of ``names``) a plain module's node was created in, or None.

    Dynamo lists qualified names, then the aten op (``['', 'layer1', 'layer1.0', 'layer1.0.conv1', 'conv2d']``);
    TorchScript names the node by the scope path (``/layer1/layer1.0/conv1/Conv``, ``/block/conv_a/Conv``).
    """
    scopes = _torch_scopes(node)
    if scopes:
        known = [scope for scope in scopes[:-1] if scope in names]
        return known[-1] if known else ROOT
    if not node.name.startswith("/"):
        return None
    qualified, found = "", ROOT
    for part in node.name.split("/")[1:-1]:
        qualified = part if not qualified or part.startswith(qualified + ".") else f"{qualified}.{part}"
        if qualified in names:
            found = qualified
    return found


def _exporter_note(node: onnx.NodeProto) -> str:
    return f"{node.op_type} the exporter added outside every graph node (weights, shapes or constants)"


@dataclass
class _Found:
    provenance: Provenance | None  # None: exporter's own
    graph_node: str = ""
    note: str = ""

    def inherit(self, other: Provenance) -> None:
        self.provenance = (self.provenance or Provenance()).union(other)


def _map_exported(exported: onnx.ModelProto, scoped: Scoped) -> list[_Found]:
    """Where each node of the exported model (by position) came from."""
    nodes = list(exported.graph.node)
    if scoped.graph is None:
        return [
            _Found(Provenance((module,))) if (module := _plain_module_scope(node, scoped.module_names)) is not None
            else _Found(None, note=_exporter_note(node))
            for node in nodes
        ]
    found: list[_Found] = []
    onnx_nodes: dict[fx.Node, list[int]] = {}
    for index, node in enumerate(nodes):
        fx_node = next((scoped.scopes[s] for s in _scope_names(node) if s in scoped.scopes), None)
        if fx_node is None:
            found.append(_Found(None, note=_exporter_note(node)))
            continue
        onnx_nodes.setdefault(fx_node, []).append(index)
        provenance = provenance_of(fx_node, scoped.graph)
        note = "" if provenance is not None else "no provenance recorded: a rewrite pass inserted this node without carrying it"
        found.append(_Found(provenance or Provenance(), fx_node.name, note))
    # A graph node without ONNX nodes of its own (fused into its producer, as TorchScript folds an eval BatchNorm into
    # the conv before it, or an identity): the nearest nodes that feed it compute its output now; failing those
    # (a constant folded into its readers), the nearest that read it.
    for fx_node in scoped.scopes.values():
        own = provenance_of(fx_node, scoped.graph)
        if fx_node in onnx_nodes or own is None:
            continue
        heirs = _nearest(fx_node, onnx_nodes, "all_input_nodes") or _nearest(fx_node, onnx_nodes, "users")
        for index in (i for heir in heirs for i in onnx_nodes[heir]):
            found[index].inherit(own)
    return found


def _nearest(start: fx.Node, mapped: dict[fx.Node, list[int]], direction: str) -> list[fx.Node]:
    """The first nodes reached from ``start`` along ``direction`` ("users" or "all_input_nodes") that have ONNX nodes."""
    seen, frontier, hits = {start}, [start], []
    while frontier:
        following = []
        for node in frontier:
            for other in getattr(node, direction):
                if other in seen:
                    continue
                seen.add(other)
                (hits if other in mapped else following).append(other)
        frontier = following
    return hits


def annotate(
    final: onnx.ModelProto, exported: onnx.ModelProto, scoped: Scoped, *, added_by: str = SIMPLIFIER
) -> list[NodeProvenance]:
    """Write every node's provenance into ``final`` (the file to write; ``exported`` is the exporter's own model,
    possibly the same object) and return the table, in graph order. ``added_by`` names what turned ``exported``
    into ``final`` (onnx-simplifier): the origin of nodes the exporter did not write."""
    found = _map_exported(exported, scoped)
    graph = _NodeGraph(exported)
    sources = [graph.sources_of(node) for node in final.graph.node]
    graph.hand_down_removed(found, {index for indices in sources for index in indices})
    rows = [_row(node, [found[i] for i in indices], added_by) for node, indices in zip(final.graph.node, sources)]
    rows = _place_added(rows, _NodeGraph(final), added_by)
    for node, row in zip(final.graph.node, rows):
        _write(node, row)
    _set_model_key(final)
    return rows


def _place_added(rows: list[NodeProvenance], graph: _NodeGraph, added_by: str) -> list[NodeProvenance]:
    """A node ``added_by`` wrote in place of exported ones (onnx-simplifier's MatMul+Add -> Reshape, Gemm, Reshape
    under new names) computes part of what the nearest model nodes reading it compute (failing those, feeding it):
    it takes their provenance, and its note says it was added."""
    from_model = {index for index, row in enumerate(rows) if row.origin == MODEL}
    placed = list(rows)
    for index, row in enumerate(rows):
        if row.origin != added_by:
            continue
        near = graph.nearest(index, from_model, graph.reading) or graph.nearest(index, from_model, graph.feeding)
        if not near:
            continue
        modules = tuple(dict.fromkeys(m for i in near for m in rows[i].modules))
        sites = tuple(dict.fromkeys(m for i in near for m in rows[i].sites))
        rewrites = tuple(dict.fromkeys(k for i in near for k in rows[i].rewrites))
        note = f"{row.note}, computing part of what {', '.join(rows[i].name for i in near)} computes"
        placed[index] = NodeProvenance(row.name, row.op_type, modules, sites, rewrites, "", MODEL, note)
    return placed


class _NodeGraph:
    """A model's nodes by name and by the values they write and read (positions in its node list)."""

    def __init__(self, exported: onnx.ModelProto) -> None:
        self.nodes = list(exported.graph.node)
        self.by_name: dict[str, int] = {}
        self.producer: dict[str, int] = {}
        self.readers: dict[str, list[int]] = {}
        for index, node in enumerate(self.nodes):
            if node.name:
                self.by_name.setdefault(node.name, index)
            for value in node.output:
                self.producer.setdefault(value, index)
            for value in node.input:
                self.readers.setdefault(value, []).append(index)

    def sources_of(self, node: onnx.NodeProto) -> list[int]:
        """The exported nodes a node of the final file stands for: the one of its name and its outputs' producers
        (onnx-simplifier keeps node and value names; a fusion keeps the first node's name and the last's output)."""
        found = [self.by_name[node.name]] if node.name in self.by_name else []
        return list(dict.fromkeys(found + [self.producer[v] for v in node.output if v in self.producer]))

    def hand_down_removed(self, found: list[_Found], kept: set[int]) -> None:
        """Exported nodes the simplifier removed pass their provenance on: to the nearest kept nodes that feed them
        (an identity such as a mean over a 1x1 map: its producer's output is its own), failing those to the nearest
        kept nodes that read them (a subgraph of constants folded into an initializer)."""
        for index in range(len(self.nodes)):
            own = found[index].provenance
            if index in kept or own is None:
                continue
            for heir in self.nearest(index, kept, self.feeding) or self.nearest(index, kept, self.reading):
                found[heir].inherit(own)

    def feeding(self, index: int) -> list[int]:
        return [self.producer[v] for v in self.nodes[index].input if v in self.producer]

    def reading(self, index: int) -> list[int]:
        return [r for v in self.nodes[index].output for r in self.readers.get(v, [])]

    @staticmethod
    def nearest(start: int, kept: set[int], step) -> list[int]:
        """The first nodes of ``kept`` reached from ``start`` by repeating ``step`` (feeding or reading)."""
        seen, frontier, hits = {start}, [start], []
        while frontier:
            following = []
            for current in frontier:
                for other in step(current):
                    if other not in seen:
                        seen.add(other)
                        (hits if other in kept else following).append(other)
            frontier = following
        return hits


def _row(node: onnx.NodeProto, sources: list[_Found], added_by: str) -> NodeProvenance:
    if not sources:
        note = f"{node.op_type} added by {added_by} after the export"
        return NodeProvenance(node.name, node.op_type, origin=added_by, note=note)
    from_model = [s for s in sources if s.provenance is not None]
    if not from_model:
        return NodeProvenance(node.name, node.op_type, origin=EXPORTER, note=sources[0].note)
    merged = from_model[0].provenance.union(*(s.provenance for s in from_model[1:]))
    graph_nodes = ", ".join(dict.fromkeys(s.graph_node for s in from_model if s.graph_node))
    notes = "; ".join(dict.fromkeys(s.note for s in from_model if s.note))
    return NodeProvenance(
        node.name, node.op_type, merged.modules, merged.sites, tuple(k.value for k in merged.rewrites), graph_nodes,
        MODEL, notes,
    )


def _write(node: onnx.NodeProto, row: NodeProvenance) -> None:
    kept = [(e.key, e.value) for e in node.metadata_props if not e.key.startswith(PREFIX)]
    del node.metadata_props[:]
    values = {
        SOURCE_MODULES: json.dumps(list(row.modules)),
        SOURCE_SITES: json.dumps(list(row.sites)),
        REWRITES: json.dumps(list(row.rewrites)),
        GRAPH_NODE: row.graph_node,
        ORIGIN: row.origin,
        NOTE: row.note,
    }
    for key, value in [*kept, *values.items()]:
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value


def _set_model_key(model: onnx.ModelProto) -> None:
    for entry in model.metadata_props:
        if entry.key == MODEL_KEY:
            entry.value = VERSION
            return
    entry = model.metadata_props.add()
    entry.key, entry.value = MODEL_KEY, VERSION
