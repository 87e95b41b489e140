"""Remove ops that are the identity in eval mode: Dropout, Identity, stochastic depth.

They sit between layers that could otherwise fold or merge (torchvision's
MLP blocks put Dropout between their Linears; EfficientNet and ConvNeXt put
stochastic depth in front of their residual adds). In eval mode each returns
its input unchanged, so every use of the op becomes a use of its input.
Functional calls count only when their ``training`` argument is literally
False (``F.dropout(x, p, training=self.training)`` traced in eval mode).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from egp_export.analysis.ops import is_identity, named_modules
from egp_export.passes.base import GraphPass

# Functional forms and the position of their ``training`` argument.
_TRAINING_ARGUMENT = {F.dropout: (2, True), F.dropout1d: (2, True), F.dropout2d: (2, True), F.alpha_dropout: (2, False)}


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:  # torchvision is a dependency, but the pass does not need it
        return None
    return stochastic_depth


class EliminateEvalIdentities(GraphPass):
    name = "eliminate_eval_identities"

    def run(self, gm: fx.GraphModule) -> None:
        modules = named_modules(gm)
        training_position = dict(_TRAINING_ARGUMENT)
        stochastic_depth = _stochastic_depth()
        if stochastic_depth is not None:
            training_position[stochastic_depth] = (3, True)
        for node in list(gm.graph.nodes):
            if not node.args or not isinstance(node.args[0], fx.Node):
                continue
            if is_identity(node, modules):
                what = type(modules[str(node.target)]).__name__
            elif node.op == "call_function" and node.target in training_position:
                position, default = training_position[node.target]
                training = node.args[position] if len(node.args) > position else node.kwargs.get("training", default)
                if training is not False:
                    continue
                what = getattr(node.target, "__name__", str(node.target))
            else:
                continue
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            self.rewrote([node.name], f"{what} is the identity in eval mode: removed")

