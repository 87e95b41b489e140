"""Energy-statistics block removal on the digits ResNet: which units go, and a result that rebuilds from kwargs."""

from __future__ import annotations

import pytest
import torch

from egp_export.demo.digits import digits_resnet
from egp_export.measures.units import residual_units
from egp_export.prune.blocks import prune_energy, units_to_remove
from egp_export.prune.outcome import PRUNED_CHECKPOINT, rebuild
from tests.measures.subjects import digits_data, one_thread, trained_digits


def test_each_group_keeps_its_first_unit():
    scores = {"a": 1.0, "b": 5.0, "c": 1.1, "d": 5.2, "e": 9.0}
    assert units_to_remove(scores, 3) == ["c", "d"]
    assert units_to_remove(scores, 5) == []
    assert units_to_remove(scores, 1) == ["b", "c", "d", "e"]


@pytest.fixture(scope="module")
def energy_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("energy")
    data = digits_data()
    with one_thread():
        outcome = prune_energy(trained_digits(), data["fit"], data["val"], stages=2, groups=(3, 2), rounds=2,
                               samples=128, epochs=2, batch_size=64, out_dir=out)
    return out, outcome


def test_two_stages_remove_units_and_keep_accuracy(energy_run):
    _, outcome = energy_run
    assert [len(record.get("removed", [])) for record in outcome.history] == [0, 1, 1]
    removed = outcome.arch_kwargs["removed_blocks"]
    assert len(removed) == 2 and [unit.name for unit in residual_units(outcome.model)] == outcome.history[-1]["units"]
    assert outcome.accuracy > 0.9


def test_checkpoint_rebuilds_without_code_changes(energy_run):
    out, outcome = energy_run
    loaded = rebuild(digits_resnet, out / PRUNED_CHECKPOINT)
    assert len(residual_units(loaded)) == 2
    inputs = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(inputs), outcome.model(inputs))


def test_dcor_score_and_bad_settings():
    data = digits_data()
    with one_thread():
        outcome = prune_energy(trained_digits(), data["fit"], data["val"], score="dcor", groups=3, rounds=1,
                               samples=64, epochs=0)
    assert outcome.method == "dcor" and len(outcome.arch_kwargs["removed_blocks"]) == 1
    with pytest.raises(ValueError, match="score"):
        prune_energy(trained_digits(), data["fit"], data["val"], score="gini")
    with pytest.raises(ValueError, match="groups gives K for 1 stages"):
        prune_energy(trained_digits(), data["fit"], data["val"], stages=2, groups=[2])
    with pytest.raises(ValueError, match="at least 1"):
        prune_energy(trained_digits(), data["fit"], data["val"], groups=0)
