"""Functional conv / linear / batch-norm calls with constant parameters, as the modules that compute them (exact).

timm's ``StdConv2d`` and ``BatchNormAct2d`` trace as ``F.conv2d(x, w, ...)``
and ``F.batch_norm(x, running_mean, ...)``, and every layer of a
``torch.export`` graph is an ATen call (``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``) whose parameter operands are ``get_attr`` nodes, or
(weight standardisation) small subgraphs computed from ``get_attr`` nodes
alone. Such a call computes exactly what a module with those tensors computes:

    F.conv2d(x, W(θ), b, s, p, d, g)  =  Conv2d(W(θ), b, s, p, d, g)(x)
    F.batch_norm(x, μ, σ², γ, β, training=False, eps)  =  BatchNorm(μ, σ², γ, β, eps).eval()(x)

so the constant subgraph is evaluated once and the call becomes a call of a
module holding its own copy of the tensors (a parameter the graph shares
with another node stays untouched). The vocabulary (analysis/ops.py) binds
each spelling's operands by its own signature. Used by the capture seam
(torch.export graphs arrive in this form) and by the ``bind_functional_layers``
pass (fx graphs of timm's fused layers).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import (
    PRELU_FUNCTIONS,
    TUPLE_LAYERS,
    LayerKind,
    bind,
    functional_layer_args,
    layer_kind,
    named_modules,
    operand,
)

_CONV_MODULES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BATCHNORM_MODULES = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _constant(value, gm: fx.GraphModule, cache: dict) -> object:
    """The value of an operand computed from attributes and literals alone; raises LookupError otherwise."""
    if not isinstance(value, fx.Node):
        if isinstance(value, (list, tuple)):
            return type(value)(_constant(v, gm, cache) for v in value)
        return value
    if value in cache:
        return cache[value]
    if value.op == "get_attr":
        result = gm
        for part in str(value.target).split("."):
            result = getattr(result, part)
    elif value.op in ("call_function", "call_method"):
        args = _constant(tuple(value.args), gm, cache)
        kwargs = {k: _constant(v, gm, cache) for k, v in value.kwargs.items()}
        with torch.no_grad():
            result = value.target(*args, **kwargs) if value.op == "call_function" else getattr(args[0], value.target)(
                *args[1:], **kwargs
            )
    else:
        raise LookupError(f"'{value.name}' depends on the input")
    cache[value] = result
    return result


def _literal(node: fx.Node, name: str, default):
    """Operand ``name`` of the call, bound by its callable's own signature; raises LookupError if it is computed."""
    value = operand(node, name, default)
    if isinstance(value, fx.Node) or (isinstance(value, (list, tuple)) and any(isinstance(v, fx.Node) for v in value)):
        raise LookupError(f"'{name}' of '{node.name}' is computed in the graph")
    return value


def _tensor(value) -> torch.Tensor | None:
    return None if value is None else value.detach().clone()


