"""Verification that cannot be fooled, and a compile that backs off instead of giving up (issue 9).

Each hole the issue reproduced is a test that failed on the code before it:
non-finite outputs, an uncapped noise floor, non-deterministic and stateful
models, fp16/bf16 models, thin evidence, EASIER checkpoints. The back-off
tests check the three-way split: validation withdraws rewrites, the final
check on the verification samples falls back to the data-independent
rewrites, ``strict=True`` keeps failing fast. Numerics are always checked on
FRESH inputs drawn like the calibration data.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_export
from egp_export.analysis.batches import as_batches, split_holdout
from egp_export.analysis.numerics import NOISE_CAP, compare
from egp_export.cli import main as cli
from egp_export.compiler import verification_rtol
from egp_export.errors import ArchitectureError, CalibrationError, CheckpointError, VerificationError
from egp_export.io.checkpoint import apply_identity_sites, read_checkpoint
from egp_export.records import RefusalCode, RewriteKind

FINAL_CHECK_FAILED = RefusalCode.FINAL_CHECK_FAILED.value
LEFT_REGION_ON_VALIDATION = RefusalCode.LEFT_REGION_ON_VALIDATION.value
SURROGATE_OFF_ON_VALIDATION = RefusalCode.SURROGATE_OFF_ON_VALIDATION.value


def _parts(total: int, holdout: float = 0.2, validation: float = 0.2):
    """The sample indices compile's default (seeded) split puts in each part: .decide, .validate, .holdout."""
    return split_holdout(as_batches(torch.zeros(total, 1)), holdout, validation).indices()


def _fresh_like(data: torch.Tensor, n: int = 64, seed: int = 99) -> torch.Tensor:
    """Fresh inputs from the calibration distribution (standard normal, as every test here draws it)."""
    return torch.randn(n, *data.shape[1:], generator=torch.Generator().manual_seed(seed))


def _assert_same_function(model: nn.Module, compiled: nn.Module, inputs: torch.Tensor, rtol: float) -> None:
    with torch.no_grad():
        error = compare(model(inputs), compiled(inputs))
    assert error.within(rtol), error


# Hole 1: non-finite outputs ------------------------------------------------------------------------


