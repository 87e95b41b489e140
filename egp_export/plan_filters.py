"""Filters plan -> plan: what the data beyond the decide samples takes away from the per-site plans.

Each filter returns new plans (``SitePlan.withdraw``) and the withdrawals the
report lists; none can add a rewrite. The decide stage runs them in this
order: thin evidence, validation, the perturbation search; the back-off
withdraws whole sites with ``withdraw_sites``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from egp_export.analysis.crossings import CrossingSearch
from egp_export.analysis.plans import SiteAction, SitePlan
from egp_export.analysis.stats import SiteStats
from egp_export.records import Reason, Refusal, RefusalCode

Plans = dict[str, SitePlan]

# Withdrawals are refusals recorded by this stage (report["withdrawals"], codes in records.RefusalCode).
WITHDRAWAL = "verification"


def withdraw_thin_evidence(plans: Plans, sites: list[SiteStats], min_observations: int, distinct: int, total: int) -> Plans:
    """Sites whose rewrite would rest on fewer than ``min_observations`` observations per neuron stay as they are;
    only distinct samples count (``distinct`` of the ``total`` decide samples differ)."""
    kept = dict(plans)
    for site in sites:
        observations = site.distinct_observations(distinct, total)
        if observations >= min_observations or site.observations == 0 or not plans[site.name].rewrites:
            continue
        evidence = site.evidence(distinct, total)
        detail = {
            "observations": observations, "samples": evidence["distinct_samples"], "positions": site.positions,
            "min_observations": min_observations,
        }
        if site.samples > evidence["distinct_samples"]:
            detail["duplicates"] = site.samples - evidence["distinct_samples"]
        kept[site.name] = plans[site.name].withdraw_all(Reason(RefusalCode.THIN_EVIDENCE, detail))
    return kept


def _surrogate_error(plan: SitePlan, low: torch.Tensor, high: torch.Tensor) -> float:
    """Largest deviation of the plan's affine surrogate from the activation on [low, high] per neuron."""
    t = torch.linspace(0.0, 1.0, 257, dtype=torch.float64)
    grid = low[:, None] + (high - low)[:, None] * t[None, :]
    return float((plan.spec.fn(grid) - (plan.slope_tensor()[:, None] * grid + plan.shift_tensor()[:, None])).abs().max())


def withdraw_on_validation(
    plans: Plans, sites: list[SiteStats], seen: dict[str, SiteStats], samples: int, tolerance: float
) -> tuple[Plans, list[Refusal]]:
    """Withdraw the rewrites of neurons the validation statistics ``seen`` (of ``samples`` samples) show outside the
    region they were decided in.

    A piecewise-linear neuron seen in a second region keeps its activation
    (the site stays) or leaves the dead mask; a smooth site whose surrogate is
    off by more than ``tolerance`` x its output scale on the validation range
    keeps its activation.
    """
    kept, withdrawals = dict(plans), []
    for site in sites:
        other, plan = seen.get(site.name), plans[site.name]
        if other is None or other.observations == 0:
            continue
        if site.spec.smooth:
            if plan.action is not SiteAction.LINEARIZE:
                continue
            low, high = torch.minimum(site.low, other.low), torch.maximum(site.high, other.high)
            error, allowed = _surrogate_error(plan, low, high), tolerance * site.output_scale()
            if error > allowed:
                detail = {
                    "neurons": site.num_neurons, "rewrite": "affine surrogate", "error": error, "allowed": allowed,
                    "validation_samples": samples,
                }
                reason = Reason(RefusalCode.SURROGATE_OFF_ON_VALIDATION, detail)
                kept[site.name] = plan.withdraw_all(reason)
                withdrawals.append(Refusal(WITHDRAWAL, site.name, reason))
            continue
        region = site.neuron_region.clamp_min(0)
        elsewhere = other.region_counts > 0
        elsewhere[region, torch.arange(site.num_neurons)] = False
        left = plan.rewritten_neurons() & elsewhere.any(0)
        if not left.any():
            continue
        detail = {
            "neurons": int(left.sum()), "rewrite": "linearized" if plan.action is SiteAction.LINEARIZE else "dead mask",
            "neuron_indices": [int(i) for i in left.nonzero().flatten()[:32]], "validation_samples": samples,
        }
        reason = Reason(RefusalCode.LEFT_REGION_ON_VALIDATION, detail)
        kept[site.name] = plan.withdraw(left, reason)
        withdrawals.append(Refusal(WITHDRAWAL, site.name, reason))
    return kept, withdrawals


def withdraw_crossings(plans: Plans, search: CrossingSearch) -> tuple[Plans, list[Refusal]]:
    """Withdraw every neuron the perturbation search moved out of its region."""
    kept = dict(plans)
    for name, reason in search.reasons:
        kept[name] = kept[name].withdraw(search.crossed[name], reason)
    return kept, [Refusal(WITHDRAWAL, name, reason) for name, reason in search.reasons]


def withdraw_sites(plans: Plans, names: Iterable[str], reason: Callable[[str], Reason]) -> Plans:
    """Every rewrite of the sites ``names`` withdrawn, each with ``reason(name)``."""
    kept = dict(plans)
    for name in names:
        kept[name] = kept[name].withdraw_all(reason(name))
    return kept
