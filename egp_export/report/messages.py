"""The sentences a person reads about rewrites and refusals: the one place prose is written.

Passes record kinds, codes and numbers (``egp_export.records``); this module
turns their JSON form into text for ``report.md``, the CLI and the ``action`` /
``reason`` fields of ``report.json``. Nothing reads these sentences back:
rewording one changes no count.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from egp_export.records import Refusal, RefusalCode, Rewrite, RewriteKind


def _names(values) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _chain(values) -> str:
    return " -> ".join(values)


def _kernel(kernel) -> str:
    return "x".join(str(k) for k in kernel)


def _site_counts(d: Mapping[str, Any]) -> str:
    parts = [f"{d['identity']} identity", f"{d['zero']} zero"] + ([f"{d['affine']} affine"] if d.get("affine") else [])
    error = f", surrogate error {d['surrogate_error']:.2g}" if d.get("surrogate_error") is not None else ""
    return ", ".join(parts) + error


_CHAIN_CLASS = {
    RewriteKind.MERGED_EXACT: "exact",
    RewriteKind.MERGED_BIAS_MAP: "exact-bias-map",
    RewriteKind.MERGED_BORDER_APPROXIMATE: "border-approximate",
}


def _conv_merge(d: Mapping[str, Any], kind: RewriteKind) -> str:
    return (
        f"{_chain(d['chain'])} merged into one {_kernel(d['kernel'])} conv ({_CHAIN_CLASS[kind]}; "
        f"predicted {d['predicted_us']:.1f} us vs {d['split_us']:.1f} us)"
    )


REWRITES: dict[RewriteKind, Callable[[Mapping[str, Any]], str]] = {
    RewriteKind.FUNCTIONAL_LAYER_BOUND: lambda d: f"{d['function']} with constant parameters became module '{d['module']}'",
    RewriteKind.IDENTITY_REMOVED: lambda d: f"{d['op']} is the identity in eval mode: removed",
    RewriteKind.BN_FOLDED: lambda d: f"BatchNorm '{d['batchnorm']}' folded into '{d['layer']}'",
    RewriteKind.BN_TO_AFFINE: lambda d: f"BatchNorm '{d['batchnorm']}' became a per-channel affine map",
    RewriteKind.LINEARIZED: lambda d: f"{d['activation']} -> affine ({_site_counts(d)})",
    RewriteKind.DEAD_MASKED: lambda d: f"{d['dead']} dead neurons of {d['activation']} masked to zero",
    RewriteKind.AFFINE_REMOVED: lambda d: "identity map removed",
    RewriteKind.AFFINE_FOLDED: lambda d: f"affine map folded into {_names(d['into'])}",
    RewriteKind.CHANNELS_REMOVED: lambda d: (
        f"removed {d['removed']} of {d['channels']} channels from {', '.join(d['producers'])} "
        f"(consumers: {', '.join(d['consumers']) or 'none'})"
    ),
    RewriteKind.LINEAR_MERGED: lambda d: f"{d['rule']}: '{d['into']}' absorbed '{d['absorbed']}'",
    RewriteKind.POOLED_HEAD_MERGED: lambda d: (
        f"pooled head: 1x1 conv '{d['conv']}' moved behind the global pool and merged into '{d['linear']}'"
    ),
    RewriteKind.MERGED_EXACT: lambda d: _conv_merge(d, RewriteKind.MERGED_EXACT),
    RewriteKind.MERGED_BIAS_MAP: lambda d: _conv_merge(d, RewriteKind.MERGED_BIAS_MAP),
    RewriteKind.MERGED_BORDER_APPROXIMATE: lambda d: _conv_merge(d, RewriteKind.MERGED_BORDER_APPROXIMATE),
    RewriteKind.RESIDUAL_FOLDED: lambda d: (
        f"residual add folded into '{d['conv']}' (identity on the centre tap)" if "conv" in d
        else f"residual add folded into '{d['linear']}' (W + I)"
    ),
    RewriteKind.SITE_TO_IDENTITY: lambda d: "activation -> identity",
}


REASONS: dict[RefusalCode, Callable[[Mapping[str, Any]], str]] = {
    RefusalCode.NO_CALIBRATION_DATA: lambda d: "no calibration data reached this site",
    RefusalCode.NEURONS_CROSS_BOUNDARY: lambda d: (
        f"{d['crossing']} of {d['neurons']} neurons cross a region boundary on the data"
    ),
    RefusalCode.NONAFFINE_REGION: lambda d: f"{d['count']} neurons stay in a region where {d['activation']} is not affine",
    RefusalCode.SURROGATE_ERROR: lambda d: (
        f"{d['over']} of {d['neurons']} neurons deviate from their best affine fit by up to {d['worst']:.3g} "
        f"(> tolerance {d['tolerance']:.3g} x output scale {d['scale']:.3g})"
    ),
    RefusalCode.INPLACE_INPUT_READ: lambda d: f"inplace {d['activation']} overwrites '{d['input']}', which other nodes read",
    RefusalCode.THIN_EVIDENCE: lambda d: (
        f"evidence too thin: {d['observations']} observations per neuron ({d['samples']} samples x "
        f"{d['positions']} positions) < min_observations {d['min_observations']}; the 95% bound on how often a "
        f"neuron leaves its region would be 3/{d['observations']} = {3 / d['observations']:.2g}"
        + (f" ({d['duplicates']} duplicated samples not counted)" if d.get("duplicates") else "")
    ),
    RefusalCode.LEFT_REGION_ON_VALIDATION: lambda d: (
        f"{d['neurons']} neurons left their region on {d['validation_samples']} validation samples ({d['rewrite']} withdrawn)"
    ),
    RefusalCode.CROSSED_UNDER_PERTURBATION: lambda d: (
        f"{d['neurons']} neurons left their region under input perturbations within {d['radius']:g} x the data's "
        f"per-feature std ({d['steps']} gradient steps from {d['samples']} validation samples)"
    ),
    RefusalCode.SURROGATE_OFF_ON_VALIDATION: lambda d: (
        f"surrogate withdrawn: off by {d['error']:.3g} on the validation range (> {d['allowed']:.3g})"
    ),
    RefusalCode.FINAL_CHECK_FAILED: lambda d: (
        f"withdrawn: the final check failed with every rewrite in place (max_rel={d['max_rel']:.3g} > allowed "
        f"{d['allowed']:g} on {d['verification_samples']} verification samples)"
    ),
    RefusalCode.MARGINAL_SITE_WITHDRAWN: lambda d: (
        f"withdrawn in back-off step {d['step']}: the final check failed (max_rel={d['max_rel']:.3g} > allowed "
        f"{d['allowed']:g}) and this site was the #{d['rank']} most marginal of {d['sites']} statistically rewritten "
        f"sites (margin {d['marginality']:.3g} x its neurons' spread on the decide split)"
    ),
    RefusalCode.EXACT_REWRITE_WITHDRAWN: lambda d: (
        f"exact rewrite withdrawn ({d['rewrite']} by {d['pass']} over {_names(d['nodes'])}): the final check failed "
        f"with no statistical rewrite left (max_rel={d['max_rel']:.3g} > allowed {d['allowed']:g}); checked pass by "
        f"pass on {d['samples']} {d['part']} samples, this rewrite raised the float32 output's error against the "
        f"original (worst output and sample) from {d['error_before']:.3g} to {d['error_after']:.3g} (limit "
        f"{d['limit']:.3g}): its own float32 "
        "rounding is at that scale, so an exact fold or merge that rounds differently cannot be told from a wrong one"
    ),
    RefusalCode.WITHDRAWN: lambda d: "; ".join(describe_reason(r) for r in d["reasons"]),
    RefusalCode.NO_SUCH_SITE: lambda d: "the model has no activation call site of that name",
    RefusalCode.NOT_AN_ACTIVATION: lambda d: f"{d['node']} is not an activation call site",
    RefusalCode.DEAD_NEURONS_KEPT: lambda d: f"{d['dead']} dead neurons kept: {describe_reason(d['because'])}",
    RefusalCode.NO_RUNNING_STATS: lambda d: "BatchNorm without running statistics uses batch statistics even in eval mode",
    RefusalCode.BN_NOT_FOLDED_BACKWARDS: lambda d: (
        f"not folded backwards ({describe_reason(d['because'])}); kept as a per-channel affine map"
    ),
    RefusalCode.AFFINE_NOT_FOLDABLE: lambda d: (
        f"cannot fold backwards ({describe_reason(d['backward'])}) or forwards ({describe_reason(d['forward'])})"
    ),
    RefusalCode.NOT_A_LAYER: lambda d: f"'{d['node']}' is not a conv/linear layer",
    RefusalCode.OPAQUE_MODULE: lambda d: (
        f"'{d['node']}' is a {d['module_type']}, a {d['base']} subclass that {d['why']}: "
        "its attributes do not describe what it computes"
    ),
    RefusalCode.SHARED_WEIGHT: lambda d: f"weights of '{d['layer']}' are shared by {d['sites']} call sites",
    RefusalCode.SAME_MODULE: lambda d: f"'{d['layer']}' is the same module as '{d['other']}'",
    RefusalCode.TIED_WEIGHT: lambda d: f"'{d['parameter']}' is the same tensor as '{d['other']}' (tied weights)",
    RefusalCode.MULTIPLE_USERS: lambda d: f"output of '{d['node']}' has {d['users']} users",
    RefusalCode.AXIS_MISMATCH: lambda d: f"neuron axis {d['axis']} is not the {d['side']}-channel axis of '{d['node']}'",
    RefusalCode.PADDED_SHIFT: lambda d: f"a shift before zero-padded '{d['node']}' would be wrong on the border",
    RefusalCode.NO_CONSUMERS: lambda d: "no consumers",
    RefusalCode.ZERO_CHANNELS_IN_TIED_LAYER: lambda d: f"{d['count']} zero channels kept: grouped or shared layer",
    RefusalCode.ZERO_CHANNELS_NOT_SHARED: lambda d: (
        f"{d['count']} zero channels kept: they are not zero in {', '.join(d['others'])}, added to them"
    ),
    RefusalCode.ZERO_CHANNELS_BLOCKED: lambda d: (
        f"{d['count']} zero channels of {', '.join(d['producers'])} kept: {d['blocker']}"
    ),
    RefusalCode.CHANNELS_KEPT_FOR_ALIGNMENT: lambda d: (
        f"{d['count']} zero channels kept to stay a multiple of {d['alignment']}"
    ),
    RefusalCode.MACS_GROW: lambda d: (
        f"MACs would grow from {d['before']} to {d['after']} per token (hidden width {d['hidden']} is too narrow)"
    ),
    RefusalCode.NOT_PLAIN_POINTWISE: lambda d: "the conv is not 1x1 with stride 1, no padding and no groups",
    RefusalCode.NOT_COMPOSABLE: lambda d: d["why"],
    RefusalCode.BORDER_NOT_EXACT: lambda d: "border not exact (later convs pad; allow with approximate=True)",
    RefusalCode.COST_GROWS: lambda d: (
        f"predicted latency grows: {d['merged_us']:.1f} us merged vs {d['split_us']:.1f} us as is "
        f"({d['cost_model']} cost model)"
    ),
    RefusalCode.BETTER_SPLIT: lambda d: f"a better split exists (this merge: {d['predicted_us']:.1f} us predicted)",
    RefusalCode.SHAPE_CHANGES: lambda d: "the branch changes the shape",
    RefusalCode.STRIDED: lambda d: "the conv is strided",
    RefusalCode.GROUPED: lambda d: "grouped conv that is not depthwise",
    RefusalCode.NOT_CENTRED: lambda d: "the kernel is not centred (even size or padding other than 'same')",
    RefusalCode.PADDING_UNSUPPORTED: lambda d: d["why"],
}

# What was being tried, when a refusal's node alone does not say it.
ATTEMPTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "conv_merge": lambda a: f"merge of {_chain(a['chain'])} refused: ",
    "linear_merge": lambda a: f"{a['rule']} merge of '{a['first']}' and '{a['second']}' refused: ",
    "pooled_head": lambda a: f"pooled-head merge of '{a['conv']}' into '{a['linear']}' refused: ",
    "residual": lambda a: f"residual around '{a['conv']}' not folded: ",
}


def _as_dict(record) -> dict:
    return record.to_dict() if isinstance(record, (Rewrite, Refusal)) else dict(record)


def describe_reason(reason: Mapping[str, Any] | None) -> str:
    """A reason's sentence, from its JSON form ``{"code", "detail"}`` (None: nothing was tried)."""
    if reason is None:
        return "no consumers"
    return REASONS[RefusalCode(reason["code"])](reason.get("detail") or {})


def describe_rewrite(rewrite) -> str:
    """The sentence for a ``Rewrite`` or its JSON form."""
    record = _as_dict(rewrite)
    return REWRITES[RewriteKind(record["kind"])](record.get("detail") or {})


def describe_refusal(refusal) -> str:
    """The sentence for a ``Refusal`` or its JSON form, prefixed by what was tried."""
    record = _as_dict(refusal)
    attempt = record.get("attempt") or {}
    prefix = ATTEMPTS[attempt["what"]](attempt) if attempt else ""
    return prefix + describe_reason(record)


def with_text(records: list, describe: Callable, field_name: str) -> list[dict]:
    """JSON rows of ``records`` with their sentence under ``field_name`` (``action`` or ``reason``)."""
    return [{**_as_dict(r), field_name: describe(r)} for r in records]
