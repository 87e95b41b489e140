"""Fold eval-mode BatchNorm into the preceding conv/linear (exact).

In eval mode BatchNorm is a per-channel affine map:
    y = gamma (x - mean) / sqrt(var + eps) + beta = a x + c,
    a = gamma / sqrt(var + eps),  c = beta - a mean.
Where the producer is a conv/linear that only feeds this BatchNorm, the map
folds into it (W' = a W, b' = a b + c). Otherwise the BatchNorm becomes a
ChannelAffine, which ``fold_channel_affine`` may still push into the next
layer; the refusal to fold backwards is recorded.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from egp_export.algebra.affine import fold_into_producer, producer_refusal
from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import BATCHNORM_TYPES, module_of, named_modules
from egp_export.passes.base import GraphPass
from egp_export.passes.modules import ChannelAffine


def batchnorm_affine(module) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, c) of an eval-mode BatchNorm: y = a x + c per channel."""
    mean = module.running_mean.to(torch.float64)
    var = module.running_var.to(torch.float64)
    gamma = module.weight.detach().to(torch.float64) if module.weight is not None else torch.ones_like(mean)
    beta = module.bias.detach().to(torch.float64) if module.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + module.eps)
    return a, beta - a * mean


class FoldBatchNorm(GraphPass):
    name = "fold_batchnorm"

    def run(self, gm: fx.GraphModule) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            module = module_of(node, modules)
            if not isinstance(module, BATCHNORM_TYPES):
                continue
            if module.running_mean is None or module.running_var is None:
                self.refuse(node, "BatchNorm without running statistics uses batch statistics even in eval mode")
                continue
            scale, shift = batchnorm_affine(module)
            source = node.args[0]
            shape = shape_of(node)
            rank = len(shape) if shape is not None else None
            reason = producer_refusal(source, 1, rank, gm, modules)
            if reason is None:
                fold_into_producer(modules[str(source.target)], scale, shift)
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                self.rewrote([node.name, source.name], f"BatchNorm '{node.target}' folded into '{source.target}'")
                continue
            affine = insert_module_call(gm, node, f"{node.target}_affine", ChannelAffine(scale, shift, 1), (source,), like=node)
            node.replace_all_uses_with(affine)
            gm.graph.erase_node(node)
            self.refuse(node, f"not folded backwards ({reason}); kept as a per-channel affine map")
            self.rewrote([node.name], f"BatchNorm '{node.target}' became a per-channel affine map")
