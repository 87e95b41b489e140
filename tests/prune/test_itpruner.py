"""ITPruner on the digits ResNet: widths under the budget, a rebuildable result, a rebuild that ignores widths refused."""

from __future__ import annotations

import pytest
import torch

from egp_export.demo.digits import digits_resnet
from egp_export.measures import model_macs
from egp_export.prune.itpruner import prune_itpruner
from egp_export.prune.outcome import PRUNED_CHECKPOINT, rebuild
from tests.measures.subjects import digits_data, one_thread, trained_digits


@pytest.fixture(scope="module")
def itpruner_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("itpruner")
    data = digits_data()
    with one_thread():
        outcome = prune_itpruner(trained_digits(), data["fit"], data["val"], rebuild=digits_resnet, flops_ratio=0.4,
                                 epochs=4, batch_size=64, out_dir=out)
    return out, outcome


def test_widths_meet_the_budget_and_train(itpruner_run):
    _, outcome = itpruner_run
    details = outcome.details
    assert details["macs"] <= details["macs_budget"] == pytest.approx(0.4 * details["macs_dense"])
    assert model_macs(outcome.model, torch.zeros(1, 1, 8, 8)) == details["macs"]
    assert all(width % 8 == 0 for width in details["hidden_widths"].values())
    assert outcome.accuracy > 0.85


def test_checkpoint_rebuilds_from_the_recorded_widths(itpruner_run):
    out, outcome = itpruner_run
    loaded = rebuild(digits_resnet, out / PRUNED_CHECKPOINT)
    inputs = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), outcome.model(inputs))


def test_a_rebuild_that_ignores_the_widths_is_refused():
    data = digits_data()

    def ignores(**_kwargs):
        return digits_resnet()

    with pytest.raises(ValueError, match="rebuild must build"):
        prune_itpruner(trained_digits(), data["fit"], data["val"], rebuild=ignores, epochs=0)
    with pytest.raises(ValueError, match="kernel"):
        prune_itpruner(trained_digits(), data["fit"], data["val"], rebuild=digits_resnet, kernel="cosine", epochs=0)
    with pytest.raises(ValueError, match="flops_ratio"):
        prune_itpruner(trained_digits(), data["fit"], data["val"], rebuild=digits_resnet, flops_ratio=0.0)
