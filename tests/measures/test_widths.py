"""ITPruner's width allocation: the cost model against counted MACs, the budget after rounding, importances that matter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models import resnet50

from egp_export.demo.digits import digits_resnet
from egp_export.measures import WidthCost, itpruner_widths, model_macs, width_cost


def test_digits_cost_model_equals_counted_macs_of_rebuilt_models():
    cost, names, full = width_cost(digits_resnet(), torch.randn(1, 1, 8, 8))
    assert full == [64, 64, 64, 64]
    assert cost([1.0] * 4) == model_macs(digits_resnet(), torch.randn(1, 1, 8, 8))
    for widths in ([8, 16, 0, 64], [0, 0, 0, 0], [24, 64, 40, 8]):
        rebuilt = digits_resnet(hidden_widths=dict(zip(names, widths, strict=True)))
        assert cost([w / 64 for w in widths]) == pytest.approx(model_macs(rebuilt, torch.randn(1, 1, 8, 8)), rel=1e-12)


def test_bottleneck_costs_are_quadratic_in_its_width():
    model = resnet50(num_classes=10)
    cost, names, _ = width_cost(model, torch.randn(1, 3, 64, 64))
    assert len(names) == 16 and (cost.square > 0).all()
    assert cost([1.0] * 16) == model_macs(model, torch.randn(1, 3, 64, 64))


def quadratic_cost() -> WidthCost:
    cross = np.zeros((3, 3))
    cross[0, 1] = cross[1, 0] = 40.0
    return WidthCost(constant=10.0, linear=np.array([30.0, 20.0, 10.0]), square=np.array([20.0, 0.0, 15.0]), cross=cross)


def test_budget_holds_after_rounding_and_slack_is_used():
    cost = quadratic_cost()
    full = [16, 16, 16]
    for ratio in (0.2, 0.45, 0.7, 0.95):
        budget = ratio * cost([1.0] * 3)
        plan = itpruner_widths([1.0, 0.8, 0.6], cost, full, budget, multiple=4)
        assert plan.flops <= budget
        assert all(width % 4 == 0 and 0 <= width <= 16 for width in plan.widths)
        # no unit could grow one multiple within the budget
        for index in range(3):
            grown = list(plan.widths)
            if grown[index] < 16:
                grown[index] += 4
                assert cost([w / 16 for w in grown]) > budget


def test_tiny_importances_still_decide():
    # The reference's scale: alpha of 1e-14 is below SLSQP's tolerance unless the objective is rescaled.
    cost = WidthCost(0.0, np.array([1.0, 1.0, 1.0]), np.zeros(3), np.zeros((3, 3)))
    plan = itpruner_widths([3e-14, 1e-14, 2e-14], cost, [8, 8, 8], budget=2.0, multiple=8)
    # unscaled, SLSQP stops at once at the uniform (2/3, 2/3, 2/3)
    assert plan.fractions == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)
    assert plan.widths == [8, 0, 8]


def test_the_budget_below_the_smallest_widths_is_refused():
    cost = quadratic_cost()
    with pytest.raises(ValueError, match="below the cost"):
        itpruner_widths([1.0, 1.0, 1.0], cost, [16, 16, 16], budget=5.0)
    with pytest.raises(ValueError, match="below the cost"):
        itpruner_widths([1.0, 1.0, 1.0], cost, [16, 16, 16], budget=50.0, x_min=0.5)
    with pytest.raises(ValueError, match="positive"):
        itpruner_widths([1.0, 0.0, 1.0], cost, [16, 16, 16], budget=50.0)
    with pytest.raises(ValueError, match="must agree"):
        itpruner_widths([1.0, 1.0], cost, [16, 16, 16], budget=50.0)
