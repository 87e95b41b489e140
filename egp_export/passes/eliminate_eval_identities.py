"""Remove ops that are the identity in eval mode: Dropout, Identity, stochastic depth.

They sit between layers that could otherwise fold or merge (torchvision's
MLP blocks put Dropout between their Linears; EfficientNet and ConvNeXt put
stochastic depth in front of their residual adds). In eval mode each returns
its input unchanged, so every use of the op becomes a use of its input.
Functional calls count only when their ``training`` argument is literally
False (``F.dropout(x, p, training=self.training)`` traced in eval mode); the
op vocabulary (``analysis/ops.py: is_identity``) decides.
"""

from __future__ import annotations

import torch.fx as fx

from egp_export.analysis.ops import identity_name, is_identity
from egp_export.passes.rules import Applied, Match, Op, Rule, RuleSetPass, no_check
from egp_export.records import RewriteKind


def _identity_of_a_tensor(node: fx.Node, modules) -> bool:
    return is_identity(node, modules) and bool(node.args) and isinstance(node.args[0], fx.Node)


def _remove(match: Match) -> Applied:
    # identity(x) = x
    op = match["op"]
    return Applied(RewriteKind.IDENTITY_REMOVED, {"op": identity_name(op, match.modules)}, replacement=op.args[0])


class EliminateEvalIdentities(RuleSetPass):
    name = "eliminate_eval_identities"
    rules = (Rule("eval_identity", Op(_identity_of_a_tensor, "op"), no_check, _remove),)