def _conv_module(node: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    rank = weight.dim() - 2
    groups = _literal(node, "groups", 1)
    module = _CONV_MODULES[rank](
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=_literal(node, "stride", 1),
        padding=_literal(node, "padding", 0),
        dilation=_literal(node, "dilation", 1),
        groups=groups,
        bias=bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return module


def _linear_module(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype, device=weight.device)
    module.weight = nn.Parameter(weight)
    if bias is not None:
        module.bias = nn.Parameter(bias)
    return module


def _batchnorm_module(node: fx.Node, tensors: dict) -> nn.Module | None:
    shape = shape_of(node.args[0]) if node.target in TUPLE_LAYERS else shape_of(node)
    if shape is None or len(shape) not in _BATCHNORM_MODULES or _literal(node, "training", False) is not False:
        return None
    mean, var = tensors["running_mean"], tensors["running_var"]
    if mean is None or var is None:
        return None
    weight, bias = tensors["weight"], tensors["bias"]
    module = _BATCHNORM_MODULES[len(shape)](
        mean.numel(), eps=_literal(node, "eps", 1e-5), affine=weight is not None or bias is not None,
        dtype=mean.dtype, device=mean.device,
    )
    module.running_mean.copy_(mean)
    module.running_var.copy_(var)
    if module.affine:
        module.weight = nn.Parameter(weight if weight is not None else torch.ones_like(mean))
        module.bias = nn.Parameter(bias if bias is not None else torch.zeros_like(mean))
    return module.eval()


def _prelu_module(node: fx.Node, gm: fx.GraphModule, cache: dict) -> nn.Module | None:
    # prelu(x, a) = PReLU(a)(x): one slope, or one per channel (dim 1)
    try:
        weight = _tensor(_constant(bind(node, PRELU_FUNCTIONS[node.target], "weight"), gm, cache))
    except LookupError:
        return None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    module = nn.PReLU(weight.numel(), dtype=weight.dtype, device=weight.device)
    module.weight = nn.Parameter(weight)
    return module


def bound_module(gm: fx.GraphModule, node: fx.Node, cache: dict) -> nn.Module | None:
    """The module that computes functional call ``node`` (a layer, or a PReLU) exactly, or None (parameters
    computed from the input, a training-mode batch norm, shapes unknown). ``cache``: constants evaluated so far."""
    if node.op == "call_function" and node.target in PRELU_FUNCTIONS and node.args and isinstance(node.args[0], fx.Node):
        return _prelu_module(node, gm, cache)
    kind = layer_kind(node, named_modules(gm)) if node.op == "call_function" else None
    operands = functional_layer_args(node)
    if kind is None or operands is None or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.target in TUPLE_LAYERS and any(user.target is not operator.getitem or user.args[1] != 0 for user in node.users):
        return None  # another element of the tuple (saved statistics) is read
    try:
        tensors = {name: _tensor(_constant(value, gm, cache)) for name, value in operands.items()}
        if kind is LayerKind.CONV:
            return _conv_module(node, tensors["weight"], tensors["bias"])
        if kind is LayerKind.LINEAR:
            return _linear_module(tensors["weight"], tensors["bias"])
        return _batchnorm_module(node, tensors)
    except LookupError:
        return None  # parameters computed from the input: a genuinely dynamic layer


@dataclass(frozen=True)
class BoundLayer:
    """One functional call replaced by a module call."""

    node: str  # the functional call's node name
    function: str
    call: fx.Node  # the module call that replaced it
    source: fx.Node  # the functional call itself (erased from the graph; its meta stays readable)


def bind_constant_layers(
    gm: fx.GraphModule, *, skip: Callable[[fx.Node], bool] = lambda node: False,
    name: Callable[[fx.Node], str] = lambda node: f"{node.name}_module",
    prelu: bool = False,
) -> list[BoundLayer]:
    """Replace every functional layer call with constant parameters by a module call (in place).

    ``skip``: calls to leave as they are; ``name``: the name hint of the module that replaces a call;
    ``prelu``: functional PReLUs too (before calibration only: a pass must not create uncalibrated sites).
    """
    bound = []
    cache: dict = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or skip(node) or (node.target in PRELU_FUNCTIONS and not prelu):
            continue
        module = bound_module(gm, node, cache)
        if module is None:
            continue
        call = insert_module_call(gm, node, name(node), module, (node.args[0],), like=node)
        call.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        if node.target in TUPLE_LAYERS:  # (output, saved statistics): its readers read output [0]
            for user in list(node.users):
                if "tensor_meta" in user.meta:
                    call.meta["tensor_meta"] = user.meta["tensor_meta"]
                user.replace_all_uses_with(call)
                gm.graph.erase_node(user)
        else:
            node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        bound.append(BoundLayer(node.name, getattr(node.target, "__name__", str(node.target)), call, node))
    return bound
