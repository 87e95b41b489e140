"""The three-way split of calibration samples: decide, validate, verify; disjoint, in order, never empty."""

from __future__ import annotations

import pytest
import torch

from egp_export.analysis.batches import split_holdout
from egp_export.errors import CalibrationError


def test_the_three_parts_are_disjoint_and_in_order():
    samples = torch.arange(50, dtype=torch.float32)[:, None]
    split = split_holdout(list(torch.split(samples, 16)), holdout=0.2, validation=0.2)

    assert (split.decide_samples, split.validation_samples, split.holdout_samples) == (30, 10, 10)
    assert split.calibration_samples == 40
    parts = [torch.cat(split.calibrate), torch.cat(split.validate), torch.cat(split.holdout)]
    assert torch.equal(torch.cat(parts), samples)
    assert max(len(b) for b in split.calibrate + split.validate + split.holdout) <= 16  # batches stay bounded


def test_without_validation_and_holdout_everything_decides_and_verifies():
    samples = torch.randn(10, 3)
    split = split_holdout([samples], holdout=0.0)
    assert split.validate == [] and split.holdout is split.calibrate and split.decide_samples == 10


@pytest.mark.parametrize(
    ("total", "holdout", "validation", "message"),
    [
        (2, 0.2, 0.2, "too few to keep 20% for verification and 20% for validation"),
        (10, 0.2, 1.0, r"validation fraction must be in \[0, 1\)"),
        (10, -0.1, 0.2, r"holdout fraction must be in \[0, 1\)"),
    ],
)
def test_impossible_splits_are_calibration_errors(total, holdout, validation, message):
    with pytest.raises(CalibrationError, match=message):
        split_holdout([torch.randn(total, 3)], holdout=holdout, validation=validation)
