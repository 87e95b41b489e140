"""Merge neighbouring Linear layers, and a pointwise conv into the Linear after global pooling.

Rules are data (``MERGE_RULES``): each says which pair it merges, why it may
refuse, and how it builds the merged layer. A pair is two layers A -> B with
only eval-mode identities (Dropout, Identity) between them and A's output read
by nothing else. Conv chains are ``merge_conv_chains``' business.

    Linear -> Linear:  W = W2 W1,  b = W2 b1 + b2                          (exact)
    1x1 conv -> global average pool -> flatten -> Linear:
        mean_hw(W1 x + b1) = W1 mean_hw(x) + b1, so the conv moves behind
        the pool and merges with the Linear: W = W2 W1, b = W2 b1 + b2     (exact)

Linear∘Linear is refused when it would raise the MACs per token:
in*out > in*h + h*out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.algebra.affine import layer_refusal
from egp_export.analysis.ops import CONV_TYPES, LINEAR_TYPES, is_identity, module_of, named_modules
from egp_export.passes.base import GraphPass


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


MERGE_RULES: tuple[MergeRule, ...] = (
    MergeRule(
        "linear->linear",
        lambda a, b: isinstance(a, LINEAR_TYPES) and isinstance(b, LINEAR_TYPES),
        _linear_refusal,
        _merge_linear,
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
            if isinstance(first, CONV_TYPES):
                self._merge_pooled_head(gm, node, modules)
                continue
            if not isinstance(first, LINEAR_TYPES):
                continue
            between, second_node = self._follow(node, modules)
            second = module_of(second_node, modules) if second_node is not None else None
            if not isinstance(second, LINEAR_TYPES):
                continue
            rule = next((r for r in self.rules if r.matches(first, second)), None)
            if rule is None:
                continue
            reason = (
                layer_refusal(node, gm, modules)
                or layer_refusal(second_node, gm, modules)
                or rule.refusal(first, second)
            )
            if reason:
                self.refuse(second_node, f"{rule.name} merge of '{node.name}' and '{second_node.name}' refused: {reason}")
                continue
            merged = rule.merge(first, second).train(first.training)
            gm.add_submodule(str(node.target), merged)
            modules[str(node.target)] = merged
            if "tensor_meta" in second_node.meta:
                node.meta["tensor_meta"] = second_node.meta["tensor_meta"]
            second_node.replace_all_uses_with(node)
            for dead in [second_node, *reversed(between)]:
                gm.graph.erase_node(dead)
            self.rewrote(
                [node.name, *[b.name for b in between], second_node.name],
                f"{rule.name}: '{node.target}' absorbed '{second_node.target}'",
            )

    def _merge_pooled_head(self, gm: fx.GraphModule, conv_node: fx.Node, modules: dict[str, nn.Module]) -> None:
        """1x1 conv -> global average pool -> flatten -> (identities) -> Linear: the conv joins the Linear."""
        path = []
        current = conv_node
        for accepts in (_is_global_average_pool, _is_flatten_from_channels):
            if len(current.users) != 1:
                return
            user = next(iter(current.users))
            if not accepts(user, modules) or user.args[0] is not current:
                return
            path.append(user)
            current = user
        between, linear_node = self._follow(current, modules)
        if linear_node is None or not isinstance(module_of(linear_node, modules), LINEAR_TYPES):
            return
        conv = modules[str(conv_node.target)]
        reason = (
            layer_refusal(conv_node, gm, modules)
            or layer_refusal(linear_node, gm, modules)
            or (None if _is_plain_pointwise(conv) else "the conv is not 1x1 with stride 1, no padding and no groups")
        )
        if reason:
            self.refuse(linear_node, f"pooled-head merge of '{conv_node.name}' into '{linear_node.name}' refused: {reason}")
            return
        linear = modules[str(linear_node.target)]
        as_linear = nn.Linear(conv.in_channels, conv.out_channels, dtype=conv.weight.dtype)
        with torch.no_grad():
            as_linear.weight.copy_(conv.weight.detach().flatten(1))
            as_linear.bias.copy_(_bias(conv).to(conv.weight.dtype))
        merged = _merge_linear(as_linear, linear).train(linear.training)
        gm.add_submodule(str(linear_node.target), merged)
        modules[str(linear_node.target)] = merged
        path[0].replace_input_with(conv_node, conv_node.args[0])
        gm.graph.erase_node(conv_node)
        self.rewrote(
            [conv_node.name, *[p.name for p in path], linear_node.name],
            f"pooled head: 1x1 conv '{conv_node.target}' moved behind the global pool and merged into '{linear_node.target}'",
        )

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


def _is_plain_pointwise(conv: nn.Module) -> bool:
    return (
        conv.groups == 1
        and all(k == 1 for k in conv.kernel_size)
        and all(st == 1 for st in conv.stride)
        and (conv.padding == "valid" or conv.padding == "same" or all(p == 0 for p in conv.padding))
    )


def _is_global_average_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = module_of(node, modules)
    if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        size = module.output_size
        return all(s == 1 for s in (size if isinstance(size, tuple) else (size,)))
    if node.op == "call_function" and node.target in (
        torch.nn.functional.adaptive_avg_pool1d, torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_avg_pool3d
    ):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))
    return False


def _is_flatten_from_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    module = module_of(node, modules)
    if isinstance(module, nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    is_flatten = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if not is_flatten:
        return False
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return start == 1 and end == -1
