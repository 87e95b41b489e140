"""Tracing a user's model into an eval-mode torch.fx GraphModule, never touching the model itself."""

from __future__ import annotations

import copy
import warnings

import torch.fx as fx
import torch.nn as nn

from egp_export.errors import TraceError


class _PathTracer(fx.Tracer):
    """A Tracer that remembers which submodule it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.egp_module_path: list[str] = []

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


def trace(model: nn.Module) -> fx.GraphModule:
    """An eval-mode torch.fx GraphModule of a deep copy of ``model`` (which is never touched).

    A model in training mode is traced in eval mode with a warning: BatchNorm
    and Dropout behave differently in training, and deployment means eval.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module, got {type(model).__name__}.")
    if model.training:
        warnings.warn(
            "the model is in training mode; egp-export compiles its eval-mode behaviour "
            "(call model.eval() first to silence this).",
            UserWarning,
            stacklevel=3,
        )
    owned = owned_copy(model).eval()
    if isinstance(owned, fx.GraphModule):
        return owned
    tracer = _PathTracer()
    try:
        graph = tracer.trace(owned)
    except Exception as error:  # fx raises many types; all mean "not traceable"
        where = tracer.egp_module_path[-1] if tracer.egp_module_path else "the top-level forward()"
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TraceError(
            f"torch.fx cannot trace the model inside '{where}': {first_line}. "
            "Data-dependent Python control flow (if/for on tensor values) cannot be traced; "
            "move it out of forward(), or mark that submodule as a leaf."
        ) from None
    _positional_inputs(graph)
    # GraphModule builds fresh container modules, which start in training mode.
    return fx.GraphModule(tracer.root, graph, type(owned).__name__).eval()


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
