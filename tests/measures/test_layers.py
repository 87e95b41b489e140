"""layer_measures: report rows of every measure on the trained digits ResNet, and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from egp_export.errors import CalibrationError, UnsupportedModelError
from egp_export.measures import MEASURES, layer_measures, pq_index, unit_scores
from egp_export.measures.layers import nhsic_importance
from tests.measures.subjects import digits_data, one_thread, plain_cnn, trained_digits


def test_pqi_rows_cover_every_weight_with_dim_above_one_and_read_masks():
    model = trained_digits()
    mask = torch.ones_like(model.fc.weight)
    mask[:, :8] = 0
    torch_prune.custom_from_mask(model.fc, "weight", mask)
    rows = layer_measures(model, measure="pqi")
    names = [row["name"] for row in rows]
    assert names[0] == "stem_conv.weight" and names[-2] == "fc.weight" and names[-1] == "(global)"
    assert len(names) == 1 + 4 * 2 + 1 + 1  # stem, two convs per block, classifier, global
    fc = rows[-2]
    assert fc["unmasked"] == 80
    assert fc["value"] == pytest.approx(pq_index(model.fc.weight_orig[:, 8:]))
    per_row = pq_index(model.fc.weight_orig, mask=mask.bool(), scope="neuron")
    assert (fc["neuron_min"], fc["neuron_max"]) == (float(per_row.min()), float(per_row.max()))


@pytest.mark.parametrize("measure", ["energy", "dcor", "nhsic"])
def test_unit_measures_give_one_row_per_residual_unit(measure):
    with one_thread():
        rows = layer_measures(trained_digits(), digits_data()["fit"], measure, rounds=2, samples=128)
    assert [row["name"] for row in rows] == ["block1_1", "block1_2", "block2_1", "block2_2"]
    values = [row["value"] for row in rows]
    assert all(value > 0 for value in values)
    if measure == "nhsic":
        assert sum(values) == pytest.approx(1.0)
        assert all(0 < row["alpha"] < 1 for row in rows)
    if measure == "dcor":
        assert all(value <= 1 for value in values)


def test_nhsic_with_the_gaussian_kernel_differs_from_linear():
    model, (inputs, _) = trained_digits(), digits_data()["fit"]
    linear = nhsic_importance(model, inputs[:64])
    gaussian = nhsic_importance(model, inputs[:64], kernel="gaussian")
    assert sum(t for t, _ in gaussian.values()) == pytest.approx(1.0)
    assert linear != gaussian


def test_energy_scores_average_over_seeded_rounds():
    model, data = trained_digits(), digits_data()["fit"]
    with one_thread():
        first = unit_scores(model, data, rounds=2, samples=64, seed=3)
        again = unit_scores(model, data, rounds=2, samples=64, seed=3)
        other = unit_scores(model, data, rounds=2, samples=64, seed=4)
        standardized = unit_scores(model, data, rounds=2, samples=64, seed=3, standardize=True)
    assert first == again and first != other
    assert standardized["block2_1"] == pytest.approx(first["block2_1"] / (16 * 4 * 4) ** 0.5)


def test_errors_a_user_can_cause():
    model, (inputs, labels) = trained_digits(), digits_data()["fit"]
    with pytest.raises(ValueError, match="measure must be one of"):
        layer_measures(model, measure="gini")
    with pytest.raises(CalibrationError, match="give data"):
        layer_measures(model, None, "energy")
    with pytest.raises(CalibrationError, match="two classes"):
        layer_measures(model, (inputs[labels == 3], labels[labels == 3]), "energy", rounds=1, samples=16)
    with pytest.raises(ValueError, match="no residual unit"):
        layer_measures(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), (inputs, labels), "dcor")
    with pytest.raises(ValueError, match="samples must be in"):
        unit_scores(model, (inputs, labels), samples=1)
    assert set(MEASURES) == {"pqi", "energy", "dcor", "nhsic"}


@pytest.mark.parametrize("measure", ["nhsic", "energy", "dcor"])
def test_a_unit_measure_on_a_model_without_units_is_a_project_error_saying_what_works(measure):
    model, (inputs, labels) = plain_cnn(), (torch.rand(8, 3, 8, 8), torch.arange(8) % 2)
    with pytest.raises(UnsupportedModelError, match=f"the {measure} measure scores residual units.*entropy .* and pqi"):
        layer_measures(model, (inputs, labels), measure)
    assert layer_measures(model, None, "pqi")  # a measure that works on any model
