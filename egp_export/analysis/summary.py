"""Whole-graph measures for the report: depth, layer and activation counts, parameters, MACs."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.activations import activation_spec
from egp_export.analysis.fx import shape_of
from egp_export.analysis.ops import CONV_TYPES, LINEAR_TYPES, is_layer, named_modules


def depth(gm: fx.GraphModule) -> int:
    """Longest input-to-output path counted in conv/linear layers."""
    modules = named_modules(gm)
    longest: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        inherited = max((longest[a] for a in node.all_input_nodes), default=0)
        longest[node] = inherited + (1 if is_layer(node, modules) else 0)
    return max(longest.values(), default=0)


def layer_macs(node: fx.Node, module: nn.Module) -> int:
    """Multiply-accumulates of one conv/linear call per sample (needs shapes on the node)."""
    shape = shape_of(node)
    if shape is None:
        return 0
    per_sample = 1
    for size in shape[1:]:
        per_sample *= int(size)
    if isinstance(module, CONV_TYPES):
        kernel = 1
        for k in module.kernel_size:
            kernel *= int(k)
        return per_sample * (module.in_channels // module.groups) * kernel
    if isinstance(module, LINEAR_TYPES):
        return per_sample * module.in_features
    return 0


def summarize(gm: fx.GraphModule) -> dict[str, int]:
    """Depth, layer and activation counts, parameters and MACs (shapes must be propagated)."""
    modules = named_modules(gm)
    layers = [n for n in gm.graph.nodes if is_layer(n, modules)]
    return {
        "depth": depth(gm),
        "layers": len(layers),
        "activations": sum(1 for n in gm.graph.nodes if activation_spec(n, modules) is not None),
        "params": sum(p.numel() for p in gm.parameters()),
        "macs": sum(layer_macs(n, modules[str(n.target)]) for n in layers),
    }
