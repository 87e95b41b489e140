"""ITPruner's width allocation: the most important units keep the most channels under a FLOPs budget.

With x_i in [x_min, 1] the kept fraction of unit i's hidden width, every
convolution / linear layer costs its dense MACs times x_i once for each side
(outputs, inputs) that is unit i's hidden width, so the model's cost is

    F(x) = c + sum_i s_i x_i + sum_i q_i x_i^2 + sum_{i<j} D_ij x_i x_j

(``WidthCost``: c layers of fixed width, s one side, q both sides of one
unit, D the two sides of two units), and the reference
(``Cifar/feature_extract.py``) solves

    maximise sum_i alpha_i x_i   s.t. F(x) <= T,  x_min <= x_i <= 1

with scipy's SLSQP from x0 = 1, jac = -alpha. Where this differs:

- **Scale.** At the shipped beta (246 for ResNet-20) alpha is 1e-10..1e-14,
  below SLSQP's tolerance: the solver stops at its first feasible point and
  the importances have no effect. Here the objective is alpha / max(alpha)
  and the constraint (T - F(x)) / F(1), both of order one, which leaves the
  optimum unchanged and lets the importances decide.
- **Starts.** With D != 0 the feasible set is not convex in general (q >= 0
  alone keeps it convex), so SLSQP may stop at a local optimum: it runs from
  x0 = 1, from the uniform x that meets the budget exactly, and from
  ``starts - 2`` seeded random points; the best feasible end point wins.
- **Rounding.** Widths are rounded to a multiple of ``multiple`` (default 8;
  the reference rounds to integers and its result can exceed the budget).
  Then, while F > T, the unit losing the least objective per FLOP saved
  (alpha_i dx_i / dF_i; ties to the later unit) drops one multiple; then,
  while a unit can grow one multiple within T, the one gaining the most per
  FLOP (ties to the earlier unit) does. The result always meets T. A width of
  0 removes the unit's branch (depth reduction).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from egp_export.measures.units import require_units

DEFAULT_MULTIPLE = 8
DEFAULT_STARTS = 8
# A solver end point counts as feasible when F(x) exceeds T by at most this fraction of F(1).
_FEASIBLE = 1e-9


@dataclass(frozen=True)
class WidthCost:
    """F(x) = constant + linear . x + square . x^2 + sum_{i<j} cross_ij x_i x_j (cross symmetric, zero diagonal)."""

    constant: float
    linear: np.ndarray
    square: np.ndarray
    cross: np.ndarray

    def __call__(self, x: Sequence[float]) -> float:
        x = np.asarray(x, dtype=np.float64)
        return float(self.constant + self.linear @ x + self.square @ (x * x) + 0.5 * x @ self.cross @ x)

    def gradient(self, x: Sequence[float]) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return self.linear + 2.0 * self.square * x + self.cross @ x


@dataclass
class WidthPlan:
    """What ``itpruner_widths`` decided: continuous fractions, rounded widths, their cost against the budget."""

    fractions: list[float]
    widths: list[int]
    flops: float
    budget: float
    full_flops: float
    solver: dict = field(default_factory=dict)


def _layer_macs(module: nn.Module, inputs: tuple, output: torch.Tensor) -> float:
    """Multiply-accumulates of one call of a conv or linear layer, per sample."""
    if isinstance(module, nn.Linear):
        return float(output[0].numel() * module.in_features)
    kernel = math.prod(module.kernel_size)
    return float(output[0].numel() * (module.in_channels // module.groups) * kernel)


@torch.no_grad()
def _layer_calls(model: nn.Module, example: torch.Tensor) -> list[tuple[nn.Module, float]]:
    """(layer, MACs per sample) of every conv / linear call of ``model`` (eval mode) on one sample of ``example``."""
    calls: list[tuple[nn.Module, float]] = []
    handles = [
        module.register_forward_hook(lambda m, i, o: calls.append((m, _layer_macs(m, i, o))))
        for module in model.modules()
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    ]
    was_training = model.training
    model.eval()
    try:
        model(example[:1].clone())  # a model may write into its input
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return calls


def model_macs(model: nn.Module, example: torch.Tensor) -> float:
    """Multiply-accumulates of the conv and linear layers of ``model`` for one sample shaped like ``example[0]``."""
    return sum(macs for _, macs in _layer_calls(model, example))


def width_cost(model: nn.Module, example: torch.Tensor) -> tuple[WidthCost, list[str], list[int]]:
    """(F, unit names, full hidden widths) of ``model``'s residual units, from its layers' MACs on one sample."""
    units = require_units(model, "ITPruner chooses the hidden widths of residual units")
    sides: dict[int, list] = {}
    for index, unit in enumerate(units):
        for attribute in unit.kind.width_out:
            sides.setdefault(id(getattr(unit.module, attribute)), [None, None])[0] = index
        for attribute in unit.kind.width_in:
            sides.setdefault(id(getattr(unit.module, attribute)), [None, None])[1] = index
    macs = [(cost, *sides.get(id(module), (None, None))) for module, cost in _layer_calls(model, example)]
    count = len(units)
    constant, linear, square, cross = 0.0, np.zeros(count), np.zeros(count), np.zeros((count, count))
    for cost, out_unit, in_unit in macs:
        if out_unit is None and in_unit is None:
            constant += cost
        elif out_unit is None or in_unit is None:
            linear[out_unit if in_unit is None else in_unit] += cost
        elif out_unit == in_unit:
            square[out_unit] += cost
        else:
            cross[out_unit, in_unit] += cost
            cross[in_unit, out_unit] += cost
    widths = [getattr(unit.module, unit.kind.width_out[0]).out_channels for unit in units]
    return WidthCost(constant, linear, square, cross), [unit.name for unit in units], widths


def _uniform_fraction(cost: WidthCost, budget: float, low: float) -> float:
    """The largest t in [low, 1] with F(t, ..., t) <= budget (bisection; F is increasing in t for t >= 0)."""
    count = len(cost.linear)
    if cost([1.0] * count) <= budget:
        return 1.0
    lo, hi = low, 1.0
    for _ in range(60):
        middle = 0.5 * (lo + hi)
        lo, hi = (middle, hi) if cost([middle] * count) <= budget else (lo, middle)
    return lo


def itpruner_widths(
    alpha: Sequence[float],
    cost: WidthCost,
    full_widths: Sequence[int],
    budget: float,
    *,
    x_min: float = 0.0,
    multiple: int = DEFAULT_MULTIPLE,
    starts: int = DEFAULT_STARTS,
    seed: int = 0,
) -> WidthPlan:
    """Widths maximising sum alpha_i x_i under F(x) <= ``budget`` (MACs), rounded to ``multiple`` and repaired to fit."""
    from scipy.optimize import minimize

    weights = np.asarray(alpha, dtype=np.float64)
    count = len(weights)
    if count == 0 or len(full_widths) != count or len(cost.linear) != count:
        raise ValueError(f"{count} importances, {len(full_widths)} widths and {len(cost.linear)} cost terms must agree")
    if not (weights > 0).all():
        raise ValueError("the importances alpha must be positive")
    if not 0.0 <= x_min <= 1.0:
        raise ValueError(f"x_min must be in [0, 1], got {x_min}")
    if multiple < 1 or starts < 1:
        raise ValueError(f"multiple and starts must be at least 1, got {multiple} and {starts}")
    full = cost([1.0] * count)
    floor_widths = [min(full_width, multiple * math.ceil(x_min * full_width / multiple)) for full_width in full_widths]
    floor_cost = cost([w / f for w, f in zip(floor_widths, full_widths, strict=True)])
    if floor_cost > budget:
        raise ValueError(
            f"the FLOPs budget {budget:.4g} is below the cost {floor_cost:.4g} of every unit at its smallest width "
            f"(x_min={x_min}, multiple={multiple}); raise the budget or lower x_min"
        )
    scaled = weights / weights.max()

    def objective(x):
        return -float(scaled @ x)

    def objective_gradient(x):
        return -scaled

    constraint = {"type": "ineq", "fun": lambda x: (budget - cost(x)) / full, "jac": lambda x: -cost.gradient(x) / full}
    generator = np.random.default_rng(seed)
    points = [np.ones(count), np.full(count, _uniform_fraction(cost, budget, x_min))]
    points += [generator.uniform(x_min, 1.0, count) for _ in range(max(starts - 2, 0))]
    best, runs = None, []
    for start in points[:starts]:
        result = minimize(objective, start, jac=objective_gradient, method="SLSQP", bounds=[(x_min, 1.0)] * count,
                          constraints=[constraint])
        x = np.clip(result.x, x_min, 1.0)
        feasible = cost(x) <= budget + _FEASIBLE * full
        runs.append({"objective": float(scaled @ x), "feasible": bool(feasible), "message": str(result.message)})
        if feasible and (best is None or scaled @ x > scaled @ best + 1e-12):
            best = x
    if best is None:
        # No solver end point met the budget: the uniform start meets it by construction.
        best = points[1]
    widths = [
        min(max(multiple * round(x * full_width / multiple), low), full_width)
        for x, full_width, low in zip(best, full_widths, floor_widths, strict=True)
    ]
    widths = _repair(widths, scaled, cost, full_widths, floor_widths, budget, multiple)
    flops = cost([w / f for w, f in zip(widths, full_widths, strict=True)])
    solver = {"starts": runs, "uniform_fallback": not any(run["feasible"] for run in runs)}
    return WidthPlan([float(v) for v in best], widths, flops, float(budget), full, solver)


def _repair(widths, scaled, cost, full_widths, floor_widths, budget, multiple) -> list[int]:
    """Shrink until F <= budget, then grow within it, one multiple at a time by objective per FLOP."""
    widths = list(widths)

    def flops_of(candidate):
        return cost([w / f for w, f in zip(candidate, full_widths, strict=True)])

    def moves(step):
        current = flops_of(widths)
        found = []
        for index in range(len(widths)):
            changed = widths[index] + step * multiple
            changed = min(max(changed, floor_widths[index]), full_widths[index])
            if changed == widths[index]:
                continue
            trial = widths[:index] + [changed] + widths[index + 1 :]
            saved = abs(flops_of(trial) - current)
            gained = scaled[index] * abs(changed - widths[index]) / full_widths[index]
            found.append((gained / saved if saved else math.inf, index, changed, flops_of(trial)))
        return found

    while flops_of(widths) > budget:
        # least objective lost per FLOP saved; ties to the later unit
        _, index, changed, _ = min(moves(-1), key=lambda move: (move[0], -move[1]))
        widths[index] = changed
    while True:
        fitting = [move for move in moves(+1) if move[3] <= budget]
        if not fitting:
            return widths
        _, index, changed, _ = max(fitting, key=lambda move: (move[0], -move[1]))
        widths[index] = changed
