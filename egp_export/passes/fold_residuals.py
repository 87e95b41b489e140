"""Fold a residual add into the conv of its branch: x + conv(x) = conv'(x) (exact).

When the branch f of ``y = x + f(x)`` is one conv (what ``merge_conv_chains``
leaves of a linear inverted residual or a linear block) with stride 1, as
many outputs as inputs and a centred odd kernel, the identity is one more tap:

    y[o] = x[o] + sum_{c,t} W[o, c, t] x[c, p + t - P] + b[o]
         = sum_{c,t} W'[o, c, t] ...,   W' = W + delta(c = o) delta(t = centre)

The centre tap of a centred stride-1 conv reads x at the output position
itself, never padding, so this holds at the border too. A constant bias map
after the conv (from an exact bias-map merge) stays where it is:
x + (conv(x) + m) = conv'(x) + m.

A square linear layer is the same with no taps (a transformer MLP whose
activation became the identity, once its two linears merged):

    x + (W x + b) = (W + I) x + b
"""

from __future__ import annotations

import torch
import torch.fx as fx

from egp_export.algebra.convchain import explicit_padding
from egp_export.analysis.fx import shape_of, sharing_refusal
from egp_export.analysis.ops import is_conv_module, is_linear_module, module_of
from egp_export.passes.base import Fact
from egp_export.passes.modules import ConstantAdd
from egp_export.passes.rules import Add, Applied, Chain, Either, Match, Op, Rule, RuleSetPass
from egp_export.records import Reason, RefusalCode, RewriteKind


def _is_conv_module(node: fx.Node, modules) -> bool:
    return is_conv_module(module_of(node, modules))


def _is_bias_map(node: fx.Node, modules) -> bool:
    return isinstance(module_of(node, modules), ConstantAdd)


def _is_linear_module(node: fx.Node, modules) -> bool:
    return is_linear_module(module_of(node, modules))


# x + conv(x), or x + bias_map(conv(x)): the conv reads the add's other operand.
RESIDUAL = Add(Either(Chain(Op(_is_conv_module, "conv"), Op(_is_bias_map, "bias_map")), Chain(Op(_is_conv_module, "conv"))))
# x + linear(x)
LINEAR_RESIDUAL = Add(Chain(Op(_is_linear_module, "linear")))


def _refusal(match: Match) -> Reason | None:
    conv = match["conv"]
    module = match.modules[str(conv.target)]
    shared = sharing_refusal(match.gm, str(conv.target))
    if shared is not None:
        return shared
    if shape_of(conv) is None or shape_of(conv) != shape_of(conv.args[0]):
        return Reason(RefusalCode.SHAPE_CHANGES)
    if any(s != 1 for s in module.stride):
        return Reason(RefusalCode.STRIDED)
    if module.groups not in (1, module.in_channels):
        return Reason(RefusalCode.GROUPED)
    try:
        padding = explicit_padding(module)
    except ValueError as error:
        return Reason(RefusalCode.PADDING_UNSUPPORTED, {"why": str(error)})
    for k, d, p in zip(module.kernel_size, module.dilation, padding):
        if k % 2 == 0 or p != d * (k - 1) // 2:
            return Reason(RefusalCode.NOT_CENTRED)
    return None


def _fold(match: Match) -> Applied:
    conv = match["conv"]
    module = match.modules[str(conv.target)]
    # W' = W + delta(c = o) delta(t = centre)
    centre = tuple(k // 2 for k in module.kernel_size)
    with torch.no_grad():
        for channel in range(module.out_channels):
            column = 0 if module.groups > 1 else channel
            module.weight[(channel, column) + centre] += 1.0
    output = match.captures.get("bias_map", conv)
    return Applied(RewriteKind.RESIDUAL_FOLDED, {"conv": str(conv.target)}, output, absorbed_by=(conv,))


def _linear_refusal(match: Match) -> Reason | None:
    linear = match["linear"]
    shared = sharing_refusal(match.gm, str(linear.target))
    if shared is not None:
        return shared
    module = match.modules[str(linear.target)]
    if module.in_features != module.out_features or shape_of(linear) is None or shape_of(linear) != shape_of(linear.args[0]):
        return Reason(RefusalCode.SHAPE_CHANGES)
    return None


def _fold_linear(match: Match) -> Applied:
    linear = match["linear"]
    module = match.modules[str(linear.target)]
    with torch.no_grad():  # W' = W + I
        module.weight += torch.eye(module.in_features, dtype=module.weight.dtype, device=module.weight.device)
    return Applied(RewriteKind.RESIDUAL_FOLDED, {"linear": str(linear.target)}, linear, absorbed_by=(linear,))


class FoldResiduals(RuleSetPass):
    name = "fold_residuals"
    requires = frozenset({Fact.SHAPES})
    rules = (Rule("residual", RESIDUAL, _refusal, _fold), Rule("linear_residual", LINEAR_RESIDUAL, _linear_refusal, _fold_linear))

    def attempt(self, rule: Rule, match: Match) -> dict:
        if rule.name == "linear_residual":
            return {"what": "residual", "linear": match["linear"].name}
        return {"what": "residual", "conv": match["conv"].name}
