"""Fold per-neuron affine maps (from BatchNorm or linearized activations) into neighbouring layers.

For every ChannelAffine ``y = a x + c``, the first rule that applies:
1. identity (a = 1, c = 0): removed;
2. into the producing conv/linear when it feeds only this map
   (W' = a W, b' = a b + c; exact with any padding);
3. into every consuming conv/linear (W' = W a, b' = b + W c), which is
   exact unless c != 0 and a consumer zero-pads (the border sees 0, not c).
What cannot fold stays a Mul + Add, with both directions' reasons recorded.
"""

from __future__ import annotations

import torch.fx as fx

from egp_export.algebra.affine import consumer_refusal, fold_into_consumer, fold_into_producer, producer_refusal
from egp_export.analysis.fx import shape_of
from egp_export.analysis.ops import module_of
from egp_export.passes.base import Fact
from egp_export.passes.modules import ChannelAffine
from egp_export.passes.rules import Applied, Match, Op, Rule, RuleSetPass, no_check
from egp_export.records import Reason, RefusalCode, RewriteKind


def _is_affine(node: fx.Node, modules) -> bool:
    return isinstance(module_of(node, modules), ChannelAffine)


def _is_identity_affine(node: fx.Node, modules) -> bool:
    return _is_affine(node, modules) and module_of(node, modules).is_identity


def _parts(match: Match):
    node = match["affine"]
    shape = shape_of(node)
    return node, match.modules[str(node.target)], node.args[0], len(shape) if shape is not None else None


def _remove_identity(match: Match) -> Applied:
    # 1 x + 0 = x
    return Applied(RewriteKind.AFFINE_REMOVED, {}, match["affine"].args[0])


def _backward_refusal(match: Match) -> Reason | None:
    node, affine, source, rank = _parts(match)
    return producer_refusal(source, affine.dim, rank, match.gm, match.modules)


def _forward_refusal(match: Match) -> Reason | None:
    node, affine, source, rank = _parts(match)
    consumers = list(node.users)
    if not consumers:
        return Reason(RefusalCode.NO_CONSUMERS)
    has_shift = bool((affine.shift != 0).any())
    for user in consumers:
        reason = consumer_refusal(user, node, affine.dim, rank, has_shift, match.gm, match.modules)
        if reason is not None:
            return reason
    return None


def _either_refusal(match: Match) -> Reason | None:
    backward = _backward_refusal(match)
    if backward is None:
        return None
    forward = _forward_refusal(match)
    if forward is None:
        return None
    return Reason(RefusalCode.AFFINE_NOT_FOLDABLE, {"backward": backward, "forward": forward})


def _fold(match: Match) -> Applied:
    node, affine, source, _ = _parts(match)
    if _backward_refusal(match) is None:
        # a (W x + b) + c = (a W) x + (a b + c)
        fold_into_producer(match.modules[str(source.target)], affine.scale, affine.shift)
        return Applied(RewriteKind.AFFINE_FOLDED, {"into": [str(source.target)]}, source)
    # W (a x + c) + b = (W a) x + (W c + b), for every consumer
    consumers = list(node.users)
    for user in consumers:
        fold_into_consumer(match.modules[str(user.target)], affine.scale, affine.shift)
    return Applied(RewriteKind.AFFINE_FOLDED, {"into": [str(u.target) for u in consumers]}, source, absorbed_by=tuple(consumers))


class FoldChannelAffine(RuleSetPass):
    name = "fold_channel_affine"
    requires = frozenset({Fact.SHAPES})
    rules = (
        Rule("identity_affine", Op(_is_identity_affine, "affine"), no_check, _remove_identity),
        Rule("fold_affine", Op(_is_affine, "affine"), _either_refusal, _fold),
    )
