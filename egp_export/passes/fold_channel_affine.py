"""Fold per-neuron affine maps (from BatchNorm or linearized activations) into neighbouring layers.

For every ChannelAffine ``y = a x + c``:
1. identity (a = 1, c = 0): removed;
2. else into the producing conv/linear when it feeds only this map
   (W' = a W, b' = a b + c; exact with any padding);
3. else into every consuming conv/linear (W' = W a, b' = b + W c), which is
   exact unless c != 0 and a consumer zero-pads (the border sees 0, not c).
What cannot fold stays a Mul + Add, with the reasons recorded.
"""

from __future__ import annotations

import torch.fx as fx

from egp_export.algebra.affine import consumer_refusal, fold_into_consumer, fold_into_producer, producer_refusal
from egp_export.analysis.fx import shape_of
from egp_export.analysis.ops import named_modules
from egp_export.passes.base import GraphPass
from egp_export.passes.modules import ChannelAffine


class FoldChannelAffine(GraphPass):
    name = "fold_channel_affine"

    def run(self, gm: fx.GraphModule) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            affine = modules.get(str(node.target)) if node.op == "call_module" else None
            if not isinstance(affine, ChannelAffine):
                continue
            source = node.args[0]
            if affine.is_identity:
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                self.rewrote([node.name], "identity map removed")
                continue
            shape = shape_of(node)
            rank = len(shape) if shape is not None else None
            backward = producer_refusal(source, affine.dim, rank, gm, modules)
            if backward is None:
                fold_into_producer(modules[str(source.target)], affine.scale, affine.shift)
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                self.rewrote([node.name, source.name], f"affine map folded into '{source.target}'")
                continue
            has_shift = bool((affine.shift != 0).any())
            consumers = list(node.users)
            reasons = [consumer_refusal(u, node, affine.dim, rank, has_shift, gm, modules) for u in consumers]
            forward = next((r for r in reasons if r), None)
            if forward is None and consumers:
                for user in consumers:
                    fold_into_consumer(modules[str(user.target)], affine.scale, affine.shift)
                node.replace_all_uses_with(source)
                gm.graph.erase_node(node)
                targets = ", ".join(f"'{u.target}'" for u in consumers)
                self.rewrote([node.name] + [u.name for u in consumers], f"affine map folded into {targets}")
                continue
            self.refuse(node, f"cannot fold backwards ({backward}) or forwards ({forward or 'no consumers'})")
