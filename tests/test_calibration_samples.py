"""How compile treats the calibration samples themselves: split by a seeded permutation (not the tail of sorted
data), counted once however often they repeat, and never written into by the model."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.analysis.numerics import compare
from egp_export.cli import main as cli
from egp_export.export.onnx import ort_session, run_onnx
from egp_export.records import RefusalCode

# Item 18: a split by a seeded permutation -------------------------------------------------------------------


def _two_class_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def _sorted_by_class(generator_seed: int = 0) -> torch.Tensor:
    """80 samples of class A (near +3) then 20 of class B (near -3), stored in class order like an image folder."""
    noise = 0.1 * torch.randn(100, 4, generator=torch.Generator().manual_seed(generator_seed))
    return torch.cat([3.0 + noise[:80], -3.0 + noise[80:]])


@pytest.mark.parametrize("form", ["tensor", "dataset", "iterable"])
def test_data_sorted_by_class_give_every_part_both_classes(form):
    # Old code: the tail of the data held out class B only and decisions saw class A only, where every neuron is
    # constant: each was rewritten, and the strict check on the B samples refused the compile (the default backed
    # off for no reason).
    data = _sorted_by_class()
    given = {
        "tensor": data,
        "dataset": torch.utils.data.TensorDataset(data, torch.arange(100) >= 80),
        "iterable": list(data.split(10)),
    }[form]

    result = egp_export.compile(_two_class_mlp(), given, strict=True, min_observations=1)

    split = result.split
    for part in (split.decide, split.holdout):
        assert (part < 80).any() and (part >= 80).any()
    assert sorted([*split.decide.tolist(), *split.validate.tolist(), *split.holdout.tolist()]) == list(range(100))
    assert result.report["calibration"]["split_seed"] == 0 and "seeded with 0" in result.report["guarantee"]["split"]
    fresh = torch.cat([3.0 + 0.1 * torch.randn(8, 4), -3.0 + 0.1 * torch.randn(8, 4)])
    with torch.no_grad():
        assert compare(_two_class_mlp()(fresh), result.module(fresh)).within(1e-5)
    default = egp_export.compile(_two_class_mlp(), given, min_observations=1)
    assert default.report["withdrawals"] == []  # nothing to back off from


def test_the_split_seed_chooses_the_split_and_the_same_seed_the_same_split():
    data = _sorted_by_class()
    seeded = {seed: egp_export.compile(_two_class_mlp(), data, split_seed=seed, min_observations=1) for seed in (0, 5)}
    assert not torch.equal(seeded[0].split.holdout, seeded[5].split.holdout)
    again = egp_export.compile(_two_class_mlp(), data, min_observations=1)
    assert torch.equal(seeded[0].split.holdout, again.split.holdout) and torch.equal(seeded[0].split.decide, again.split.decide)
    assert seeded[5].report["calibration"]["split_seed"] == 5 and seeded[5].split.seed == 5


def test_the_cli_checks_onnx_on_the_compiles_held_out_samples_and_plans_on_its_decide_samples(tmp_path, monkeypatch):
    from egp_export import padding
    from egp_export.export import onnx as onnx_export

    data = _sorted_by_class()
    path = tmp_path / "data.npy"
    np.save(path, data.numpy())
    seen: dict = {}
    real_export, real_plan = onnx_export.export_onnx, padding.padding_plan

    def export(module, example, target, **kwargs):
        seen.setdefault("verify", torch.cat(list(kwargs["verify_inputs"])))
        return real_export(module, example, target, **kwargs)

    def plan(model, calibration, options=None, **kwargs):
        # The plan runs the compile's own stages with its options: the same seeded split decides.
        split = split_holdout(as_batches(calibration), options.holdout, options.validation, seed=options.split_seed)
        seen["decide"] = torch.cat(list(split.calibrate))
        return real_plan(model, calibration, options, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx", export)
    monkeypatch.setattr(padding, "padding_plan", plan)
    code = cli.main([
        "compile", "--arch", "tests.test_calibration_samples:_two_class_mlp", "--calibration", str(path),
        "--out", str(tmp_path / "out"), "--split-seed", "3", "--padding-plan", "--min-observations", "1", "--quiet",
    ])

    assert code == 0
    expected = split_holdout(as_batches(data), 0.2, 0.2, seed=3)
    assert torch.equal(seen["verify"], data[expected.holdout.indices])
    assert torch.equal(seen["decide"], data[expected.calibrate.indices])
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["calibration"]["split_seed"] == 3 and "split by a permutation seeded with 3" in (
        tmp_path / "out" / "report.md"
    ).read_text()


# Item 5: duplicated samples are one sample of evidence ------------------------------------------------------


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        net[0].weight.fill_(1.0 / 9)
        net[0].bias.zero_()
    return net.eval()


def _images(levels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Images of one level each (plus a little noise): the ReLU's input has the level's sign everywhere."""
    noise = 0.05 * torch.randn(len(levels), 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    return levels[:, None, None, None] + noise


def test_one_sample_repeated_a_thousand_times_is_one_sample_of_evidence():
    # Old code: 600 decide copies x 36 positions = 21,600 "observations", the ReLU (ON everywhere on that one
    # image) became the identity, the held-out copies "verified" it, and the model was wrong on other images.
    one = _images(torch.tensor([1.5]))
    data = one.expand(1000, -1, -1, -1).clone()

    with pytest.warns(UserWarning, match="only 1 of the 600 samples decided on are distinct"):
        result = egp_export.compile(_conv_net(), data)

    report = result.report
    assert report["activations_linearized"] == 0 and report["evidence"] == []
    (refusal,) = [r for r in report["refusals"] if r["code"] == RefusalCode.THIN_EVIDENCE.value]
    assert refusal["detail"]["observations"] == 36 and refusal["detail"]["samples"] == 1
    assert "599 duplicated samples not counted" in refusal["reason"]
    assert report["calibration"]["distinct_decide_samples"] == 1 and report["calibration"]["distinct_holdout_samples"] == 1
    assert report["guarantee"]["verified_new_samples"] == 0 and report["guarantee"]["decided_on_distinct_samples"] == 1
    assert any("only 1 of the 600 samples decided on are distinct" in note for note in report["verification"]["notes"])
    fresh = _images(torch.randn(32, generator=torch.Generator().manual_seed(9)), seed=9)
    with torch.no_grad():
        assert compare(_conv_net()(fresh), result.module(fresh)).within(1e-5)


def test_evidence_and_new_held_out_samples_count_distinct_samples():
    levels = 1.0 + torch.rand(50, generator=torch.Generator().manual_seed(1))
    distinct = _images(levels)
    data = torch.cat([distinct, distinct])  # sample i and i + 50 are the same image
    identity = torch.arange(100) % 50

    with pytest.warns(UserWarning, match="only 8 of the 20 held-out samples are distinct and not among the samples"):
        result = egp_export.compile(_conv_net(), data, min_observations=1)

    split = result.split
    decided, held = set(identity[split.decide].tolist()), set(identity[split.holdout].tolist())
    calibration, guarantee = result.report["calibration"], result.report["guarantee"]
    assert calibration["distinct_decide_samples"] == len(decided) < len(split.decide)
    assert calibration["distinct_holdout_samples"] == len(held)
    assert guarantee["verified_new_samples"] == len(held - decided) < len(split.holdout)
    (evidence,) = result.report["evidence"]
    assert evidence["samples"] == len(split.decide) and evidence["distinct_samples"] == len(decided)
    assert evidence["observations_per_neuron"] == 36 * len(decided)
    assert evidence["crossing_rate_bound_95"] == pytest.approx(3 / (36 * len(decided)))
    # Distinct data: no warning, no note.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = egp_export.compile(_conv_net(), _images(1.0 + torch.rand(100)), min_observations=1)
    assert clean.report["verification"]["notes"] == []
    assert clean.report["guarantee"]["verified_new_samples"] == len(clean.split.holdout)


# Item 7: the model never writes into the caller's data -----------------------------------------------------


class NormalisesInPlace(nn.Module):
    """Normalises its input in place before a conv net (what some preprocessing-in-forward models do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("mean", torch.tensor(3.0))
        self.register_buffer("std", torch.tensor(2.0))
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
        with torch.no_grad():
            self.net[0].bias[:3] = -50.0  # dead channels: a rewrite the compile makes

    def forward(self, x):
        x.sub_(self.mean).div_(self.std)
        return self.net(x)


def _raw_images(n: int, seed: int) -> torch.Tensor:
    return 3.0 + 2.0 * torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def _reference(inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return NormalisesInPlace().eval()(inputs.clone())


@pytest.mark.parametrize("debug", [False, True])
def test_a_model_normalising_its_input_in_place_compiles_and_leaves_the_data_as_it_was(tmp_path, debug):
    # Old code: batches were views of the caller's tensor, which the model changed (sample values moved by the
    # normalisation, again on every run), and the second of two runs on one batch saw other inputs: the compile was
    # refused as "not deterministic".
    data = _raw_images(120, seed=1)
    kept = data.clone()

    result = egp_export.compile(NormalisesInPlace().eval(), data, min_observations=1, debug=debug)
    assert torch.equal(data, kept)
    assert any(r["kind"] == "dead_masked" for r in result.report["rewrites"])
    fresh = _raw_images(32, seed=7)
    with torch.no_grad():
        assert compare(_reference(fresh), result.module(fresh.clone())).within(1e-5)

    exported = egp_export.export_onnx(result.module, data[:2], tmp_path / "model.onnx", verify_inputs=data[:50])
    assert torch.equal(data, kept)
    onnx_outputs = run_onnx(ort_session(exported.path.read_bytes()), fresh)
    assert compare(_reference(fresh), onnx_outputs).within(1e-5)
    egp_export.analyze(NormalisesInPlace().eval(), data)
    assert torch.equal(data, kept)


def test_the_cli_compiles_a_model_normalising_its_input_in_place(tmp_path):
    path = tmp_path / "data.pt"
    torch.save(_raw_images(120, seed=1), path)
    code = cli.main([
        "compile", "--arch", "tests.test_calibration_samples:NormalisesInPlace", "--calibration", str(path),
        "--out", str(tmp_path / "out"), "--min-observations", "1", "--quiet",
    ])
    assert code == 0
    outputs = run_onnx(ort_session((tmp_path / "out" / "model.onnx").read_bytes()), _raw_images(16, seed=3))
    assert compare(_reference(_raw_images(16, seed=3)), outputs).within(1e-5)
