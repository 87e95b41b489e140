"""Tracing a user's model into an eval-mode torch.fx GraphModule, never touching the model itself."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.activations import hidden_activation_count
from egp_export.analysis.ops import named_modules
from egp_export.errors import TraceError

# How often tracing retries with one more submodule made a leaf before giving up.
MAX_AUTOMATIC_LEAVES = 32

TRACE_META_KEY = "egp_trace"


@dataclass(frozen=True)
class LeafModule:
    """A submodule traced as one opaque call: its inside is not analysed (no activation sites in it)."""

    name: str
    type: str
    reason: str  # "requested", "torch.nn module traced as one call" or "untraceable: <why tracing through it failed>"
    hidden_activations: int  # activations inside it that calibration cannot see

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "reason": self.reason, "hidden_activations": self.hidden_activations}


@dataclass
class TraceFacts:
    """What capturing decided, stored in ``gm.meta[TRACE_META_KEY]`` for the report: the front end that captured
    the graph ("fx" or "export", analysis/capture.py), why that one, and the submodules fx called as leaves."""

    leaf_modules: list[LeafModule] = field(default_factory=list)
    frontend: str = "fx"
    frontend_reason: str = "requested"

    def to_dict(self) -> dict:
        return {
            "frontend": self.frontend,
            "frontend_reason": self.frontend_reason,
            "leaf_modules": [leaf.to_dict() for leaf in self.leaf_modules],
        }


def trace_facts(gm: fx.GraphModule) -> TraceFacts:
    return gm.meta.get(TRACE_META_KEY) or TraceFacts()


LeafSpec = str | type


class _PathTracer(fx.Tracer):
    """A Tracer that makes the requested submodules leaves and remembers where tracing failed."""

    def __init__(self, leaf_names: set[str], leaf_types: tuple[type, ...]) -> None:
        super().__init__()
        self.egp_module_path: list[str] = []
        self.egp_leaf_names = leaf_names
        self.egp_leaf_types = leaf_types

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.egp_leaf_names or isinstance(m, self.egp_leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self.egp_module_path.append(self.path_of_module(m) or type(m).__name__)
        result = super().call_module(m, forward, args, kwargs)
        self.egp_module_path.pop()
        return result


def owned_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that egp-export may change, with pruning masks made permanent.

    ``torch.nn.utils.prune`` keeps ``weight`` as a computed (non-leaf) tensor,
    which ``copy.deepcopy`` refuses; the copy gets a detached clone of it, and
    then ``prune.remove`` turns the copy's ``weight_orig * weight_mask`` into a
    plain parameter. The user's model keeps its masks.
    """
    from torch.nn.utils import prune

    memo: dict[int, object] = {}
    pruned: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                methods = hook._pruning_methods if isinstance(hook, prune.PruningContainer) else (hook,)
                tensor_name = methods[-1]._tensor_name
                memo[id(getattr(module, tensor_name))] = getattr(module, tensor_name).detach().clone()
                pruned.append((name, tensor_name))
    owned = copy.deepcopy(model, memo)
    for name, tensor_name in pruned:
        prune.remove(owned.get_submodule(name), tensor_name)
    return owned


def warn_training_mode(model: nn.Module) -> None:
    """A model in training mode is captured in eval mode, with this warning."""
    if model.training:
        warnings.warn(
            "the model is in training mode; egp-export compiles its eval-mode behaviour "
            "(call model.eval() first to silence this).",
            UserWarning,
            stacklevel=4,
        )


def _split_leaf_specs(model: nn.Module, leaf_modules: Iterable[LeafSpec]) -> tuple[set[str], tuple[type, ...]]:
    names: set[str] = set()
    types: list[type] = []
    known = set(dict(model.named_modules()))
    for spec in leaf_modules:
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            types.append(spec)
        elif isinstance(spec, str) and spec in known and spec:
            names.add(spec)
        else:
            raise TraceError(
                f"leaf module {spec!r} is neither a submodule name of the model nor an nn.Module type; "
                "pass qualified names as printed by model.named_modules() (e.g. 'layer1.0') or module classes."
            )
    return names, tuple(types)


