"""What a rewrite pass did and why it refused: typed records, never prose.

A pass records a ``Rewrite`` (a ``RewriteKind`` and a ``detail`` dict of
numbers and names) for every change, and a ``Refusal`` (a ``RefusalCode`` and
its detail) for every candidate it left alone. Checks return a ``Reason`` or
None. Counting and filtering read kinds and codes; the sentences a person
reads are written in one place, ``egp_export.report.messages``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class RewriteKind(enum.Enum):
    FUNCTIONAL_LAYER_BOUND = "functional_layer_bound"  # F.conv2d(x, const W) -> a Conv2d module
    IDENTITY_REMOVED = "identity_removed"  # Dropout/Identity/stochastic depth in eval mode
    BN_FOLDED = "bn_folded"  # BatchNorm folded into the layer before it
    BN_TO_AFFINE = "bn_to_affine"  # BatchNorm kept as a per-channel affine map
    LINEARIZED = "linearized"  # activation site -> per-neuron affine map
    DEAD_MASKED = "dead_masked"  # dead neurons of a nonlinear site masked to zero
    AFFINE_REMOVED = "affine_removed"  # identity affine map dropped
    AFFINE_FOLDED = "affine_folded"  # affine map folded into a producer or its consumers
    CHANNELS_REMOVED = "channels_removed"
    LINEAR_MERGED = "linear_merged"  # Linear o Linear
    POOLED_HEAD_MERGED = "pooled_head_merged"  # 1x1 conv -> GAP -> flatten -> Linear
    MERGED_EXACT = "merged_exact"
    MERGED_BIAS_MAP = "merged_bias_map"
    MERGED_BORDER_APPROXIMATE = "merged_border_approximate"
    RESIDUAL_FOLDED = "residual_folded"
    SITE_TO_IDENTITY = "site_to_identity"  # EASIER: an activation replaced by its input (changes the function)

    @property
    def is_approximate(self) -> bool:
        """Whether the rewrite changes the function beyond fp32 rounding (on purpose, within the tolerance)."""
        return self in (RewriteKind.MERGED_BORDER_APPROXIMATE, RewriteKind.SITE_TO_IDENTITY)


class RefusalCode(enum.Enum):
    # Activation sites
    NO_CALIBRATION_DATA = "no_calibration_data"
    NEURONS_CROSS_BOUNDARY = "neurons_cross_boundary"
    NONAFFINE_REGION = "nonaffine_region"
    SURROGATE_ERROR = "surrogate_error"
    INPLACE_INPUT_READ = "inplace_input_read"
    DEAD_NEURONS_KEPT = "dead_neurons_kept"
    NO_SUCH_SITE = "no_such_site"
    NOT_AN_ACTIVATION = "not_an_activation"
    # Evidence and validation (the compiler withdraws rewrites the data does not support)
    THIN_EVIDENCE = "thin_evidence"
    LEFT_REGION_ON_VALIDATION = "left_region_on_validation"
    SURROGATE_OFF_ON_VALIDATION = "surrogate_off_on_validation"
    CROSSED_UNDER_PERTURBATION = "crossed_under_perturbation"  # analysis/crossings.py found an input that moves it
    FINAL_CHECK_FAILED = "final_check_failed"
    MARGINAL_SITE_WITHDRAWN = "marginal_site_withdrawn"  # stepwise back-off, most marginal site first
    EXACT_REWRITE_WITHDRAWN = "exact_rewrite_withdrawn"  # an exact fold/merge that moved the fp32 output too far
    WITHDRAWN = "withdrawn"  # several of the above at one site
    # Folding
    NO_RUNNING_STATS = "no_running_stats"
    BN_NOT_FOLDED_BACKWARDS = "bn_not_folded_backwards"
    AFFINE_NOT_FOLDABLE = "affine_not_foldable"
    NOT_A_LAYER = "not_a_layer"
    OPAQUE_MODULE = "opaque_module"  # a layer subclass that computes something its attributes do not describe
    SHARED_WEIGHT = "shared_weight"
    SAME_MODULE = "same_module"  # one module registered under two names
    TIED_WEIGHT = "tied_weight"  # a parameter another module holds too
    MULTIPLE_USERS = "multiple_users"
    AXIS_MISMATCH = "axis_mismatch"
    PADDED_SHIFT = "padded_shift"
    NO_CONSUMERS = "no_consumers"
    # Dead channels
    ZERO_CHANNELS_IN_TIED_LAYER = "zero_channels_in_tied_layer"
    ZERO_CHANNELS_NOT_SHARED = "zero_channels_not_shared"
    ZERO_CHANNELS_BLOCKED = "zero_channels_blocked"
    CHANNELS_KEPT_FOR_ALIGNMENT = "channels_kept_for_alignment"
    # Merging
    MACS_GROW = "macs_grow"
    NOT_PLAIN_POINTWISE = "not_plain_pointwise"
    NOT_COMPOSABLE = "not_composable"
    BORDER_NOT_EXACT = "border_not_exact"
    COST_GROWS = "cost_grows"
    BETTER_SPLIT = "better_split"
    # Residuals
    SHAPE_CHANGES = "shape_changes"
    STRIDED = "strided"
    GROUPED = "grouped"
    NOT_CENTRED = "not_centred"
    PADDING_UNSUPPORTED = "padding_unsupported"


def _plain(value: Any) -> Any:
    """Detail values as JSON: enums by value, reasons as dicts, tuples as lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Reason):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Reason:
    """Why a check refused: a code and the numbers and names behind it."""

    code: RefusalCode
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"code": self.code.value, "detail": _plain(self.detail)}


@dataclass(frozen=True)
class Rewrite:
    """One change a pass made."""

    pass_name: str
    kind: RewriteKind
    nodes: tuple[str, ...]
    detail: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"pass": self.pass_name, "kind": self.kind.value, "nodes": list(self.nodes), "detail": _plain(self.detail)}


@dataclass(frozen=True)
class Refusal:
    """One candidate a pass looked at and left alone, and why.

    ``attempt`` names what was tried (e.g. the conv chain of a merge) when the
    node alone does not say it.
    """

    pass_name: str
    node: str
    reason: Reason
    attempt: Mapping[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> RefusalCode:
        return self.reason.code

    def to_dict(self) -> dict:
        return {
            "pass": self.pass_name,
            "node": self.node,
            "code": self.reason.code.value,
            "detail": _plain(self.reason.detail),
            "attempt": _plain(self.attempt),
        }
