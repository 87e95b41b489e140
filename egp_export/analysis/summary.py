"""Whole-graph measures for the report: depth, layer and activation counts, parameters, MACs."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.activations import activation_spec
from egp_export.analysis.fx import shape_of
from egp_export.analysis.ops import functional_layer_args, is_layer, module_of, named_modules


def depth(gm: fx.GraphModule) -> int:
    """Longest input-to-output path counted in conv/linear layers."""
    modules = named_modules(gm)
    longest: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        inherited = max((longest[a] for a in node.all_input_nodes), default=0)
        longest[node] = inherited + (1 if is_layer(node, modules) else 0)
    return max(longest.values(), default=0)


def _weight_shape(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, ...] | None:
    module = module_of(node, modules)
    if module is not None:
        return tuple(module.weight.shape)
    weight = (functional_layer_args(node) or {}).get("weight")
    return shape_of(weight) if isinstance(weight, fx.Node) else None


def layer_macs(node: fx.Node, modules: dict[str, nn.Module]) -> int:
    """Multiply-accumulates of one conv/linear call per sample (needs shapes on the node).

    Each output element costs one MAC per weight entry of its filter:
    prod(weight.shape[1:]) (in/groups x kernel for a conv, in for a linear).
    """
    shape, weight = shape_of(node), _weight_shape(node, modules)
    if shape is None or weight is None:
        return 0
    per_sample = 1
    for size in shape[1:]:
        per_sample *= int(size)
    per_output = 1
    for size in weight[1:]:
        per_output *= int(size)
    return per_sample * per_output


def summarize(gm: fx.GraphModule) -> dict[str, int]:
    """Depth, layer and activation counts, parameters and MACs (shapes must be propagated)."""
    modules = named_modules(gm)
    layers = [n for n in gm.graph.nodes if is_layer(n, modules)]
    return {
        "depth": depth(gm),
        "layers": len(layers),
        "activations": sum(1 for n in gm.graph.nodes if activation_spec(n, modules) is not None),
        "params": sum(p.numel() for p in gm.parameters()),
        "macs": sum(layer_macs(n, modules) for n in layers),
    }
