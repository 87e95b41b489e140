"""Fold eval-mode BatchNorm into the preceding conv/linear (exact).

In eval mode BatchNorm is a per-channel affine map:
    y = gamma (x - mean) / sqrt(var + eps) + beta = a x + c,
    a = gamma / sqrt(var + eps),  c = beta - a mean.
Where the producer is a conv/linear that only feeds this BatchNorm, the map
folds into it (W' = a W, b' = a b + c). Otherwise the BatchNorm becomes a
ChannelAffine, which ``fold_channel_affine`` may still push into the next
layer; the reason it did not fold backwards is recorded. Functional
``F.batch_norm`` calls with constant statistics are modules by now
(``bind_functional_layers``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from egp_export.algebra.affine import fold_into_producer, producer_refusal
from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import is_batchnorm_module, module_of
from egp_export.passes.base import Fact
from egp_export.passes.modules import ChannelAffine, weight_dtype
from egp_export.passes.rules import Applied, Match, Op, Rule, RuleSetPass
from egp_export.records import Reason, RefusalCode, RewriteKind


def batchnorm_affine(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) of an eval-mode BatchNorm: y = a x + c per channel."""
    mean = module.running_mean.to(torch.float64)
    var = module.running_var.to(torch.float64)
    gamma = module.weight.detach().to(torch.float64) if module.weight is not None else torch.ones_like(mean)
    beta = module.bias.detach().to(torch.float64) if module.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + module.eps)
    return a, beta - a * mean


def _is_batchnorm_module(node: fx.Node, modules) -> bool:
    return is_batchnorm_module(module_of(node, modules)) and bool(node.args) and isinstance(node.args[0], fx.Node)


def _has_running_stats(match: Match) -> Reason | None:
    module = match.modules[str(match["bn"].target)]
    if module.running_mean is None or module.running_var is None:
        return Reason(RefusalCode.NO_RUNNING_STATS)
    return None


def _fold(match: Match) -> Applied:
    bn, gm, modules = match["bn"], match.gm, match.modules
    scale, shift = batchnorm_affine(modules[str(bn.target)])
    source = bn.args[0]
    shape = shape_of(bn)
    blocked = producer_refusal(source, 1, len(shape) if shape is not None else None, gm, modules)
    if blocked is None:
        # W' = a W, b' = a b + c
        fold_into_producer(modules[str(source.target)], scale, shift)
        return Applied(RewriteKind.BN_FOLDED, {"batchnorm": str(bn.target), "layer": str(source.target)}, source)
    as_affine = ChannelAffine(scale, shift, 1, weight_dtype(gm))
    affine = insert_module_call(gm, bn, f"{bn.target}_affine", as_affine, (source,), like=bn)
    return Applied(
        RewriteKind.BN_TO_AFFINE,
        {"batchnorm": str(bn.target)},
        affine,
        kept=Reason(RefusalCode.BN_NOT_FOLDED_BACKWARDS, {"because": blocked}),
    )


class FoldBatchNorm(RuleSetPass):
    name = "fold_batchnorm"
    requires = frozenset({Fact.SHAPES})
    rules = (Rule("batchnorm", Op(_is_batchnorm_module, "bn"), _has_running_stats, _fold),)
