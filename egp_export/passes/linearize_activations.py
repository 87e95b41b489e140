"""Replace activation call sites that are linear on the calibration data by per-neuron affine maps.

A site whose every neuron stayed in one linear region (ReLU ON/OFF, ReLU6
saturated, Hardsigmoid's middle, ...) computes ``y = slope * z + intercept``
per neuron on the data: it becomes a ChannelAffine, which
``fold_channel_affine`` then folds into a neighbouring layer. Smooth
activations (GELU, SiLU) are replaced only when their best affine fit on the
calibrated range is within the tolerance.

A site that stays nonlinear may still have dead neurons (always in a zero
region, and f(0) = 0). A 0/1 mask is put in front of the activation:
act(m z) = m act(z) on the data, and once the mask folds into the producer
its filters are zero, so ``eliminate_dead_channels`` can remove them. The
mask is only inserted where it can fold (the producer is a conv/linear that
feeds only this site): a mask left standing would cost a Mul and save nothing.

Inplace activations whose input is read by other nodes are left alone: those
nodes see the activated tensor in the original model.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from egp_export.algebra.affine import producer_refusal
from egp_export.analysis.fx import insert_module_call, shape_of
from egp_export.analysis.ops import named_modules
from egp_export.analysis.provenance import absorb
from egp_export.analysis.stats import site_stats
from egp_export.passes.base import Fact, GraphPass, Recorder
from egp_export.passes.modules import ChannelAffine, weight_dtype
from egp_export.records import Reason, RefusalCode, RewriteKind


def _counts(scale: torch.Tensor, shift: torch.Tensor) -> dict[str, int]:
    identity = int(((scale == 1) & (shift == 0)).sum())
    zero = int(((scale == 0) & (shift == 0)).sum())
    return {"identity": identity, "zero": zero, "affine": scale.numel() - identity - zero}


class LinearizeActivations(GraphPass):
    name = "linearize_activations"
    requires = frozenset({Fact.CALIBRATED_SITES, Fact.SHAPES})

    def __init__(self, tolerance: float = 1e-5) -> None:
        self.tolerance = tolerance

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            stats = site_stats(node)
            if stats is None or node.op not in ("call_module", "call_function", "call_method"):
                continue
            source = node.args[0]
            if stats.spec.inplace and len(source.users) > 1:
                detail = {"activation": stats.spec.kind, "input": source.name}
                record.refuse(node, Reason(RefusalCode.INPLACE_INPUT_READ, detail))
                continue
            linear = stats.linear_map(self.tolerance)
            if linear.ok:
                affine = ChannelAffine(linear.scale, linear.shift, stats.dim, weight_dtype(gm))
                replacement = insert_module_call(gm, node, f"{node.name}_linear", affine, (source,), like=node)
                absorb(replacement, [node], RewriteKind.LINEARIZED)
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
                detail = {"activation": stats.spec.kind, **_counts(linear.scale, linear.shift)}
                if stats.spec.smooth:
                    detail["surrogate_error"] = linear.max_error
                record.rewrote(RewriteKind.LINEARIZED, [node.name], **detail)
                continue
            record.refuse(node, linear.refusal)
            dead = stats.dead_neurons()
            if not dead.any():
                continue
            shape = shape_of(source)
            blocked = producer_refusal(source, stats.dim, len(shape) if shape else None, gm, modules)
            if blocked:
                record.refuse(node, Reason(RefusalCode.DEAD_NEURONS_KEPT, {"dead": int(dead.sum()), "because": blocked}))
            else:
                mask = (~dead).to(torch.float64)
                masker = ChannelAffine(mask, torch.zeros_like(mask), stats.dim, weight_dtype(gm))
                masked = insert_module_call(gm, node, f"{node.name}_dead_mask", masker, (source,), like=source)
                absorb(masked, [node], RewriteKind.DEAD_MASKED)
                node.replace_input_with(source, masked)
                record.rewrote(RewriteKind.DEAD_MASKED, [node.name], dead=int(dead.sum()), activation=stats.spec.kind)