class _RareOverflow(nn.Module):
    """fc1 -> ReLU -> fc2 whose neuron 0 only fires when x[0] > 0; its outgoing weight 1e38 overflows to inf
    (and y - y to NaN) when it does."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 6)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(6, 2)
        with torch.no_grad():
            self.fc1.weight[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
            self.fc1.bias[0] = 0.0
            self.fc1.bias[1] = -100.0  # always dead: a dead mask that does not depend on the rare samples
            self.fc2.weight[:, 0] = 1e38

    def forward(self, x):
        y = self.fc2(self.relu(self.fc1(x)))
        return torch.cat([y, y - y], 1)


# Held-out sample 15 of 100 under the default split (the same with or without validation).
_OVERFLOW_SAMPLE = int(_parts(100).holdout[15])


def _overflow_data() -> torch.Tensor:
    # Every sample has x[0] < 0 except verification sample 15 (calibration sample _OVERFLOW_SAMPLE) where x[0] = 10.
    x = torch.randn(100, 4, generator=torch.Generator().manual_seed(3))
    x[:, 0] = -x[:, 0].abs() - 0.1
    x[_OVERFLOW_SAMPLE, 0] = 10.0
    return x


def test_inf_and_nan_in_the_reference_are_an_error_naming_the_sample_in_strict_mode():
    # Old code: compare() mapped inf to 1.8e308 and divided by an infinite scale: max_rel 0, "verified".
    assert _parts(100, validation=0.0).holdout[15] == _OVERFLOW_SAMPLE
    message = rf"inf/NaN .*verification sample 15 \(calibration sample {_OVERFLOW_SAMPLE}\)"
    with pytest.raises(VerificationError, match=message):
        egp_export.compile(_RareOverflow().eval(), _overflow_data(), strict=True, min_observations=1)


def test_inf_in_the_reference_backs_off_to_a_model_with_the_same_inf_and_nan():
    model = _RareOverflow().eval()
    events = []
    result = egp_export.compile(model, _overflow_data(), min_observations=1, on_stage=events.append)

    assert [w["code"] for w in result.report["withdrawals"]] == [FINAL_CHECK_FAILED]
    # The back-off is a stage of its own, followed by a second verification.
    assert [e.stage for e in events if e.done] == [
        "prepare", "capture", "calibrate", "decide", "rewrite", "verify", "back-off", "verify", "report"
    ]
    assert events[-3].facts["max_rel"] == result.report["verification"]["pytorch"]["max_rel"]
    assert result.report["activations_linearized"] == 0
    inputs = _overflow_data()[_parts(100).holdout]
    with torch.no_grad():
        reference, compiled = model(inputs), result.module(inputs)
    assert not torch.isfinite(reference).all()
    # Same inf and NaN at the same places, equal elsewhere: that is the same output.
    assert torch.equal(torch.isnan(reference), torch.isnan(compiled))
    finite = torch.isfinite(reference)
    assert torch.equal(reference[~finite & ~torch.isnan(reference)], compiled[~finite & ~torch.isnan(reference)])
    assert compare(reference, compiled).within(1e-5)


def test_compare_never_calls_nonfinite_values_within_tolerance():
    finite = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for bad in (float("inf"), float("-inf"), float("nan")):
        with_bad = finite.clone()
        with_bad[1, 0] = bad
        for reference, candidate in ((with_bad, finite), (finite, with_bad)):
            error = compare(reference, candidate)
            assert not error.within(1e30) and error.nonfinite_mismatches == 1 and error.first_bad_sample == 1
        assert compare(with_bad, with_bad.clone()).within(0.0)
    assert not compare(torch.tensor([float("inf")]), torch.tensor([float("-inf")])).within(1.0)


# Hole 2: the noise floor -----------------------------------------------------------------------------


def test_noise_floor_is_capped_and_never_covers_approximations():
    assert verification_rtol(1e-5, noise=1e-7) == 1e-5
    assert verification_rtol(1e-5, noise=5e-6) == pytest.approx(4e-5)
    for noise in (0.03, 1.0, float("inf"), float("nan")):  # the ill-conditioned branch, 3e38 calibration values
        assert verification_rtol(1e-5, noise=noise) == NOISE_CAP
        assert verification_rtol(1e-5, noise=noise, approximated=True) == pytest.approx(NOISE_CAP + 1e-5)


class _BorderChain(nn.Module):
    # 3x3 conv -> ReLU that never switches off -> padded 3x3 conv: merges exactly only away from the border.
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight.abs_()
            self.conv1.bias.fill_(0.1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv1(x)))


def test_a_border_approximate_merge_is_not_covered_by_a_large_noise_floor(monkeypatch):
    # Old code: allowed max(tolerance, 1e-5, 8 x noise): with noise 0.03 a 4e-2 border error "verified" at 0.24.
    monkeypatch.setattr("egp_export.stages.fp32_noise", lambda model, batches: 0.03)
    data = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match=r"allowed 0\.00011.*border-approximate"):
        egp_export.compile(_BorderChain().eval(), data, 1e-5, approximate=True)


def test_a_noise_floor_above_1e5_is_noted_in_the_report(monkeypatch):
    monkeypatch.setattr("egp_export.stages.fp32_noise", lambda model, batches: 5e-6)
    data = torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    report = egp_export.compile(_BorderChain().eval(), data, debug=True).report

    assert report["verification"]["pytorch"]["rtol"] == pytest.approx(4e-5)
    assert any("raised the floor for exact rewrites to 4e-05" in note for note in report["verification"]["notes"])


# Determinism, state, dtype -------------------------------------------------------------------------


class _HardcodedDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(F.dropout(x, 0.5, training=True))


def test_a_model_with_different_outputs_for_the_same_input_is_refused():
    # Old code: "verified" at rtol 8.04 (8x the noise of a random model).
    with pytest.raises(VerificationError, match="not deterministic"):
        egp_export.compile(_HardcodedDropout().eval(), torch.randn(64, 4))


class _Counting(nn.Module):
    """Counts its calls in a buffer: compiling must not run (and so change) the caller's object."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 4)
        self.relu = nn.ReLU()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return self.relu(self.fc(x))


