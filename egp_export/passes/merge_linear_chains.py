"""Merge neighbouring Linear layers, and a pointwise conv into the Linear after global pooling.

Rules are data (``MERGE_RULES``, on ``passes/rules.py``): each pattern is a
chain of layers with only eval-mode identities (Dropout, Identity) between
them, every value but the last read by nothing else. Conv chains are
``merge_conv_chains``' business.

    Linear -> Linear:  W = W2 W1,  b = W2 b1 + b2                          (exact)
    1x1 conv -> global average pool -> flatten -> Linear:
        mean_hw(W1 x + b1) = W1 mean_hw(x) + b1, so the conv moves behind
        the pool and merges with the Linear: W = W2 W1, b = W2 b1 + b2     (exact)

Linear∘Linear is refused when it would raise the MACs per token:
in*out > in*h + h*out.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.algebra.affine import layer_refusal
from egp_export.analysis.ops import (
    is_conv_module,
    is_flatten_from_channels,
    is_global_average_pool,
    is_identity,
    is_linear_module,
    module_of,
)
from egp_export.passes.rules import Applied, Chain, Match, Op, Rule, RuleSetPass, Skip
from egp_export.records import Reason, RefusalCode, RewriteKind


def _is_linear_module(node: fx.Node, modules) -> bool:
    return is_linear_module(module_of(node, modules)) and bool(node.args) and isinstance(node.args[0], fx.Node)


def _is_conv_module(node: fx.Node, modules) -> bool:
    return is_conv_module(module_of(node, modules))


def _bias(module: nn.Module) -> torch.Tensor:
    rows = module.weight.shape[0]
    return module.bias.detach().to(torch.float64) if module.bias is not None else torch.zeros(rows, dtype=torch.float64)


def _merged_linear(a: nn.Linear, b: nn.Linear) -> nn.Linear:
    # W = W2 W1, b = W2 b1 + b2
    w1, w2 = a.weight.detach().to(torch.float64), b.weight.detach().to(torch.float64)
    merged = nn.Linear(a.in_features, b.out_features, bias=True, dtype=a.weight.dtype, device=a.weight.device)
    with torch.no_grad():
        merged.weight.copy_(w2 @ w1)
        merged.bias.copy_(w2 @ _bias(a) + _bias(b))
    return merged


def _replace_module(match: Match, node: fx.Node, module: nn.Module) -> None:
    old = match.modules[str(node.target)]
    match.gm.add_submodule(str(node.target), module.train(old.training))
    match.modules[str(node.target)] = module


# Linear -> (identities) -> Linear ---------------------------------------------


def _linear_pair_refusal(match: Match) -> Reason | None:
    reason = layer_refusal(match["first"], match.gm, match.modules) or layer_refusal(match["second"], match.gm, match.modules)
    if reason is not None:
        return reason
    a, b = match.modules[str(match["first"].target)], match.modules[str(match["second"].target)]
    before = a.in_features * a.out_features + b.in_features * b.out_features
    after = a.in_features * b.out_features
    if after > before:
        return Reason(RefusalCode.MACS_GROW, {"before": before, "after": after, "hidden": a.out_features})
    return None


def _merge_linear_pair(match: Match) -> Applied:
    first, second = match["first"], match["second"]
    a, b = match.modules[str(first.target)], match.modules[str(second.target)]
    _replace_module(match, first, _merged_linear(a, b))
    if "tensor_meta" in second.meta:
        first.meta["tensor_meta"] = second.meta["tensor_meta"]
    detail = {"rule": "linear->linear", "into": str(first.target), "absorbed": str(second.target)}
    return Applied(RewriteKind.LINEAR_MERGED, detail, first)


# 1x1 conv -> global average pool -> flatten -> (identities) -> Linear ------------


def _is_plain_pointwise(conv: nn.Module) -> bool:
    return (
        conv.groups == 1
        and all(k == 1 for k in conv.kernel_size)
        and all(st == 1 for st in conv.stride)
        and (conv.padding == "valid" or conv.padding == "same" or all(p == 0 for p in conv.padding))
    )


def _pooled_head_refusal(match: Match) -> Reason | None:
    reason = layer_refusal(match["conv"], match.gm, match.modules) or layer_refusal(match["linear"], match.gm, match.modules)
    if reason is not None:
        return reason
    if not _is_plain_pointwise(match.modules[str(match["conv"].target)]):
        return Reason(RefusalCode.NOT_PLAIN_POINTWISE)
    return None


def _merge_pooled_head(match: Match) -> Applied:
    # mean_hw(W1 x + b1) = W1 mean_hw(x) + b1: the conv moves behind the pool as a Linear, then W = W2 W1, b = W2 b1 + b2
    conv_node, linear_node = match["conv"], match["linear"]
    conv, linear = match.modules[str(conv_node.target)], match.modules[str(linear_node.target)]
    as_linear = nn.Linear(conv.in_channels, conv.out_channels, dtype=conv.weight.dtype)
    with torch.no_grad():
        as_linear.weight.copy_(conv.weight.detach().flatten(1))
        as_linear.bias.copy_(_bias(conv).to(conv.weight.dtype))
    _replace_module(match, linear_node, _merged_linear(as_linear, linear))
    match["pool"].replace_input_with(conv_node, conv_node.args[0])
    return Applied(RewriteKind.POOLED_HEAD_MERGED, {"conv": str(conv_node.target), "linear": str(linear_node.target)})


LINEAR_PAIR = Chain(Op(_is_linear_module, "first"), Skip(is_identity, "between"), Op(_is_linear_module, "second"))
POOLED_HEAD = Chain(
    Op(_is_conv_module, "conv"),
    Op(is_global_average_pool, "pool"),
    Op(is_flatten_from_channels, "flatten"),
    Skip(is_identity, "between"),
    Op(_is_linear_module, "linear"),
)

MERGE_RULES: tuple[Rule, ...] = (
    Rule("linear->linear", LINEAR_PAIR, _linear_pair_refusal, _merge_linear_pair),
    Rule("pooled_head", POOLED_HEAD, _pooled_head_refusal, _merge_pooled_head),
)


class MergeLinearChains(RuleSetPass):
    name = "merge_linear_chains"
    rules = MERGE_RULES

    def attempt(self, rule: Rule, match: Match) -> dict:
        if rule.name == "pooled_head":
            return {"what": "pooled_head", "conv": match["conv"].name, "linear": match["linear"].name}
        return {"what": "linear_merge", "rule": rule.name, "first": match["first"].name, "second": match["second"].name}
