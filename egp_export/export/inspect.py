"""Reading the provenance egp-export writes into an ONNX file: the table ``egp-export inspect`` prints.

The keys of each node's ``metadata_props`` (values are JSON lists or plain
strings; ``egp_export.export.provenance`` writes them):

- ``pkg.egp_export.source_modules``: qualified names in the original model
  (``""`` is the model's own ``forward``, which called the op itself);
- ``pkg.egp_export.source_sites``: the original graph's call sites (node
  names, as the compile report names sites and rewrites);
- ``pkg.egp_export.rewrites``: ``records.RewriteKind`` values applied, in order;
- ``pkg.egp_export.graph_node``: the node of the exported torch.fx graph;
- ``pkg.egp_export.origin``: ``model`` (from graph nodes), ``exporter`` or
  ``onnx-simplifier`` (added by them; ``pkg.egp_export.note`` says why).

This module loads onnx only (no torch): ``inspect`` answers in a second.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import onnx

from egp_export.errors import ExportError

PREFIX = "pkg.egp_export."
SOURCE_MODULES = PREFIX + "source_modules"
SOURCE_SITES = PREFIX + "source_sites"
REWRITES = PREFIX + "rewrites"
GRAPH_NODE = PREFIX + "graph_node"
ORIGIN = PREFIX + "origin"
NOTE = PREFIX + "note"
# On the model: the file carries provenance written by this version of the scheme.
MODEL_KEY = PREFIX + "provenance"
VERSION = "1"

ROOT = ""  # the qualified name of the model itself (analysis/provenance.py: ROOT)
MODEL, EXPORTER, SIMPLIFIER = "model", "exporter", "onnx-simplifier"


@dataclass(frozen=True)
class NodeProvenance:
    """One row of the table: an ONNX node and where it came from."""

    name: str
    op_type: str
    modules: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    rewrites: tuple[str, ...] = ()
    graph_node: str = ""
    origin: str = MODEL
    note: str = ""

    @property
    def mapped(self) -> bool:
        """Whether the row names a source module, or says why egp-export's own tools added the node."""
        return bool(self.modules) if self.origin == MODEL else bool(self.note)

    def to_dict(self) -> dict:
        return {
            "node": self.name,
            "op_type": self.op_type,
            "source_modules": list(self.modules),
            "source_sites": list(self.sites),
            "rewrites": list(self.rewrites),
            "graph_node": self.graph_node,
            "origin": self.origin,
            "note": self.note,
        }


# Reading it back -----------------------------------------------------------------


def read_provenance(model: onnx.ModelProto) -> list[NodeProvenance] | None:
    """The table stored in ``model``'s nodes, in graph order; None when the file carries no egp-export provenance."""
    if not any(entry.key == MODEL_KEY for entry in model.metadata_props):
        return None
    rows = []
    for node in model.graph.node:
        props = {e.key: e.value for e in node.metadata_props}
        rows.append(
            NodeProvenance(
                node.name,
                node.op_type,
                tuple(_json_list(props.get(SOURCE_MODULES))),
                tuple(_json_list(props.get(SOURCE_SITES))),
                tuple(_json_list(props.get(REWRITES))),
                props.get(GRAPH_NODE, ""),
                props.get(ORIGIN, ""),
                props.get(NOTE, ""),
            )
        )
    return rows


def _json_list(value: str | None) -> list[str]:
    if not value:
        return []
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        return [value]
    return [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]


def inspect_onnx(path: str | Path) -> list[NodeProvenance]:
    """The provenance table of the ONNX file at ``path``. Raises ExportError for a missing or unreadable file, or one
    that egp-export did not write (no provenance in it)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} is not a file; give the model.onnx an egp-export compile or export wrote.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError and others: not an ONNX file
        raise ExportError(
            f"{path} is not an ONNX model ({type(error).__name__}); give the model.onnx egp-export wrote."
        ) from error
    if not model.graph.node and not model.graph.input:
        raise ExportError(f"{path} holds no ONNX graph; give the model.onnx egp-export wrote.")
    rows = read_provenance(model)
    if rows is None:
        raise ExportError(
            f"{path} carries no egp-export provenance (written by another tool, or by an egp-export before provenance); "
            "export it again with egp-export (compile or export_onnx)."
        )
    return rows


def format_table(rows: Iterable[NodeProvenance]) -> str:
    """The table a person reads: ONNX node, op type, source modules, rewrites (``(model)`` is the model's forward)."""
    header = ("ONNX node", "op type", "source modules", "rewrites")
    lines = [header]
    for row in rows:
        modules = ", ".join(m if m != ROOT else "(model)" for m in row.modules)
        source = (modules or row.note) if row.origin == MODEL else f"[{row.origin}] {row.note}"
        lines.append((row.name, row.op_type, source or "-", ", ".join(row.rewrites) or "-"))
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line[:3], widths)) + "  " + line[3] for line in lines
    )


def summarize(rows: list[NodeProvenance]) -> str:
    """One line: how many nodes come from the model's modules, how many were added by which tool, how many are unmapped."""
    counts: dict[str, int] = {}
    for row in rows:
        key = row.origin if row.mapped else "unmapped"
        counts[key] = counts.get(key, 0) + 1
    labels = {MODEL: "from the model's modules", EXPORTER: "added by the exporter", "unmapped": "WITHOUT provenance"}
    parts = [f"{count} {labels.get(origin, f'added by {origin}')}" for origin, count in counts.items()]
    return f"{len(rows)} nodes: " + ", ".join(parts)