def test_a_stateful_model_is_left_untouched():
    model = _Counting().eval()
    state = copy.deepcopy(model.state_dict())
    result = egp_export.compile(model, torch.randn(64, 4), min_observations=1)

    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key  # old code ran the eval-mode model: calls went up
    fresh = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.allclose(result.module(fresh), model.relu(model.fc(fresh)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_are_compiled_in_float32_and_say_so(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    with torch.no_grad():
        model[1].bias.fill_(10.0)
    half = copy.deepcopy(model).to(dtype)
    data = torch.randn(64, 1, 6, 6).to(dtype)

    with pytest.warns(UserWarning, match="compiled and verified in float32"):
        result = egp_export.compile(half, data)

    verification = result.report["verification"]
    assert verification["dtype"] == "float32" and verification["model_dtype"] == str(dtype).removeprefix("torch.")
    assert verification["pytorch"]["rtol"] <= NOISE_CAP and result.report["guarantee"]["dtype"] == "float32"
    assert next(half.parameters()).dtype == dtype  # the caller's model is not converted
    # The compiled module is the float32 function of the half model's weights.
    _assert_same_function(copy.deepcopy(half).float(), result.module, _fresh_like(data.float()), 1e-5)


# Back-off ----------------------------------------------------------------------------------------------


def test_an_untouched_random_resnet18_compiles_and_matches_on_fresh_inputs():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    data = torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    result = egp_export.compile(model, data)  # old code: exit 3, neurons left their region on held-out data

    _assert_same_function(model, result.module, _fresh_like(data, 16), result.report["verification"]["pytorch"]["rtol"])


class _RarelyFiring(nn.Module):
    """Conv -> ReLU where channel 0 fires only on samples with a bright pixel and channel 1 never fires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.conv1.weight[0] = 1.0
            self.conv1.bias[0] = -8.0
            self.conv1.bias[1] = -100.0

    def forward(self, x):
        return self.conv2(self.relu1(self.conv1(x)))


def _rare_data(bright: list[int]) -> torch.Tensor:
    x = 0.3 * torch.randn(100, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    x[bright, 0, 3, 3] = 50.0
    return x


def test_a_rarely_firing_neuron_seen_on_validation_is_kept_and_the_withdrawal_reported():
    model = _RarelyFiring().eval()
    # Channel 0 fires on one validation and one verification sample, never on the decide samples.
    parts = _parts(100)
    result = egp_export.compile(model, _rare_data([int(parts.validate[10]), int(parts.holdout[10])]))

    (withdrawal,) = result.report["withdrawals"]
    assert withdrawal["code"] == LEFT_REGION_ON_VALIDATION and withdrawal["node"] == "relu1"
    detail = withdrawal["detail"]
    assert detail["neurons"] == 1 and detail["neuron_indices"] == [0] and detail["rewrite"] == "dead mask"
    # Channel 1 is still masked as dead: only the neuron that left its region lost its rewrite.
    assert any(
        r["kind"] == RewriteKind.DEAD_MASKED.value and r["detail"]["dead"] == 1 for r in result.report["rewrites"]
    )
    fresh = 0.3 * torch.randn(64, 1, 6, 6)
    fresh[::4, 0, 2, 2] = 50.0
    _assert_same_function(model, result.module, fresh, 1e-5)


def test_strict_fails_where_the_compile_backs_off():
    model = _RarelyFiring().eval()
    data = _rare_data([int(_parts(100).holdout[10])])  # fires only on a verification sample

    with pytest.raises(VerificationError, match="left their region on held-out data at: relu1"):
        egp_export.compile(model, data, strict=True)
    result = egp_export.compile(model, data)
    assert {w["code"] for w in result.report["withdrawals"]} == {FINAL_CHECK_FAILED}
    fresh = 0.3 * torch.randn(64, 1, 6, 6)
    fresh[::4, 0, 2, 2] = 50.0
    _assert_same_function(model, result.module, fresh, 1e-5)


# Evidence ---------------------------------------------------------------------------------------------


def _always_on_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].bias.fill_(100.0)
    return model


def test_a_site_with_thin_evidence_is_not_rewritten_and_the_refusal_says_why():
    # A pooled/linear site sees one observation per sample: 60 decide samples bound the crossing rate at 5%.
    result = egp_export.compile(_always_on_mlp(), torch.randn(100, 4))

    assert result.report["activations_linearized"] == 0
    (refusal,) = [r for r in result.report["refusals"] if r["pass"] == "linearize_activations"]
    assert refusal["code"] == RefusalCode.THIN_EVIDENCE.value
    assert refusal["detail"] == {"observations": 60, "samples": 60, "positions": 1, "min_observations": 500}
    assert "evidence too thin: 60 observations per neuron (60 samples x 1 positions) < min_observations 500" in refusal["reason"]


def test_rewritten_sites_record_their_evidence_and_the_report_states_the_guarantee():
    result = egp_export.compile(_always_on_mlp(), torch.randn(100, 4), min_observations=50)

    assert result.report["activations_linearized"] == 1
    (evidence,) = result.report["evidence"]
    assert evidence["samples"] == 60 and evidence["observations_per_neuron"] == 60
    assert evidence["crossing_rate_bound_95"] == pytest.approx(3 / 60)
    guarantee = result.report["guarantee"]
    assert guarantee["verified_samples"] == 20 and guarantee["dtype"] == "float32"
    assert guarantee["min_observations"] == 50 and guarantee["max_rel"] <= guarantee["allowed"]


# Hole 4: EASIER checkpoints ---------------------------------------------------------------------------


def easier_net() -> nn.Module:
    """conv -> ReLU (relu1, which EASIER replaced by the identity) -> conv -> ReLU -> pool -> fc."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def _identity_model() -> nn.Module:
    model = easier_net().eval()
    model[1] = nn.Identity()
    return model


def _cli_compile(tmp_path, *args, data: torch.Tensor | None = None) -> tuple[int, dict | None]:
    path = tmp_path / "data.pt"
    torch.save(torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(5)) if data is None else data, path)
    out = tmp_path / "out"
    code = cli.main(["compile", *map(str, args), "--calibration", str(path), "--out", str(out), "--quiet"])
    report = json.loads((out / "report.json").read_text()) if code == 0 else None
    return code, report


def _onnx_matches(tmp_path, model: nn.Module) -> None:
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    fresh = torch.randn(16, 1, 8, 8)
    (output,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        assert compare(model(fresh), torch.from_numpy(np.asarray(output))).within(1e-5)


def test_an_easier_checkpoint_compiles_with_its_identity_sites(tmp_path):
    checkpoint = tmp_path / "pruned.pt"
    # The format `egp-export prune --method easier` writes: weights, and the sites it made identities (fx node
    # names: "_1" is the call of the Sequential's module "1").
    torch.save({"state_dict": easier_net().state_dict(), "egp_prune": {"method": "easier", "identity_sites": ["_1"]}},
               checkpoint)

    code, report = _cli_compile(tmp_path, "--arch", "tests.test_verification:easier_net", "--checkpoint", checkpoint)

    assert code == 0
    assert report["before"]["activations"] == 1  # old code compiled both ReLUs: the network before EASIER
    _onnx_matches(tmp_path, _identity_model())


def test_a_whole_pickled_module_is_compiled_as_it_is_without_arch(tmp_path):
    checkpoint = tmp_path / "module.pt"
    torch.save(_identity_model(), checkpoint)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # --unsafe-pickle warns that it runs code from the file
        code, report = _cli_compile(tmp_path, "--checkpoint", checkpoint, "--unsafe-pickle")

    assert code == 0  # old code: --arch was required, and the module was rebuilt from it
    assert report["before"]["activations"] == 1
    _onnx_matches(tmp_path, _identity_model())


def test_identity_sites_the_model_lacks_and_a_missing_arch_are_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such call sites"):
        apply_identity_sites(easier_net().eval(), ["relu_that_is_not_there"])
    checkpoint = tmp_path / "bad.pt"
    torch.save({"state_dict": easier_net().state_dict(), "egp_prune": {"identity_sites": "_1"}}, checkpoint)
    with pytest.raises(CheckpointError, match="not a list of call-site names"):
        read_checkpoint(checkpoint)
    with pytest.raises(ArchitectureError, match="--arch is required"):
        cli._load_model(cli.build_parser().parse_args(["compile", "--calibration", "x", "--out", str(tmp_path)]))


def test_the_cli_backs_off_where_strict_fails(tmp_path):
    # Near-zero images (distinct: repeated ones are no evidence) but for 40 near one, the verification samples:
    # every neuron is constant on the decide and validation samples and moves on the verification ones. --strict
    # exits 3 (tests/cli); the default withdraws the statistical rewrites.
    data = 1e-3 * torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    data[_parts(200).holdout] += 1.0
    code, report = _cli_compile(tmp_path, "--arch", "tests.test_verification:easier_net", data=data)

    assert code == 0
    assert {w["code"] for w in report["withdrawals"]} == {FINAL_CHECK_FAILED}
    assert report["activations_linearized"] == 0
    code, _ = _cli_compile(tmp_path, "--arch", "tests.test_verification:easier_net", "--strict", "--force", data=data)
    assert code == 3


@pytest.mark.slow
def test_squeeze_excitation_sites_on_thin_evidence_are_not_rewritten():
    # timm's mobilenetv3 with random weights: its SE sites see one value per sample. Old code rewrote them on
    # 38 samples and the compiled model differed from the original by ~1e-3 on held-out and fresh inputs.
    timm = pytest.importorskip("timm")
    from egp_export.testing import recalibrate_batchnorm

    torch.manual_seed(0)
    model = recalibrate_batchnorm(timm.create_model("mobilenetv3_small_050", num_classes=10), (3, 64, 64))
    data = torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    result = egp_export.compile(model, data)

    thin = [r for r in result.report["refusals"] if r["code"] == RefusalCode.THIN_EVIDENCE.value]
    assert thin and all("se" in r["node"] for r in thin)
    _assert_same_function(model, result.module, _fresh_like(data), result.report["verification"]["pytorch"]["rtol"])


def test_a_surrogate_off_on_the_validation_range_is_withdrawn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    # GELU inputs in [5, 10] on the decide samples (GELU ~ identity there), in [0, 1] on the validation ones.
    data = 5.0 + 5.0 * torch.rand(100, 1, generator=torch.Generator().manual_seed(0))
    data[_parts(100).validate] -= 5.0

    result = egp_export.compile(model, data, min_observations=1)

    (withdrawal,) = result.report["withdrawals"]
    assert withdrawal["code"] == SURROGATE_OFF_ON_VALIDATION and withdrawal["node"] == "_1"
    assert withdrawal["detail"]["error"] > withdrawal["detail"]["allowed"]
    assert result.report["activations_linearized"] == 0
    _assert_same_function(model, result.module, torch.linspace(-1.0, 10.0, 64)[:, None], 1e-5)


def test_a_negative_min_observations_is_refused():
    with pytest.raises(CalibrationError, match="min_observations must be >= 0"):
        egp_export.compile(_always_on_mlp(), torch.randn(100, 4), min_observations=-1)


def test_the_error_over_batches_equals_the_error_of_the_whole():
    from egp_export.analysis.numerics import ErrorAccumulator

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(20, 5, generator=generator) * torch.linspace(0.1, 3.0, 20)[:, None]
    candidate = reference + 1e-4 * torch.randn(20, 5, generator=generator)
    errors = ErrorAccumulator()
    for start in range(0, 20, 6):
        errors.add(reference[start : start + 6], candidate[start : start + 6])
    assert errors.result() == compare(reference, candidate)
    candidate[13, 2] = float("nan")  # the sample index counts from the first batch
    errors = ErrorAccumulator()
    for start in range(0, 20, 6):
        errors.add(reference[start : start + 6], candidate[start : start + 6])
    assert errors.result().first_bad_sample == 13 and not errors.result().within(1.0)
