"""torch.fx graph-rewriting passes (one per module) and the default pipeline."""

from __future__ import annotations

from .base import GraphPass, PassManager, PassResult, PipelineResult, Refusal, Rewrite, Step, finalize
from .eliminate_dead_channels import EliminateDeadChannels
from .fold_batchnorm import FoldBatchNorm
from .fold_channel_affine import FoldChannelAffine
from .linearize_activations import LinearizeActivations
from .merge_linear_chains import MERGE_RULES, MergeLinearChains, MergeRule


def default_steps(tolerance: float) -> list[Step]:
    """The compiler's pipeline: once-steps first, then the folding/merging loop to a fixed point."""
    return [
        Step("fold_batchnorm", FoldBatchNorm, fixed_point=False),
        Step("linearize_activations", lambda: LinearizeActivations(tolerance), fixed_point=False),
        Step("fold_channel_affine", FoldChannelAffine),
        Step("eliminate_dead_channels", EliminateDeadChannels),
        Step("merge_linear_chains", MergeLinearChains),
    ]


__all__ = [
    "MERGE_RULES",
    "EliminateDeadChannels",
    "FoldBatchNorm",
    "FoldChannelAffine",
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
    "default_steps",
    "finalize",
]
