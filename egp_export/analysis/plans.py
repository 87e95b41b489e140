"""What the rewrite does with each activation call site: one immutable ``SitePlan`` per site, on its node.

The compiler's decide stage turns each site's calibration facts
(``SiteStats``, analysis/stats.py) into a plan with ``plan_site``, the one
place the user's tolerance meets the statistics:

- LINEARIZE: every neuron stayed in one affine region (or a smooth
  activation's best affine fit is within the tolerance): the site becomes
  ``slope * z + shift`` per neuron;
- MASK_DEAD: the site stays, but its dead neurons (always in a zero region,
  and f(0) = 0) are masked so their channels can be removed;
- KEEP: nothing is rewritten; ``refusal`` says why (a typed ``Reason``).

Evidence, validation, the perturbation search and the back-off can only take
rewrites away: each is a filter plan -> plan built on ``withdraw``, which
returns a new plan and never changes the one it is given. A withdrawn neuron
ends the site's linearization (the activation stays) and leaves the dead mask.
``LinearizeActivations`` applies the plan it finds on a node
(``node.meta[PLAN_KEY]``) and decides nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis import inputs
from egp_export.analysis.activations import ActivationSpec
from egp_export.analysis.batches import as_batches, fitted_to
from egp_export.analysis.stats import SiteStats, calibrate
from egp_export.analysis.trace import trace
from egp_export.records import Reason, RefusalCode

PLAN_KEY = "egp_plan"


class SiteAction(enum.Enum):
    LINEARIZE = "linearize"  # the activation becomes a per-neuron affine map
    MASK_DEAD = "mask_dead"  # the activation stays; its dead neurons are masked to zero
    KEEP = "keep"  # nothing is rewritten (``refusal`` says why)


def _floats(values: torch.Tensor | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values.to(torch.float64).tolist())


def _flags(mask: torch.Tensor) -> tuple[bool, ...]:
    return tuple(bool(v) for v in mask.tolist())


@dataclass(frozen=True)
class SitePlan:
    """The decision for one activation call site (immutable: tuples, never tensors another step could write).

    ``slope``/``shift`` are set for LINEARIZE only; ``dead`` flags the neurons
    the calibration saw only in a zero region (the mask of MASK_DEAD, and what
    a withdrawn linearization falls back on); ``withdrawn`` flags the neurons
    a filter took away, ``withdrawals`` say why.
    """

    site: str
    spec: ActivationSpec
    dim: int
    neurons: int
    action: SiteAction
    slope: tuple[float, ...] | None
    shift: tuple[float, ...] | None
    dead: tuple[bool, ...]
    refusal: Reason | None  # why the site is not linearized; None when it is
    surrogate_error: float = 0.0  # a smooth site's affine fit's largest deviation on the decide data
    allowed_error: float = 0.0  # what that fit may deviate: tolerance x the site's output scale (smooth sites)
    withdrawn: tuple[bool, ...] = ()
    withdrawals: tuple[Reason, ...] = ()

    def withdraw(self, neurons: torch.Tensor, reason: Reason) -> SitePlan:
        """A new plan that rewrites none of ``neurons`` (a bool mask): the site keeps its activation, and the dead
        mask loses them. A site without calibration data keeps its NO_CALIBRATION_DATA refusal."""
        if not self.neurons:
            return self
        withdrawn = self.withdrawn_mask() | neurons
        withdrawals = (*self.withdrawals, reason)
        dead = self.dead_mask() & ~withdrawn
        why = withdrawals[0] if len(withdrawals) == 1 else Reason(RefusalCode.WITHDRAWN, {"reasons": list(withdrawals)})
        return replace(
            self, action=SiteAction.MASK_DEAD if bool(dead.any()) else SiteAction.KEEP, slope=None, shift=None,
            refusal=why, surrogate_error=0.0, withdrawn=_flags(withdrawn), withdrawals=withdrawals,
        )

    def withdraw_all(self, reason: Reason) -> SitePlan:
        return self.withdraw(torch.ones(self.neurons, dtype=torch.bool), reason)

    @property
    def rewrites(self) -> bool:
        return self.action is not SiteAction.KEEP

    def slope_tensor(self) -> torch.Tensor:
        return torch.tensor(self.slope, dtype=torch.float64)

    def shift_tensor(self) -> torch.Tensor:
        return torch.tensor(self.shift, dtype=torch.float64)

    def withdrawn_mask(self) -> torch.Tensor:
        return torch.tensor(self.withdrawn or (False,) * self.neurons, dtype=torch.bool)

    def dead_mask(self) -> torch.Tensor:
        """The dead neurons the plan masks (none withdrawn)."""
        return torch.tensor(self.dead, dtype=torch.bool) & ~self.withdrawn_mask()

    def rewritten_neurons(self) -> torch.Tensor:
        """The neurons whose rewrite rests on the statistics: every one of a linearized site, else the dead mask."""
        if self.action is SiteAction.LINEARIZE:
            return torch.ones(self.neurons, dtype=torch.bool)
        if self.action is SiteAction.MASK_DEAD:
            return self.dead_mask()
        return torch.zeros(self.neurons, dtype=torch.bool)


def plan_site(site: SiteStats, tolerance: float) -> SitePlan:
    """The plan the calibration facts of ``site`` support: linearize when its affine map holds (within ``tolerance``
    of the site's output scale for smooth activations), else mask its dead neurons, else keep it."""
    linear = site.linear_map(tolerance)
    dead = site.dead_neurons()
    action = SiteAction.LINEARIZE if linear.ok else SiteAction.MASK_DEAD if bool(dead.any()) else SiteAction.KEEP
    smooth = site.spec.smooth and site.observations > 0
    return SitePlan(
        site.name, site.spec, site.dim, site.num_neurons, action, _floats(linear.scale), _floats(linear.shift),
        _flags(dead), linear.refusal, linear.max_error if site.spec.smooth else 0.0,
        tolerance * site.output_scale() if smooth else 0.0,
    )


def store_plans(gm: fx.GraphModule, plans: dict[str, SitePlan]) -> None:
    """Put each plan on the node of the same name (a fresh capture of the same model names its nodes alike)."""
    for node in gm.graph.nodes:
        if node.name in plans:
            node.meta[PLAN_KEY] = plans[node.name]


def site_plan(node: fx.Node) -> SitePlan | None:
    return node.meta.get(PLAN_KEY)


def site_row(site: SiteStats, plan: SitePlan) -> dict:
    """The report's row for a site: its calibration facts and what its plan decided (JSON-serialisable)."""
    return {
        **site.to_dict(),
        "dead_neurons": int(plan.dead_mask().sum()),
        "withdrawn_neurons": int(plan.withdrawn_mask().sum()),
        "linear": plan.action is SiteAction.LINEARIZE,
        "surrogate_error": plan.surrogate_error,
        "why_not_linear": plan.refusal.to_dict() if plan.refusal is not None else None,
    }


def summarize_sites(sites: list[SiteStats], plans: dict[str, SitePlan]) -> dict:
    """The analysis part of a report: one row per site plus totals."""
    rows = [site_row(site, plans[site.name]) for site in sites]
    return {
        "sites": rows,
        "num_sites": len(rows),
        "num_linear_sites": sum(1 for r in rows if r["linear"]),
        "mean_entropy": sum(r["entropy"] for r in rows) / len(rows) if rows else 0.0,
        "zero_entropy_sites": sum(1 for r in rows if r["entropy"] == 0.0),
    }


def analyze(model: nn.Module, calibration, *, tolerance: float = 1e-5, progress: bool = False, leaf_modules=()) -> dict:
    """Per-site activation analysis of ``model`` on all of ``calibration`` (no rewriting): each site's facts and
    the plan they support at ``tolerance``; ``leaf_modules`` as in ``trace``."""
    gm = trace(model, leaf_modules=tuple(leaf_modules))
    sites = calibrate(gm, fitted_to(gm, as_batches(calibration, signature=inputs.signature(gm))), progress=progress)
    return summarize_sites(sites, {site.name: plan_site(site, tolerance) for site in sites})
