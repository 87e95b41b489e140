"""Merge two neighbouring linear layers into one where it is exact and does not cost more.

Rules are data (``MERGE_RULES``): each says which pair it merges, why it may
refuse, and how it builds the merged layer. A pair is two layers A -> B with
only eval-mode identities (Dropout, Identity) between them and A's output read
by nothing else. The general conv-chain rules (k1 x k1 -> k2 x k2 with
padding, border classes, residual folding, the latency plan) slot in as more
rules and a cost model in the merge-engine issue.

    Linear -> Linear:       W = W2 W1,  b = W2 b1 + b2                    (exact)
    Conv(k) -> Conv(1x1):   W[o,i,k] = sum_m W2[o,m] W1[m,i,k],
                            b = W2 b1 + b2                                (exact)
    (1x1, stride 1, no padding on B: B mixes channels pointwise only.)

A merge is refused when it would raise the MACs per output position:
Linear: in*out > in*h + h*out; Conv: a grouped A becomes dense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..graph import CONV_TYPES, LINEAR_TYPES, is_identity, module_of, named_modules
from ._fold import layer_refusal
from .base import GraphPass


@dataclass(frozen=True)
class MergeRule:
    name: str
    matches: Callable[[nn.Module, nn.Module], bool]
    refusal: Callable[[nn.Module, nn.Module], str | None]
    merge: Callable[[nn.Module, nn.Module], nn.Module]


def _bias(module: nn.Module) -> torch.Tensor:
    rows = module.weight.shape[0]
    return module.bias.detach().to(torch.float64) if module.bias is not None else torch.zeros(rows, dtype=torch.float64)


def _linear_refusal(a: nn.Linear, b: nn.Linear) -> str | None:
    before = a.in_features * a.out_features + b.in_features * b.out_features
    after = a.in_features * b.out_features
    if after > before:
        return f"MACs would grow from {before} to {after} per token (hidden width {a.out_features} is too narrow)"
    return None


def _merge_linear(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    # W = W2 W1, b = W2 b1 + b2
    w1, w2 = a.weight.detach().to(torch.float64), b.weight.detach().to(torch.float64)
    merged = nn.Linear(a.in_features, b.out_features, bias=True, dtype=a.weight.dtype, device=a.weight.device)
    with torch.no_grad():
        merged.weight.copy_(w2 @ w1)
        merged.bias.copy_(w2 @ _bias(a) + _bias(b))
    return merged


def _is_pointwise(conv: nn.Module) -> bool:
    return (
        all(k == 1 for k in conv.kernel_size)
        and all(s == 1 for s in conv.stride)
        and not isinstance(conv.padding, str)
        and all(p == 0 for p in conv.padding)
    ) or (isinstance(conv.padding, str) and all(k == 1 for k in conv.kernel_size) and all(s == 1 for s in conv.stride))


def _dense_weight(conv: nn.Module) -> torch.Tensor:
    """A grouped conv's weight as the equivalent dense [out, in, *k] weight (zero off its groups)."""
    weight = conv.weight.detach().to(torch.float64)
    if conv.groups == 1:
        return weight
    out_per_group = conv.out_channels // conv.groups
    in_per_group = conv.in_channels // conv.groups
    dense = torch.zeros(conv.out_channels, conv.in_channels, *weight.shape[2:], dtype=torch.float64)
    for g in range(conv.groups):
        rows = slice(g * out_per_group, (g + 1) * out_per_group)
        dense[rows, g * in_per_group : (g + 1) * in_per_group] = weight[rows]
    return dense


def _conv_pointwise_refusal(a: nn.Module, b: nn.Module) -> str | None:
    if type(a) is not type(b):
        return f"{type(a).__name__} -> {type(b).__name__} mixes dimensionalities"
    if not _is_pointwise(b):
        return "second conv is not 1x1 with stride 1 and no padding (general conv chains: merge engine)"
    kernel = 1
    for k in a.kernel_size:
        kernel *= int(k)
    before = a.out_channels * (a.in_channels // a.groups) * kernel + b.out_channels * (b.in_channels // b.groups)
    after = b.out_channels * a.in_channels * kernel
    if after > before:
        return f"MACs per output position would grow from {before} to {after}"
    return None


def _merge_conv_pointwise(a: nn.Module, b: nn.Module) -> nn.Module:
    # W[o, i, k] = sum_m W2[o, m] W1[m, i, k],  b = W2 b1 + b2
    w1 = _dense_weight(a)
    w2 = _dense_weight(b).flatten(1)
    merged = type(a)(
        a.in_channels,
        b.out_channels,
        a.kernel_size,
        stride=a.stride,
        padding=a.padding,
        dilation=a.dilation,
        groups=1,
        bias=True,
        padding_mode=a.padding_mode,
        dtype=a.weight.dtype,
        device=a.weight.device,
    )
    with torch.no_grad():
        merged.weight.copy_(torch.einsum("om,mi...->oi...", w2, w1))
        merged.bias.copy_(w2 @ _bias(a) + _bias(b))
    return merged


MERGE_RULES: tuple[MergeRule, ...] = (
    MergeRule(
        "linear->linear",
        lambda a, b: isinstance(a, LINEAR_TYPES) and isinstance(b, LINEAR_TYPES),
        _linear_refusal,
        _merge_linear,
    ),
    MergeRule(
        "conv->conv1x1",
        lambda a, b: isinstance(a, CONV_TYPES) and isinstance(b, CONV_TYPES),
        _conv_pointwise_refusal,
        _merge_conv_pointwise,
    ),
)


class MergeLinearChains(GraphPass):
    name = "merge_linear_chains"

    def __init__(self, rules: tuple[MergeRule, ...] = MERGE_RULES) -> None:
        self.rules = rules

    def run(self, gm: fx.GraphModule) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op == "output":
                continue  # erased by an earlier merge in this run
            first = module_of(node, modules)
            if not isinstance(first, CONV_TYPES + LINEAR_TYPES):
                continue
            between, second_node = self._follow(node, modules)
            second = module_of(second_node, modules) if second_node is not None else None
            if not isinstance(second, CONV_TYPES + LINEAR_TYPES):
                continue
            rule = next((r for r in self.rules if r.matches(first, second)), None)
            if rule is None:
                continue
            reason = (
                layer_refusal(node, gm, modules)
                or layer_refusal(second_node, gm, modules)
                or (None if second_node.args[0] is (between[-1] if between else node) else "not the layer's input")
                or rule.refusal(first, second)
            )
            if reason:
                self.refuse(second_node, f"{rule.name} merge of '{node.name}' and '{second_node.name}' refused: {reason}")
                continue
            merged = rule.merge(first, second).train(first.training)
            gm.add_submodule(str(node.target), merged)
            modules[str(node.target)] = merged
            second_node.replace_all_uses_with(node)
            for dead in [second_node, *reversed(between)]:
                gm.graph.erase_node(dead)
            self.rewrote([node.name, *[b.name for b in between], second_node.name], f"{rule.name}: '{node.target}' absorbed '{second_node.target}'")

    @staticmethod
    def _follow(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node | None]:
        """Identities after ``node`` (each the only user of the one before) and the node after them."""
        between: list[fx.Node] = []
        current = node
        while len(current.users) == 1:
            user = next(iter(current.users))
            if is_identity(user, modules) and user.args[0] is current:
                between.append(user)
                current = user
                continue
            return between, user
        return between, None
