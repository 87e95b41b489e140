"""The gate, profile and engine check on real inputs (--inputs) against random ones, and the top-1 agreement.

A compile linearizes the activations that never change region on the calibration data; it is exact there and may
be far off elsewhere. The models here make that sharp: an image classifier whose ReLUs are always on for pixels in
[0, 1] (and not for N(0, 1) noise), and a token model whose embedding rows the calibration ids use are positive
(the others negative). Each is compiled for real once per module.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import egp_export
from egp_export.cli.perf import main
from egp_export.export.onnx import export_onnx
from egp_export.runtime.backends import BackendError
from egp_export.runtime.engines import verify_engine
from egp_export.runtime.gate import EXIT_FAILED, check_numerics, gate, to_junit_xml, to_markdown
from egp_export.runtime.profiler import profile

FAST = ["--rounds", "3", "--iterations", "3", "--warmup", "1"]
FAST_KW = {"rounds": 3, "iterations": 3, "warmup": 1}
CLASSES = 10
VOCABULARY, USED_IDS, TOKENS = 50, 20, 6


def _image_classifier() -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES),
    )  # fmt: skip
    with torch.no_grad():
        for conv in (net[0], net[2]):  # positive weights and bias: always on for inputs in [0, 1]
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator).abs() * 0.3)
            conv.bias.fill_(0.05)
        net[6].weight.copy_(torch.randn(CLASSES, 8, generator=generator))
    return net.eval()


class TokenClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.embed = nn.Embedding(VOCABULARY, 8)
        self.head = nn.Linear(8, CLASSES)
        with torch.no_grad():
            table = torch.randn(VOCABULARY, 8, generator=generator).abs() + 0.1
            table[USED_IDS:] *= -1  # ids the calibration never uses: negative, so the ReLU is off there
            self.embed.weight.copy_(table)
            self.head.weight.copy_(torch.randn(CLASSES, 8, generator=generator))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(ids)).mean(1))


def _compile_and_export(model: nn.Module, calibration: torch.Tensor, folder) -> dict:
    result = egp_export.compile(model, calibration)
    assert result.report["activations_linearized"] >= 1  # what makes random inputs wrong
    example = calibration[:2]
    return {
        name: export_onnx(module, example, folder / f"{name}.onnx", exporter="torchscript").path
        for name, module in (("original", model), ("compiled", result.module))
    }


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    generator = torch.Generator().manual_seed(2)
    pixels = torch.randint(0, 256, (96, 3, 8, 8), generator=generator, dtype=torch.uint8)
    calibration, held_out = pixels[:64].float() / 255, pixels[64:]
    paths = _compile_and_export(_image_classifier(), calibration, folder)
    np.save(folder / "held_out.npy", held_out.float().numpy() / 255)
    np.save(folder / "held_out_uint8.npy", held_out.numpy())  # the same pixels, as stored by an image pipeline
    return {**paths, "held_out": folder / "held_out.npy", "held_out_uint8": folder / "held_out_uint8.npy"}


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, USED_IDS, (160, TOKENS), generator=generator)
    paths = _compile_and_export(TokenClassifier().eval(), ids[:128], folder)
    np.save(folder / "held_out.npy", ids[128:].numpy().astype(np.int32))  # int32 on disk: widened for the model
    np.save(folder / "outside.npy", np.full((4, TOKENS), VOCABULARY, dtype=np.int64))
    return {**paths, "held_out": folder / "held_out.npy", "outside": folder / "outside.npy"}


# A correct compile on its held-out data, and on random inputs -------------------------------------------------


def test_a_correct_compile_passes_on_held_out_data_and_random_inputs_say_they_are_not_real(images):
    held_out = torch.from_numpy(np.load(images["held_out"]))

    real = gate(images["original"], images["compiled"], min_speedup=0.01, max_rel_error=1e-5, min_top1_agreement=1.0,
                inputs=held_out, inputs_source="held_out.npy", **FAST_KW)  # fmt: skip
    random = gate(images["original"], images["compiled"], min_speedup=0.01, max_rel_error=1e-5, **FAST_KW)

    assert real.passed and real.numeric.real_data and real.numeric.samples == 32
    assert real.numeric.error.top1_agreement == 1.0 and real.numeric.error.cosine_min > 0.999999
    assert "top-1 agreement 100.00% ≥ required 100.00%" in real.verdict() and "32 samples of held_out.npy" in real.verdict()
    assert real.comparison.inputs == "held_out.npy"
    assert not random.passed and random.exit_code == EXIT_FAILED and not random.numeric.real_data
    assert "8 random samples of N(0, 1) (not real data: give --inputs)" in random.verdict()
    assert random.comparison.inputs == "random N(0, 1)"
    assert "not real data" in to_markdown(random) and "random inputs, not real data" in to_markdown(random)
    assert 'name="real_data" value="False"' in to_junit_xml(random)


def test_random_inputs_in_the_data_range_pass_and_still_say_they_are_random(images):
    check = check_numerics(images["original"], images["compiled"], max_rel_error=1e-5, val_range=(0.0, 1.0))

    assert check.passed and not check.real_data
    assert check.origin.describe() == "8 random samples of uniform [0, 1) (not real data: give --inputs)"


def test_the_cli_gate_on_inputs_passes_and_on_random_inputs_fails_saying_so(images, tmp_path, capsys):
    report = tmp_path / "gate.json"
    code = main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "0.01",
                 "--max-rel-error", "1e-5", "--inputs", str(images["held_out"]), "--json", str(report), *FAST])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "numerics: top-1 agreement 100.00% on 32 samples" in out
    numeric = json.loads(report.read_text())["numeric"]
    assert numeric["real_data"] and numeric["inputs"]["source"] == str(images["held_out"])
    assert numeric["error"]["top1_agreement"] == 1.0

    code = main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "0.01",
                 "--max-rel-error", "1e-5", "--json", str(report), "--force", *FAST])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 1
    assert "not real data" in out.strip().splitlines()[-1]
    numeric = json.loads(report.read_text())["numeric"]
    assert numeric["real_data"] is False and numeric["inputs"]["source"] == "random"


def test_uint8_inputs_are_read_as_pixels_like_the_float_ones(images):
    floats = check_numerics(images["original"], images["compiled"], max_rel_error=1e-5,
                            inputs=np.load(images["held_out"]), inputs_source="floats")  # fmt: skip
    pixels = check_numerics(images["original"], images["compiled"], max_rel_error=1e-5,
                            inputs=np.load(images["held_out_uint8"]), inputs_source="uint8")  # fmt: skip

    assert pixels.passed and pixels.error == floats.error
    assert any("uint8 data divided by 255" in note for note in pixels.notes)


# --min-top1-agreement ------------------------------------------------------------------------------------------


def test_min_top1_agreement_fails_the_gate_where_predictions_change(images, capsys):
    code = main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "0.01",
                 "--min-top1-agreement", "0.99", *FAST])  # fmt: skip
    out = capsys.readouterr().out
    assert code == EXIT_FAILED
    assert "why: the candidate predicts the baseline's class (top-1) on" in out and "below the required 99.00%" in out

    code = main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "0.01",
                 "--min-top1-agreement", "0.99", "--inputs", str(images["held_out"]), *FAST])  # fmt: skip
    assert code == 0, capsys.readouterr().out


def test_min_top1_agreement_on_a_model_without_class_scores_is_a_usage_error(tmp_path, capsys):
    from tests.perf_models import export_model

    deep, shallow = export_model("deep", tmp_path), export_model("shallow", tmp_path)  # [B, 8, 16, 16] feature maps
    code = main(["gate", str(deep), str(shallow), "--min-speedup", "0.01", "--min-top1-agreement", "0.9", *FAST])
    captured = capsys.readouterr()
    assert code == 2 and "no class-score output" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_min_top1_agreement_is_a_fraction(images, value, capsys):
    with pytest.raises(SystemExit):
        main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "1",
              "--min-top1-agreement", value])  # fmt: skip
    assert "fraction in [0, 1]" in capsys.readouterr().err


# Token ids -----------------------------------------------------------------------------------------------------


def test_a_token_model_passes_on_its_ids_and_random_ids_are_drawn_from_the_whole_vocabulary(tokens, capsys):
    code = main(["gate", str(tokens["original"]), str(tokens["compiled"]), "--min-speedup", "0.01",
                 "--max-rel-error", "1e-5", "--inputs", str(tokens["held_out"]), *FAST])  # fmt: skip
    assert code == 0, capsys.readouterr().out

    code = main(["gate", str(tokens["original"]), str(tokens["compiled"]), "--min-speedup", "0.01",
                 "--max-rel-error", "1e-5", *FAST])  # fmt: skip
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == EXIT_FAILED
    assert "random samples of integers in [0, 50), the embedding table's rows (not real data" in verdict


def test_random_ids_can_be_limited_to_a_range_and_ids_outside_the_vocabulary_are_refused(tokens, capsys):
    check = check_numerics(tokens["original"], tokens["compiled"], max_rel_error=1e-5, val_range=(0, USED_IDS))
    assert check.passed and "integers in [0, 20)" in check.origin.describe()

    code = main(["gate", str(tokens["original"]), str(tokens["compiled"]), "--min-speedup", "0.01",
                 "--max-rel-error", "1e-5", "--inputs", str(tokens["outside"]), *FAST])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "outside [0, 50)" in err and "Traceback" not in err


# Several inputs, profile and the engine check -------------------------------------------------------------------


def test_a_batch_of_one_named_input_is_used_and_two_inputs_for_a_one_input_model_are_refused(images):
    held_out = torch.from_numpy(np.load(images["held_out"]))
    check = check_numerics(images["original"], images["compiled"], max_rel_error=1e-5, inputs={"pixel_values": held_out})
    assert check.passed and check.samples == 32

    with pytest.raises(BackendError, match="holds a dict of 2 inputs .*takes one input"):
        check_numerics(images["original"], images["compiled"], max_rel_error=1e-5,
                       inputs={"pixel_values": held_out, "mask": held_out})  # fmt: skip
    with pytest.raises(BackendError, match=r"samples of shape \(3, 4, 4\); the model's input"):
        check_numerics(images["original"], images["compiled"], max_rel_error=1e-5, inputs=held_out[:, :, :4, :4])


def test_profile_times_the_given_inputs_and_needs_enough_of_them(images, capsys):
    result = profile(images["compiled"], batch_sizes=(1, 4), iterations=3, warmup=1,
                     inputs=np.load(images["held_out"]), inputs_source="held_out.npy")  # fmt: skip
    assert result.inputs == "held_out.npy" and result.to_dict()["inputs"] == "held_out.npy"
    assert "inputs: held_out.npy" in result.to_markdown()

    code = main(["profile", str(images["compiled"]), "--batch-size", "64", "--iterations", "2",
                 "--inputs", str(images["held_out"])])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "holds 32 samples, fewer than batch size 64" in err


def test_the_engine_check_runs_on_the_given_inputs(images):
    """verify_engine with ONNX Runtime standing in for TensorRT (which is not installed here)."""
    held_out = np.load(images["held_out"])
    error, origin = verify_engine(images["original"], images["compiled"], runtime="ort-cpu", batch_size=8,
                                  inputs=held_out, inputs_source="held_out.npy")  # fmt: skip
    assert origin.real and origin.samples == 32 and error.top1_agreement == 1.0 and error.within(1e-5)

    error, origin = verify_engine(images["original"], images["compiled"], runtime="ort-cpu", batch_size=8)
    assert not origin.real and not error.within(1e-5)


# Options that would be ignored are refused ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--val-range", "0", "1", "--inputs", "X"], "--val-range draws random inputs"),
        (["--val-range", "1", "0"], "LOW < HIGH"),
        (["--preset", "imagenet"], "no --inputs was given"),
        (["--inputs-limit", "3"], "no --inputs was given"),
        (["--inputs", "X", "--preset", "timm"], "--preset timm reads timm's data config from the model"),
    ],
)
def test_options_that_would_be_ignored_are_refused(images, extra, message, capsys):
    extra = [str(images["held_out"]) if item == "X" else item for item in extra]
    code = main(["gate", str(images["original"]), str(images["compiled"]), "--min-speedup", "1", *extra, *FAST])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_engine_and_profile_take_the_input_options(images, capsys):
    code = main(["engine", str(images["compiled"]), "--out", "never.engine", "--val-range", "1", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "LOW < HIGH" in err  # refused before TensorRT is looked for

    code = main(["profile", str(images["compiled"]), "--iterations", "2", "--warmup", "0", "--val-range", "0", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "inputs: random uniform [0, 1)" in out


def test_a_fixed_batch_model_is_checked_on_whole_batches_of_the_inputs(images, tmp_path):
    held_out = np.load(images["held_out"])
    fixed = export_onnx(_image_classifier(), torch.from_numpy(held_out[:4]), tmp_path / "fixed.onnx",
                        exporter="torchscript", dynamic_batch=False).path  # fmt: skip

    check = check_numerics(fixed, fixed, max_rel_error=0.0, inputs=held_out[:30], inputs_source="held_out.npy")

    assert check.passed and check.samples == 28
    assert any("the last 2 samples are not checked" in note for note in check.notes)
    with pytest.raises(BackendError, match="fixed batch size is 4"):
        check_numerics(fixed, fixed, max_rel_error=0.0, inputs=held_out[:3])


def test_without_a_threshold_the_check_is_reported_and_only_a_nonfinite_mismatch_fails_it():
    from egp_export.analysis.numerics import ErrorStats
    from egp_export.runtime.gate import NumericCheck, evaluate
    from tests.runtime.test_gate import fake_comparison

    reported = NumericCheck(error=ErrorStats(max_abs=0.5, max_rel=0.5), max_rel_error=None, samples=4)
    broken = NumericCheck(error=ErrorStats(max_abs=np.inf, max_rel=np.inf, nonfinite_mismatches=3, first_bad_sample=1),
                          max_rel_error=None, samples=4)  # fmt: skip

    assert evaluate(fake_comparison(2.0, (1.9, 2.1)), 1.0, reported).passed
    failed = evaluate(fake_comparison(2.0, (1.9, 2.1)), 1.0, broken)
    assert not failed.passed and "3 output values are inf/NaN" in failed.reasons[0]
