"""Which conv/linear layers feed which activation call site: the graph walks pruning is planned on.

The layer of a site is the conv/linear whose output reaches the site through
BatchNorm, eval-mode identities (Dropout, Identity) and pooling. Through a
residual add the site belongs to the layers of the operands, except
**shortcut** layers, as in EGP's reference code, which maps every ReLU to the
conv just before it and never prunes a downsample conv: in
``relu(bn2(conv2(h)) + bn_d(downsample(x)))`` with ``h`` computed from ``x``,
the site belongs to conv2 alone. A layer is a shortcut of an add when its
input is a strict ancestor of the input of a layer on another operand (it
skips over what that layer computes); two layers that read the same tensor
(a RepVGG-style ``conv3x3(x) + conv1x1(x)``) are both kept.
``include_shortcuts=True`` keeps the shortcut layers too. An operand that is
not a layer (the identity shortcut) contributes none. A site reached from
anything else (concat, reshape, a model input) has no layer: its entropy is
measured and logged, nothing is pruned for it. Layers that feed no site (the
classifier) are never pruned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.ops import is_add, is_any_layer_module, is_batch_norm, is_identity, is_pool, module_of, named_modules
from egp_export.analysis.stats import SiteStats


def _passes_channels_through(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """A single-input op a site's pre-activation passes through on its way from the layer (eval mode).

    Pooling is not linear, but it carries a layer's channels unchanged to the
    site (one neuron per channel).
    """
    return (is_batch_norm(node, modules) or is_identity(node, modules) or is_pool(node, modules)) and (
        bool(node.args) and isinstance(node.args[0], fx.Node)
    )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    """Every node ``node`` is computed from (itself excluded)."""
    seen: set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.add(current)
            stack.extend(current.all_input_nodes)
    return seen


def _without_shortcuts(operand_layers: list[list[fx.Node]]) -> list[list[fx.Node]]:
    """Drop, per add operand, the layers whose input is a strict ancestor of another operand's layer input."""
    inputs_below = [
        [(layer.args[0], _ancestors(layer.args[0])) for layer in layers if isinstance(layer.args[0], fx.Node)]
        for layers in operand_layers
    ]

    def is_shortcut(layer: fx.Node, operand: int) -> bool:
        source = layer.args[0]
        return any(
            source is not other_input and source in other_ancestors
            for other, below in enumerate(inputs_below) if other != operand
            for other_input, other_ancestors in below
        )

    return [[layer for layer in layers if not is_shortcut(layer, index)] for index, layers in enumerate(operand_layers)]


def _producers(node: fx.Node, modules: Mapping[str, nn.Module], include_shortcuts: bool) -> list[fx.Node]:
    """The layer nodes whose output reaches ``node`` (see the module docstring)."""
    if is_any_layer_module(module_of(node, modules)):  # a mask prunes a subclass with its own forward too
        return [node]
    if _passes_channels_through(node, modules):
        return _producers(node.args[0], modules, include_shortcuts)
    if is_add(node):
        operand_layers = [_producers(operand, modules, include_shortcuts) for operand in node.all_input_nodes]
        if not include_shortcuts:
            operand_layers = _without_shortcuts(operand_layers)
        return [layer for layers in operand_layers for layer in layers]
    return []


def site_layers(
    gm: fx.GraphModule, sites: Sequence[SiteStats], *, include_shortcuts: bool = False
) -> dict[str, tuple[str, ...]]:
    """Activation site name -> qualified names of the conv/linear layers feeding it (see the module docstring)."""
    modules = named_modules(gm)
    nodes = {node.name: node for node in gm.graph.nodes}
    return {
        site.name: tuple(dict.fromkeys(
            str(layer.target) for layer in _producers(nodes[site.name].args[0], modules, include_shortcuts)
        ))
        for site in sites
    }


def layers_of(mapping: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Layer -> the sites it feeds, layers in the order they are first met."""
    layers: dict[str, list[str]] = {}
    for site, producers in mapping.items():
        for layer in producers:
            layers.setdefault(layer, []).append(site)
    return layers
