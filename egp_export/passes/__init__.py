"""torch.fx graph-rewriting passes (one per module) and the default pipeline."""

from __future__ import annotations

from egp_export.passes.base import GraphPass, PassManager, PassResult, PipelineResult, Refusal, Rewrite, Step, finalize
from egp_export.passes.eliminate_dead_channels import CHANNEL_ALIGNMENT, EliminateDeadChannels
from egp_export.passes.eliminate_eval_identities import EliminateEvalIdentities
from egp_export.passes.fold_batchnorm import FoldBatchNorm
from egp_export.passes.fold_channel_affine import FoldChannelAffine
from egp_export.passes.fold_residuals import FoldResiduals
from egp_export.passes.linearize_activations import LinearizeActivations
from egp_export.passes.merge_conv_chains import MergeConvChains, conv_seconds
from egp_export.passes.merge_linear_chains import MERGE_RULES, MergeLinearChains, MergeRule


def default_steps(
    tolerance: float, *, approximate: bool = False, cost=None, plan: str = "cost", channel_alignment: int = CHANNEL_ALIGNMENT
) -> list[Step]:
    """The compiler's pipeline: once-steps first, then the folding/merging loop to a fixed point.

    ``approximate`` allows border-approximate conv merges; ``cost`` is the
    merge planner's cost model (analytic by default); ``plan="all"`` merges
    every conv chain whole (the Layer-Folding baseline); ``channel_alignment``
    rounds the channel counts dead-channel removal leaves up to a multiple.
    """
    return [
        Step("eliminate_eval_identities", EliminateEvalIdentities, fixed_point=False),
        Step("fold_batchnorm", FoldBatchNorm, fixed_point=False),
        Step("linearize_activations", lambda: LinearizeActivations(tolerance), fixed_point=False),
        Step("fold_channel_affine", FoldChannelAffine),
        Step("eliminate_dead_channels", lambda: EliminateDeadChannels(channel_alignment)),
        Step("merge_linear_chains", MergeLinearChains),
        Step("merge_conv_chains", lambda: MergeConvChains(approximate=approximate, cost=cost, plan=plan)),
        Step("fold_residuals", FoldResiduals),
    ]


__all__ = [
    "CHANNEL_ALIGNMENT",
    "MERGE_RULES",
    "EliminateDeadChannels",
    "EliminateEvalIdentities",
    "FoldBatchNorm",
    "FoldChannelAffine",
    "FoldResiduals",
    "MergeConvChains",
    "GraphPass",
    "LinearizeActivations",
    "MergeLinearChains",
    "MergeRule",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "Refusal",
    "Rewrite",
    "Step",
    "conv_seconds",
    "default_steps",
    "finalize",
]
