"""Integer inputs (token ids) keep their dtype through calibration, compilation and verification."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.batches import as_batches
from egp_export.errors import CalibrationError
from tests.conftest import assert_same_function, engineer


class TokenModel(nn.Module):
    """Embedding -> Linear -> ReLU (always ON: linear by construction) -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.fc = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.head = nn.Linear(16, 4)
        engineer(self.fc, torch.full((16,), 50.0))

    def forward(self, ids):
        return self.head(self.relu(self.fc(self.embed(ids))).mean(1))


def _ids(samples: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 50, (samples, 8), generator=torch.Generator().manual_seed(seed))


def test_integer_batches_keep_their_dtype():
    (batch,) = as_batches(_ids(10, 0))
    assert batch.dtype == torch.int64


def test_token_id_model_compiles_on_integer_calibration_data():
    """Regression: ids were cast to float32 and the embedding refused them (CalibrationError)."""
    model = TokenModel().eval()
    result = egp_export.compile(model, _ids(80, 1), min_observations=100)  # 48 decide samples x 8 tokens
    (row,) = result.report["analysis"]["sites"]
    assert "-> affine" in row["action"]
    assert_same_function(model, result.module, _ids(16, 2))


def test_integer_data_for_a_float_model_is_refused_naming_the_dtype():
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()).eval()
    with pytest.raises(CalibrationError, match=r"rejects calibration samples of shape \(8,\) and dtype int64.*token ids"):
        egp_export.compile(model, _ids(20, 3))


def test_complex_data_is_refused():
    with pytest.raises(CalibrationError, match="complex"):
        as_batches(torch.randn(4, 3, dtype=torch.complex64))
