"""Turn functional conv / linear / batch-norm calls with constant parameters into module calls (exact).

timm's ``StdConv2d`` and ``BatchNormAct2d`` trace as ``F.conv2d(x, w, ...)``
and ``F.batch_norm(x, running_mean, ...)`` (``torch.batch_norm`` and
``aten.batch_norm`` order their operands differently: the vocabulary binds
each spelling by its own signature) whose parameter operands are
``get_attr`` nodes, or (weight standardisation) small subgraphs computed from
``get_attr`` nodes alone. Such a call computes exactly what a module with
those tensors computes:

    F.conv2d(x, W(θ), b, s, p, d, g)  =  Conv2d(W(θ), b, s, p, d, g)(x)
    F.batch_norm(x, μ, σ², γ, β, training=False, eps)  =  BatchNorm(μ, σ², γ, β, eps).eval()(x)

so the constant subgraph is evaluated once and the call becomes a module
holding its own copy of the tensors. Folding and merging passes then treat it
like any other layer; a parameter the original graph shares with another
node stays untouched (the module owns a copy).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import LayerKind, functional_layer_args, layer_kind, named_modules, operand
from egp_export.analysis.provenance import absorb
from egp_export.passes.base import Fact, GraphPass, Recorder
from egp_export.records import RewriteKind

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
    shape = shape_of(node)
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


class BindFunctionalLayers(GraphPass):
    name = "bind_functional_layers"
    requires = frozenset({Fact.SHAPES})

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        modules = named_modules(gm)
        cache: dict = {}
        for node in list(gm.graph.nodes):
            kind = layer_kind(node, modules)
            operands = functional_layer_args(node)
            if kind is None or operands is None or not node.args or not isinstance(node.args[0], fx.Node):
                continue
            if record.is_withheld([node]):
                continue  # the compiler withdrew the rewrites around it
            try:
                tensors = {name: _tensor(_constant(value, gm, cache)) for name, value in operands.items()}
                if kind is LayerKind.CONV:
                    module = _conv_module(node, tensors["weight"], tensors["bias"])
                elif kind is LayerKind.LINEAR:
                    module = _linear_module(tensors["weight"], tensors["bias"])
                else:
                    module = _batchnorm_module(node, tensors)
            except LookupError:
                continue  # parameters computed from the input: a genuinely dynamic layer
            if module is None:
                continue
            call = insert_module_call(gm, node, f"{node.name}_module", module, (node.args[0],), like=node)
            absorb(call, [node], RewriteKind.FUNCTIONAL_LAYER_BOUND)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            record.rewrote(
                RewriteKind.FUNCTIONAL_LAYER_BOUND,
                [node.name],
                function=getattr(node.target, "__name__", str(node.target)),
                module=str(call.target),
            )
