"""Apply the per-site plans (analysis/plans.py): linearized sites become per-neuron affine maps, dead neurons masked.

The pass decides nothing: the compiler's decide stage stored a ``SitePlan``
on each activation node. A LINEARIZE plan (every neuron stayed in one linear
region: ReLU ON/OFF, ReLU6 saturated, Hardsigmoid's middle, ...; or a smooth
activation's affine fit within the tolerance) makes the site
``y = slope * z + shift`` per neuron: a ChannelAffine, which
``fold_channel_affine`` then folds into a neighbouring layer.

A MASK_DEAD plan keeps the activation but masks its dead neurons (always in a
zero region, and f(0) = 0). A 0/1 mask is put in front of the activation:
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
from egp_export.analysis.plans import SiteAction, site_plan
from egp_export.analysis.provenance import absorb
from egp_export.analysis.stats import site_stats
from egp_export.errors import PassError
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

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            plan = site_plan(node)
            if plan is None and site_stats(node) is not None:
                raise PassError(
                    f"pass '{self.name}' found calibrated site '{node.name}' without a plan: decide first "
                    "(analysis.plans.plan_site and store_plans; compile's decide stage does both)."
                )
            if plan is None or node.op not in ("call_module", "call_function", "call_method"):
                continue
            source = node.args[0]
            if plan.spec.inplace and len(source.users) > 1:
                detail = {"activation": plan.spec.kind, "input": source.name}
                record.refuse(node, Reason(RefusalCode.INPLACE_INPUT_READ, detail))
                continue
            if plan.action is SiteAction.LINEARIZE:
                slope, shift = plan.slope_tensor(), plan.shift_tensor()
                affine = ChannelAffine(slope, shift, plan.dim, weight_dtype(gm))
                replacement = insert_module_call(gm, node, f"{node.name}_linear", affine, (source,), like=node)
                absorb(replacement, [node], RewriteKind.LINEARIZED)
                node.replace_all_uses_with(replacement)
                gm.graph.erase_node(node)
                detail = {"activation": plan.spec.kind, **_counts(slope, shift)}
                if plan.spec.smooth:
                    detail["surrogate_error"] = plan.surrogate_error
                record.rewrote(RewriteKind.LINEARIZED, [node.name], **detail)
                continue
            record.refuse(node, plan.refusal)
            if plan.action is not SiteAction.MASK_DEAD:
                continue
            dead = plan.dead_mask()
            shape = shape_of(source)
            blocked = producer_refusal(source, plan.dim, len(shape) if shape else None, gm, modules)
            if blocked:
                record.refuse(node, Reason(RefusalCode.DEAD_NEURONS_KEPT, {"dead": int(dead.sum()), "because": blocked}))
            else:
                mask = (~dead).to(torch.float64)
                masker = ChannelAffine(mask, torch.zeros_like(mask), plan.dim, weight_dtype(gm))
                masked = insert_module_call(gm, node, f"{node.name}_dead_mask", masker, (source,), like=source)
                absorb(masked, [node], RewriteKind.DEAD_MASKED)
                node.replace_input_with(source, masked)
                record.rewrote(RewriteKind.DEAD_MASKED, [node.name], dead=int(dead.sum()), activation=plan.spec.kind)
