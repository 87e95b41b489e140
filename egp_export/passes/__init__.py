"""torch.fx graph-rewriting passes (one per module) and the default pipeline."""

from __future__ import annotations

from egp_export.passes.base import Fact, FixedPoint, GraphPass, PassManager, PassResult, PipelineResult, Recorder, Step, finalize
from egp_export.passes.bind_functional_layers import BindFunctionalLayers
from egp_export.passes.eliminate_dead_channels import CHANNEL_ALIGNMENT, EliminateDeadChannels
from egp_export.passes.eliminate_eval_identities import EliminateEvalIdentities
from egp_export.passes.fold_batchnorm import FoldBatchNorm
from egp_export.passes.fold_channel_affine import FoldChannelAffine
from egp_export.passes.fold_residuals import FoldResiduals
from egp_export.passes.linearize_activations import LinearizeActivations
from egp_export.passes.merge_conv_chains import MergeConvChains, conv_seconds
from egp_export.passes.merge_linear_chains import MERGE_RULES, MergeLinearChains
from egp_export.passes.rules import Rule, RuleSetPass
from egp_export.records import Reason, Refusal, RefusalCode, Rewrite, RewriteKind

# Rounds of the folding/merging loop, and iterations of each pass inside one round.
LOOP_ROUNDS = 3
PASS_ITERATIONS = 8


def folding_loop(steps: list[GraphPass]) -> FixedPoint:
    """Each pass to its own fixed point, the whole list again until a round changes nothing."""
    return FixedPoint([FixedPoint([step], cap=PASS_ITERATIONS) for step in steps], cap=LOOP_ROUNDS)


def default_steps(
    *,
    approximate: bool = False,
    cost=None,
    plan: str = "cost",
    channel_alignment: int = CHANNEL_ALIGNMENT,
    conv_merging: bool = True,
) -> list[Step]:
    """The compiler's pipeline, run in this order: canonicalise, fold BN, linearize, then fold/merge to a fixed point.

    Which sites are linearized or masked is their plans' decision
    (analysis/plans.py, stored on the nodes before the pipeline runs): no
    step reads the tolerance. ``approximate`` allows border-approximate conv
    merges; ``cost`` is the merge planner's cost model (analytic by default);
    ``plan="all"`` merges every conv chain whole (the Layer-Folding baseline); ``channel_alignment``
    rounds the channel counts dead-channel removal leaves up to a multiple;
    ``conv_merging=False`` leaves conv chains and residuals as they are (the
    padding plan inspects the chains that are left).
    """
    merging = [MergeConvChains(approximate=approximate, cost=cost, plan=plan), FoldResiduals()] if conv_merging else []
    return [
        BindFunctionalLayers(),
        EliminateEvalIdentities(),
        FoldBatchNorm(),
        LinearizeActivations(),
        folding_loop(
            [
                FoldChannelAffine(),
                EliminateDeadChannels(channel_alignment),
                MergeLinearChains(),
                *merging,
            ]
        ),
    ]


__all__ = [
    "CHANNEL_ALIGNMENT",
    "LOOP_ROUNDS",
    "MERGE_RULES",
    "PASS_ITERATIONS",
    "BindFunctionalLayers",
    "EliminateDeadChannels",
    "EliminateEvalIdentities",
    "Fact",
    "FixedPoint",
    "FoldBatchNorm",
    "FoldChannelAffine",
    "FoldResiduals",
    "GraphPass",
    "LinearizeActivations",
    "MergeConvChains",
    "MergeLinearChains",
    "PassManager",
    "PassResult",
    "PipelineResult",
    "Reason",
    "Recorder",
    "Refusal",
    "RefusalCode",
    "Rewrite",
    "RewriteKind",
    "Rule",
    "RuleSetPass",
    "Step",
    "conv_seconds",
    "default_steps",
    "finalize",
    "folding_loop",
]
