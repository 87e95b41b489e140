"""The capture seam: a user's model becomes the eval-mode torch.fx GraphModule every analysis and pass reads.

Every graph the compile works on comes from ``capture``: the graph that is
rewritten, the reference graphs calibrated on validation and held-out data,
and the fresh graphs of a back-off. Front ends:

- "fx": torch.fx symbolic tracing (analysis/trace.py), module calls as they
  are written; submodules it cannot trace through become leaves.
- "export": ``torch.export.export(..., strict=False)`` with a dynamic batch
  dimension; it runs the model (on an example batch) and so captures models
  symbolic tracing cannot (Hugging Face transformers, data-dependent Python).
  Its ATen graph is brought into the form the passes handle (``export_graph``).
- "auto": fx, and torch.export when fx fails or has to make a submodule a leaf
  to trace at all; fx again (with its leaves) when torch.export fails too.

The front end used, and why, is recorded in the graph's trace facts
(``trace_facts(gm).frontend`` / ``.frontend_reason``, the report's "trace"
section). A compile captures once with the front end asked for and then
every further graph with the one that ran (``resolved_frontend``), so all its
graphs name their sites alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from egp_export.analysis.bound_layers import bind_constant_layers
from egp_export.analysis.fx import keeps_effects
from egp_export.analysis.inputs import Batch, batch_size, model_input_names, take
from egp_export.analysis.ops import LayerKind, layer_kind, named_modules
from egp_export.analysis.trace import (
    TRACE_META_KEY,
    LeafSpec,
    TraceFacts,
    failure_line,
    owned_copy,
    trace,
    trace_facts,
    warn_training_mode,
)
from egp_export.errors import TraceError

FRONTENDS = ("fx", "export", "auto")

# node.meta entries kept from torch.export's graph: the source module of each node. The rest (fake tensors,
# symbolic shapes, provenance) is dropped: copies of the graph would carry it and shapes are re-propagated.
_KEPT_META = ("nn_module_stack", "stack_trace")
# The module a bound layer computes, by the kind the vocabulary gives it: the source module must be one of these
# for the bound module to take its name.
_SOURCE_TYPES = {
    LayerKind.CONV: (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    LayerKind.LINEAR: (nn.Linear,),
    LayerKind.BATCH_NORM: (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "prelu": (nn.PReLU,),
}


def capture(
    model: nn.Module, example: Batch | None = None, *, frontend: str = "fx", leaf_modules: Iterable[LeafSpec] = (),
    dynamic_dims: dict[str, dict[int, str]] | None = None,
) -> fx.GraphModule:
    """An eval-mode GraphModule of a copy of ``model`` (never touched), captured by ``frontend``.

    ``example`` is one batch the model accepts (a tensor, a tuple or a dict of
    tensors); the "export" and "auto" front ends run the model on it (fx
    tracing does not need it). ``leaf_modules`` are a torch.fx notion:
    torch.export captures inside every module and refuses them.
    ``dynamic_dims`` (``{input: {axis: name}}``, input names as
    ``inputs.model_input_names`` gives them, e.g. ``{"input_ids": {1: "seq"}}``)
    are kept symbolic by torch.export beside the batch, so the graph runs at
    other sizes of them (fx graphs are symbolic in every dimension already).
    """
    if frontend not in FRONTENDS:
        raise ValueError(f"frontend must be one of {', '.join(FRONTENDS)}, got {frontend!r}")
    leaf_modules = tuple(leaf_modules)
    if frontend == "fx":
        return _with_reason(trace(model, leaf_modules=leaf_modules), "requested")
    if frontend == "export":
        return export_graph(model, example, leaf_modules=leaf_modules, reason="requested", dynamic_dims=dynamic_dims)
    return _auto(model, example, leaf_modules, dynamic_dims)


def resolved_frontend(gm: fx.GraphModule) -> str:
    """The front end that captured ``gm`` ("fx" or "export"): what "auto" chose."""
    return trace_facts(gm).frontend


def _auto(model: nn.Module, example: Batch | None, leaf_modules: tuple, dynamic_dims=None) -> fx.GraphModule:
    """fx; torch.export when fx raises or needs untraceable leaves; fx with its leaves when torch.export fails."""
    traced = None
    with warnings.catch_warnings(record=True) as fx_warnings:  # re-issued only if the fx graph is the one used
        warnings.simplefilter("always")
        try:
            traced = trace(model, leaf_modules=leaf_modules)
        except TraceError as error:
            fx_failure = str(error)
    if traced is not None:
        untraceable = [leaf.name for leaf in trace_facts(traced).leaf_modules if leaf.reason.startswith("untraceable")]
        if not untraceable:
            return _reissued(traced, fx_warnings, "auto: torch.fx traced the whole model")
        fx_failure = f"torch.fx could not trace inside {', '.join(repr(name) for name in untraceable)}"
    try:
        return export_graph(
            model, example, leaf_modules=leaf_modules, reason=f"auto: {fx_failure}", dynamic_dims=dynamic_dims
        )
    except TraceError as error:
        if traced is None:
            raise TraceError(f"neither front end captures the model. {fx_failure} | {error}") from None
        return _reissued(traced, fx_warnings, f"auto: {fx_failure}, and torch.export failed too ({error}): fx with leaves")


def _reissued(gm: fx.GraphModule, caught: list, reason: str) -> fx.GraphModule:
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return _with_reason(gm, reason)


def _with_reason(gm: fx.GraphModule, reason: str) -> fx.GraphModule:
    facts = trace_facts(gm)  # a GraphModule given as the model has none yet: stored here
    facts.frontend_reason = reason
    gm.meta[TRACE_META_KEY] = facts
    return gm


# torch.export --------------------------------------------------------------------------------------------------


def export_graph(
    model: nn.Module, example: Batch | None, *, leaf_modules: tuple = (), reason: str = "requested",
    dynamic_dims: dict[str, dict[int, str]] | None = None,
) -> fx.GraphModule:
    """``model`` captured by torch.export with a dynamic batch dimension, in the form the passes handle.

    - The batch dimension is dynamic: an example of one sample would let
      torch.export specialise it to 1 (DESIGN.md), so the model is exported on
      at least two samples made from the example, and the graph keeps its
      shape computations symbolic (it runs at any batch size); so are the
      ``dynamic_dims`` (a sequence length), each at least 2.
    - Guard nodes (``_guards_fn``) are stripped; the module is a plain
      GraphModule in eval mode.
    - ATen conv / linear / batch-norm calls (``aten.conv2d``,
      ``aten.convolution``, ``aten.linear``, ``aten.batch_norm``,
      ``aten._native_batch_norm_legit_no_training``) and PReLUs with constant
      parameters become module calls (analysis/bound_layers.py).
    - Modules and nodes take the names of their source modules
      (``node.meta["nn_module_stack"]``), as torch.fx names them: the conv of
      ``layer1.0.conv1`` is module ``layer1.0.conv1``, its activation node
      ``layer1_0_relu`` (``layer1_0_relu_1`` for its second call).
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    if leaf_modules:
        raise TraceError(
            "leaf modules are a torch.fx notion: torch.export captures inside every module, so it cannot keep "
            f"{', '.join(map(str, leaf_modules))} opaque; drop the leaf modules (--leaf-module) or use the fx front end."
        )
    if example is None:
        raise TraceError("the torch.export front end runs the model: give an example batch to capture it with.")
    warn_training_mode(model)
    owned = owned_copy(model).eval()
    wide = take(example, torch.arange(max(2, batch_size(example))) % batch_size(example))
    args, kwargs, dynamic = _export_inputs(wide, model_input_names(owned, wide), dynamic_dims or {})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(owned, args, kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as error:  # torch.export raises many types; all mean "not capturable"
        named = "".join(f", {name}" for name in dict.fromkeys(n for axes in (dynamic_dims or {}).values() for n in axes.values()))
        raise TraceError(
            f"torch.export cannot capture the model with dynamic dimensions (batch{named}): {failure_line(error)}. "
            "Make forward() work for any size of them (no Python branches on sizes or on tensor values), "
            "or use the fx front end."
        ) from None
    gm = _plain_module(program.module(), type(owned).__name__)
    flat = torch.fx._pytree.tree_flatten_spec((args, kwargs), gm._in_spec)
    with torch.no_grad():
        ShapeProp(gm).propagate(*[t.clone() for t in flat])  # binding batch norms needs their input's rank
    bound = bind_constant_layers(gm, prelu=True)
    gm.graph.eliminate_dead_code(is_impure_node=keeps_effects(gm))
    gm = _name_by_source(gm, owned, [layer.call for layer in bound])
    gm.graph.lint()
    gm.meta[TRACE_META_KEY] = TraceFacts(frontend="export", frontend_reason=reason)
    return gm.eval()


def _export_inputs(batch: Batch, names: list[str], dynamic_dims: dict[str, dict[int, str]]) -> tuple[tuple, dict, object]:
    """(args, kwargs, dynamic_shapes) for torch.export: dimension 0 of every input is the one batch dimension, and
    each axis of ``dynamic_dims`` dynamic within the range the model allows (inputs that must agree are found
    equal by torch.export itself)."""
    unknown = sorted(set(dynamic_dims) - set(names))
    if unknown:
        raise TraceError(
            f"dynamic dimensions name {', '.join(map(repr, unknown))}, not an input of the model "
            f"({', '.join(map(repr, names))}); name the inputs as the model takes them."
        )
    batch_dim = torch.export.Dim("batch", min=1)

    def axes(name: str) -> dict:
        spec = {0: batch_dim}
        for axis in dynamic_dims.get(name, {}):
            # DYNAMIC lets torch.export find the range the model allows (a position table caps a sequence)
            spec[int(axis)] = torch.export.Dim.DYNAMIC
        return spec

    if isinstance(batch, torch.Tensor):
        return (batch,), {}, (axes(names[0]),)
    if isinstance(batch, dict):
        return (), dict(batch), {key: axes(str(key)) for key in batch}
    return tuple(batch), {}, tuple(axes(name) for name in names)


def _plain_module(unlifted: fx.GraphModule, class_name: str) -> fx.GraphModule:
    """``ep.module()`` without its guards, hooks and train()/eval() refusal: a GraphModule like fx's."""
    graph = unlifted.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards_fn"):
            graph.erase_node(node)  # checks input shapes against the exported ones; breaks other batch sizes
        node.meta = {key: node.meta[key] for key in _KEPT_META if key in node.meta}
    return fx.GraphModule(unlifted, graph, class_name)


def _source(node: fx.Node, model_modules: dict[str, nn.Module]) -> tuple[str, nn.Module] | None:
    """The innermost module of the user's model that ``node`` was captured in (path, module), or None."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        if isinstance(path, str) and path and path in model_modules:
            return path, model_modules[path]
    return None


def _is_torch_leaf(module: nn.Module) -> bool:
    """What torch.fx calls as one module by default (so names by its path): torch.nn's own layers."""
    kind = type(module)
    return kind.__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(
        module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


def _name_by_source(gm: fx.GraphModule, model: nn.Module, calls: list[fx.Node]) -> fx.GraphModule:
    """Bound modules move to their source module's path where nothing else lives there; nodes captured in a
    torch.nn module are named by its path (as torch.fx names that module's call). Returns the renamed module."""
    model_modules = dict(model.named_modules())
    modules = named_modules(gm)
    wanted: dict[str, list[fx.Node]] = {}
    for call in calls:
        source = _source(call, model_modules)
        kind = layer_kind(call, modules) or "prelu"
        if source is not None and isinstance(source[1], _SOURCE_TYPES[kind]):
            wanted.setdefault(source[0], []).append(call)
    referenced = {str(n.target) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for path, path_calls in wanted.items():
        (call, *others) = path_calls
        own = str(call.target)
        clash = any(t == path or t.startswith(path + ".") or path.startswith(t + ".") for t in referenced - {own})
        if others or clash:
            continue  # a source module called twice keeps one copy per call, under the binding's own names
        gm.add_submodule(path, gm.get_submodule(own))  # replaces the parameter container the capture left there
        call.target = path
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        source = _source(node, model_modules)
        if source is not None and _is_torch_leaf(source[1]):
            node._rename(source[0].replace(".", "_"))
        elif isinstance(node.target, torch._ops.OpOverload):  # aten.add_.Tensor: "add", as fx names torch.add
            node._rename(node.target._schema.name.split("::")[-1].rstrip("_") or node.name)
    return fx.GraphModule(gm, gm.graph, gm.__class__.__name__)  # copies only what the graph reads
