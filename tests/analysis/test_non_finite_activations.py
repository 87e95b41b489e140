"""NaN/Inf pre-activations are never counted into a region: calibration names the site (issue 15, item 4)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from egp_export import compile as compile_model
from egp_export.analysis.plans import analyze
from egp_export.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def _model(poison: float, activation: nn.Module) -> nn.Module:
    """Linear-activation-Linear whose first layer computes ``poison`` for its neuron 2 on every input."""
    model = nn.Sequential(nn.Linear(4, 6), activation, nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].bias[2] = poison
    return model


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("activation", [nn.ReLU(), nn.Hardtanh(0.0, 6.0), nn.GELU()], ids=["relu", "relu6", "gelu"])
def test_analyze_refuses_non_finite_pre_activations_naming_the_site(poison, activation):
    calibration = torch.randn(64, 4)
    with pytest.raises(CalibrationError, match=r"activation '_1' \(module 1\) got 64 NaN/Inf inputs") as error:
        analyze(_model(poison, activation), calibration)
    assert "\n" not in str(error.value)  # the CLI prints it as one line


def test_compile_refuses_a_model_that_computes_nan():
    # Before: the NaN neuron counted as "never ON", so the site was "linear" (a dead channel).
    with pytest.raises(CalibrationError, match="NaN/Inf inputs"):
        compile_model(_model(math.nan, nn.ReLU()), torch.randn(256, 4))