def failure_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def trace(model: nn.Module, *, leaf_modules: Iterable[LeafSpec] = (), automatic_leaves: bool = True) -> fx.GraphModule:
    """An eval-mode torch.fx GraphModule of a deep copy of ``model`` (which is never touched).

    A model in training mode is traced in eval mode with a warning: BatchNorm
    and Dropout behave differently in training, and deployment means eval.

    ``leaf_modules``: submodule names or nn.Module types traced as one opaque
    call. With ``automatic_leaves`` a submodule that torch.fx cannot trace
    through (Python control flow on a traced value, e.g. ``if x.shape[-2] <
    7``) is made a leaf and tracing retried. Leaves are recorded in
    ``gm.meta[TRACE_META_KEY]`` (see ``trace_facts``); one that contains
    activations gets a warning, since calibration cannot see inside it.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    warn_training_mode(model)
    leaf_names, leaf_types = _split_leaf_specs(model, leaf_modules)
    owned = owned_copy(model).eval()
    if isinstance(owned, fx.GraphModule):
        return owned
    failed: dict[str, str] = {}  # submodule made a leaf automatically -> why tracing through it failed
    while True:
        tracer = _PathTracer(leaf_names | set(failed), leaf_types)
        try:
            graph = tracer.trace(owned)
            break
        except Exception as error:  # fx raises many types; all mean "not traceable"
            where = tracer.egp_module_path[-1] if tracer.egp_module_path else ""
            if automatic_leaves and where and where not in failed and len(failed) < MAX_AUTOMATIC_LEAVES:
                failed[where] = failure_line(error)
                continue
            raise TraceError(_untraceable_message(where or "the top-level forward()", error, automatic_leaves)) from None
    _positional_inputs(graph)
    # GraphModule builds fresh container modules, which start in training mode.
    gm = fx.GraphModule(tracer.root, graph, type(owned).__name__).eval()
    gm.meta[TRACE_META_KEY] = _leaf_facts(gm, leaf_names, leaf_types, failed)
    return gm


def _untraceable_message(where: str, error: Exception, automatic_leaves: bool) -> str:
    first_line = failure_line(error)
    if where == "the top-level forward()":
        advice = (
            "The model's own forward() cannot be made a leaf: move Python control flow on tensors "
            "(if/for on values or shapes) out of it, or wrap that code in a submodule."
        )
    elif automatic_leaves:
        advice = "It is the module being traced when tracing failed and could not be made a leaf."
    else:
        advice = f"Trace it as a leaf (leaf_modules=['{where}'], CLI --leaf-module {where}) or move that code out of forward()."
    return (
        f"torch.fx cannot trace the model inside '{where}': {first_line}. "
        "Python control flow on a traced value (if/for on tensor values or shapes) cannot be traced symbolically. "
        + advice
    )


def _leaf_facts(gm: fx.GraphModule, names: set[str], types: tuple[type, ...], failed: dict[str, str]) -> TraceFacts:
    """Every called submodule that hides activations or was made a leaf; warn about the former."""
    modules = named_modules(gm)
    facts = TraceFacts()
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = modules[target]
        hidden = hidden_activation_count(module)
        if target in failed:
            reason = f"untraceable: {failed[target]}"
        elif target in names or isinstance(module, types):
            reason = "requested"
        elif hidden:
            reason = "torch.nn module traced as one call"
        else:
            continue
        if any(leaf.name == target for leaf in facts.leaf_modules):
            continue
        facts.leaf_modules.append(LeafModule(target, type(module).__name__, reason, hidden))
        if hidden:
            warnings.warn(
                f"'{target}' ({type(module).__name__}) is traced as one call ({reason}); the {hidden} activation(s) "
                "inside it are not analysed or rewritten.",
                UserWarning,
                stacklevel=3,
            )
    return facts


def _positional_inputs(graph: fx.Graph) -> None:
    """``layer(input=x)`` becomes ``layer(x)``: passes read a layer's input as its first argument.

    torch.nn layers and torch.nn.functional name their first parameter
    ``input``, so moving it to the front changes nothing.
    """
    for node in graph.nodes:
        if node.op in ("call_module", "call_function") and not node.args and "input" in node.kwargs:
            kwargs = dict(node.kwargs)
            node.args = (kwargs.pop("input"),)
            node.kwargs = kwargs
