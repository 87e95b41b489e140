"""SAP: one pruning step against the check values, the strict pivot, rewinding, and a digits run that rebuilds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from egp_export.demo.digits import digits_resnet
from egp_export.errors import OutputError
from egp_export.prune.outcome import PRUNED_CHECKPOINT, rebuild
from egp_export.prune.sap import _below_pivot, _rewind, folded, prune_sap, sap_step, sparsity
from tests.measures.subjects import digits_data, one_thread


def linear_with(rows: list[list[float]]) -> nn.Module:
    layer = nn.Linear(len(rows[0]), len(rows), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(rows))
    return nn.Sequential(layer)


def test_one_hot_rows_lose_three_of_four():
    model = linear_with([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    rows = sap_step(model, scope="neuron")
    assert rows[0]["c"] == rows[0]["pruned"] == 6
    assert model[0].weight_mask.tolist() == [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]


def test_ties_with_the_pivot_survive():
    magnitudes = torch.tensor([0.1, 0.1, 0.1, 1.0, 0.05])
    keep = torch.tensor([True, True, True, True, True])
    # c = 2: the pivot is the third smallest (0.1); only 0.05 is strictly below it
    assert _below_pivot(magnitudes, keep, 2).tolist() == [False, False, False, False, True]
    assert _below_pivot(magnitudes, keep, 5).all() and not _below_pivot(magnitudes, keep, 0).any()
    masked = torch.tensor([True, True, True, True, False])
    assert not _below_pivot(magnitudes, masked, 2).any()


def test_layer_and_global_scopes_prune_below_the_pivot():
    weights = [[0.05 * (i + 1) for i in range(10)] + [5.0] * 2]
    model = linear_with(weights)
    rows = sap_step(model, scope="layer")
    assert rows[0]["pruned"] == rows[0]["c"] > 0
    kept = model[0].weight_mask.bool()[0]
    # the pruned ones are the smallest
    assert kept[-2:].all() and not kept[0]
    global_model = nn.Sequential(linear_with(weights)[0], linear_with([[3.0, 0.01, 0.02]])[0])
    rows = sap_step(global_model, scope="global")
    assert rows[0]["layer"] == "(global)"
    assert rows[0]["pruned"] == sum(int((~m.weight_mask.bool()).sum()) for m in global_model)
    with pytest.raises(ValueError, match="scope"):
        sap_step(model, scope="row")


def test_rewind_restores_the_initial_weights_under_the_mask():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    initial = {key: value.detach().clone() for key, value in model.named_parameters()}
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    sap_step(model, beta=0.5)
    _rewind(model, initial)
    model(torch.randn(1, 6))
    for index in (0, 2):
        layer = model[index]
        assert torch.equal(layer.weight, initial[f"{index}.weight"] * layer.weight_mask)
        assert torch.equal(layer.bias, initial[f"{index}.bias"])


@pytest.fixture(scope="module")
def sap_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sap")
    data = digits_data()
    torch.manual_seed(0)
    with one_thread():
        outcome = prune_sap(digits_resnet(), data["fit"], data["val"], iterations=2, epochs=4, batch_size=64,
                            out_dir=out)
    return out, outcome


def test_digits_run_prunes_more_each_iteration_and_keeps_accuracy(sap_run):
    _, outcome = sap_run
    sparsities = [record["sparsity"] for record in outcome.history]
    assert sparsities[0] == 0.0 and sparsities[0] < sparsities[1] < sparsities[2]
    assert outcome.details["sparsity"] == sparsities[-1]
    assert outcome.dense_accuracy > 0.9 and outcome.accuracy > 0.85
    # the result has plain weights, its pruned entries zero
    assert not any(hasattr(module, "weight_mask") for module in outcome.model.modules())
    zeros = sum(int((m.weight == 0).sum()) for m in outcome.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    total = sum(m.weight.numel() for m in outcome.model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert zeros / total == pytest.approx(sparsities[-1])
    x_test, y_test = digits_data()["test"]
    with torch.no_grad():
        assert float((outcome.model(x_test).argmax(1) == y_test).double().mean()) > 0.85


def test_checkpoint_rebuilds_and_outputs_are_guarded(sap_run):
    out, outcome = sap_run
    loaded = rebuild(digits_resnet, out / PRUNED_CHECKPOINT)
    inputs = digits_data()["test"][0][:32]
    with torch.no_grad():
        assert torch.equal(loaded(inputs), outcome.model(inputs))
    with pytest.raises(OutputError):
        prune_sap(digits_resnet(), digits_data()["fit"], digits_data()["val"], iterations=0, epochs=0, out_dir=out)


def test_bad_settings_are_refused():
    data = digits_data()
    with pytest.raises(ValueError, match="rewind"):
        prune_sap(digits_resnet(), data["fit"], data["val"], rewind="late")
    with pytest.raises(ValueError, match="max_accuracy_drop"):
        prune_sap(digits_resnet(), data["fit"], data["val"], max_accuracy_drop=-0.1)
    assert sparsity(folded(digits_resnet())) == 0.0
