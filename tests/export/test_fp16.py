"""fp16 ONNX output: nodes beyond fp16's range stay fp32 (listed), the file is checked on held-out samples within
the reference's own fp16 noise, with top-1 agreement; without the guard an overflowing model gives inf."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto

import egp_export
from egp_export.analysis.numerics import compare
from egp_export.errors import ExportError, VerificationError
from egp_export.export import fp16
from egp_export.export.onnx import export_onnx, ort_session, run_onnx

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")


def _overflowing() -> nn.Module:
    """BatchNorm scale 3e6 folds into the first conv (weights ~4e5); a 1e-4 conv brings the activations back."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, eps=1e-6), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    ).eval()
    with torch.no_grad():
        net[1].weight.fill_(3e3)
        net[1].running_var.fill_(1e-6)
        net[3].weight.mul_(1e-4)
    return net


def _images(samples: int, seed: int) -> torch.Tensor:
    return torch.randn(samples, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """The compiled overflowing model, its decide and held-out samples, and its fp32 ONNX file."""
    model, data = _overflowing(), _images(300, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, data)
    decide, held = data.index_select(0, result.split.decide), data.index_select(0, result.split.holdout)
    path = tmp_path_factory.mktemp("fp16") / "fp32.onnx"
    export_onnx(result.module, data[:1], path, verify_inputs=[held], exporter="torchscript")
    return model, result.module, decide, held, path.read_bytes()


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_merged_weights_beyond_fp16_stay_fp32_are_listed_and_verify(overflowing, tmp_path, exporter):
    model, compiled, decide, held, _ = overflowing
    assert max(float(p.abs().max()) for p in compiled.parameters()) > fp16.FP16_MAX  # the merge made them so
    path = tmp_path / "model.onnx"
    result = export_onnx(compiled, decide[:1], path, verify_inputs=[held], exporter=exporter, dtype="fp16",
                         range_inputs=decide)

    kept = {(k.op_type, k.reason) for k in result.fp16.kept_fp32}
    assert kept == {("Conv", fp16.KeepReason.WEIGHTS), ("Relu", fp16.KeepReason.ACTIVATIONS),
                    ("Conv", fp16.KeepReason.ACTIVATIONS)}, result.fp16.kept_fp32
    assert "weights up to 4.07e+05" in result.fp16.kept_fp32[0].describe()
    written = onnx.load(path)
    types = {t.name: t.data_type for t in written.graph.initializer}
    assert TensorProto.FLOAT16 in types.values() and TensorProto.FLOAT in types.values()  # fp16 but where kept
    assert [i.type.tensor_type.elem_type for i in written.graph.input] == [TensorProto.FLOAT]
    assert result.dtype == "fp16" and result.fp16.error.within(result.fp16.rtol)
    assert result.fp16.top1_agreement == {"output": 1.0}
    report = result.to_dict()["fp16"]
    assert report["kept_fp32"][0]["reason"] == "weights" and report["noise_factor"] == 8.0
    # Fresh inputs drawn like the calibration data, on the file as written, against the original model.
    fresh = _images(40, 7)
    with torch.no_grad():
        error = compare(model(fresh), run_onnx(ort_session(path), fresh))
    assert error.within(result.fp16.rtol), error


def test_without_the_guard_the_overflowing_model_gives_inf(overflowing):
    model, compiled, decide, held, fp32 = overflowing
    bare = fp16.convert(fp16._named(onnx.load_from_string(fp32)), kept=[])
    session = ort_session(fp16.emulation(bare).SerializeToString())
    assert not np.isfinite(run_onnx(session, held)[0]).all()
    # ONNX Runtime CPU runs the fp16 file in fp32 (no fp16 kernels): no inf there, but the weights clipped at 65504
    # give a wrong model; the emulation is what shows the overflow.
    with torch.no_grad():
        wrong = compare(compiled(held), run_onnx(ort_session(bare.SerializeToString()), held))
    assert wrong.max_rel > 0.1
    with pytest.raises(VerificationError, match="non-finite"):
        fp16._compare(fp16.emulation(bare), compiled, [held])


def test_range_guard_covers_inputs_and_outputs_beyond_fp16(tmp_path):
    """A graph input and output beyond fp16's range never pass through fp16 (the converter would cast them)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[2].weight.mul_(1e5)  # outputs ~1e5
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 1e5  # inputs ~1e5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = export_onnx(model, data[:2], tmp_path / "model.onnx", verify_inputs=[data[32:]], exporter="torchscript",
                             dtype="fp16", range_inputs=data[:32], rtol=1e-4)
    assert {k.op_type for k in result.fp16.kept_fp32} == {"Gemm", "Relu"}
    assert result.fp16.error.within(result.fp16.rtol)


def test_two_outputs_each_get_their_agreement(tmp_path):
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.body, self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 5), nn.Linear(8, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h), self.b(h)

    data = torch.randn(96, 6, generator=torch.Generator().manual_seed(0))
    result = export_onnx(TwoHeads().eval(), data[:2], tmp_path / "two.onnx", verify_inputs=[data[48:]],
                         exporter="torchscript", dtype="fp16", range_inputs=data[:48])
    # [batch, 5] is a class-score vector; [batch, 1] has nothing to take an argmax over.
    assert set(result.fp16.top1_agreement) == {"output[0]"}
    assert len(result.fp16.error.outputs) == 2


def test_fp16_options_are_refused_before_any_work_when_wrong_or_ignored(tmp_path):
    model, x = nn.Linear(2, 2).eval(), torch.randn(4, 2)
    for options, phrase in (
        ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
        ({"range_inputs": x}, "apply to dtype='fp16' only"),  # accepted and ignored otherwise
        ({"fp16_noise": 1e-3}, "apply to dtype='fp16' only"),
        ({"dtype": "fp16", "fp16_noise": float("nan")}, "finite non-negative"),
        ({"dtype": "fp16", "range_inputs": []}, "range_inputs is empty"),
        ({"dtype": "fp16", "range_inputs": [torch.randn(3, 5)]}, r"range input 0 is torch.float32 \(3, 5\)"),
    ):
        with pytest.raises(ExportError, match=phrase):
            export_onnx(model, x, tmp_path / "x.onnx", **options)
    assert not (tmp_path / "x.onnx").exists()


def test_a_model_too_noisy_for_fp16_is_refused_not_excused(tmp_path):
    """y = W2 (W1 x + 1000) with W2 = [1, -1]: fp16 holds 1000 + x to 0.5, so y loses its digits; the model's own
    fp16 noise is of the output's size, and 8x that is capped at 1e-2 instead of excusing any file."""
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(2, 1)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.5, 0.2, 0.1], [0.9, 0.4, 0.3, 0.0]]))
        model[0].bias.fill_(1000.0)
        model[1].weight.copy_(torch.tensor([[1.0, -1.0]]))
        model[1].bias.zero_()
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(VerificationError, match="capped at 0.01: fp16 is too coarse for this model"):
        export_onnx(model, data[:2], tmp_path / "model.onnx", verify_inputs=[data[32:]], exporter="torchscript",
                    dtype="fp16", range_inputs=data[:32], rtol=1e-3)
    assert not (tmp_path / "model.onnx").exists()


# The command line, on a trained network and real data --------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """The demo's ResNet (width 8) trained for one epoch on scikit-learn's digits: a trained network's conditioning."""
    from egp_export.demo.digits import digits_resnet
    from egp_export.io.datasets import load_digits_split
    from egp_export.prune.training import OptimConfig, as_dataset, train

    x_train, y_train, _, _ = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = digits_resnet(width=8)
    train(model, as_dataset((x_train, y_train), "digits"), OptimConfig(epochs=1, lr=0.05, batch_size=64), seed=0)
    path = tmp_path_factory.mktemp("digits") / "digits_resnet.pt"
    torch.save(model.state_dict(), path)
    return path


def test_compile_writes_a_verified_fp16_file_with_its_agreement(digits_checkpoint, tmp_path, capsys):
    from egp_export.cli.main import main

    out = tmp_path / "out"
    code = main([
        "compile", "--arch", "egp_export.demo.digits:digits_resnet", "--arch-kwargs", "width=8",
        "--checkpoint", str(digits_checkpoint), "--calibration", "builtin:digits", "--calibration-limit", "600",
        "--exporter", "torchscript", "--dtype", "fp16", "--out", str(out),
    ])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "fp16 file: max relative error" in printed.out and "top-1 agreement" in printed.out
    report = json.loads((out / "report.json").read_text())
    fp16_report = report["onnx"]["fp16"]
    assert report["onnx"]["dtype"] == "fp16" and fp16_report["noise_source"] == "the original model"
    assert fp16_report["error"]["max_rel"] <= fp16_report["rtol"] <= fp16.FP16_NOISE_CAP
    assert fp16_report["top1_agreement"]["output"] >= 0.95, fp16_report
    assert "fp16 file, on" in (out / "report.md").read_text()
    types = {t.data_type for t in onnx.load(out / "model.onnx").graph.initializer}
    assert TensorProto.FLOAT16 in types


# A zoo model, trained on real data ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_zoo_resnet18_trained_on_digits_verifies_in_fp16_with_its_agreement(tmp_path):
    """torchvision resnet18 (the zoo's entry, 10 classes) trained one epoch on the digits at 32x32: random weights
    are too ill-conditioned for fp16 (tools/fp16_zoo.py), a trained network is not. Compiled on the training digits,
    its fp16 file is checked on the compile's held-out samples and on the test split, which the compile never saw."""
    from egp_export.io.datasets import load_digits_split
    from egp_export.prune.training import OptimConfig, as_dataset, train
    from egp_export.testing import ZOO_BY_NAME

    x_train, y_train, x_test, _ = load_digits_split(seed=0)

    def as_rgb32(x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=(32, 32), mode="nearest").expand(-1, 3, -1, -1).contiguous()

    x_train, x_test = as_rgb32(x_train), as_rgb32(x_test)
    torch.manual_seed(0)
    model = ZOO_BY_NAME["torchvision/resnet18"].build()
    train(model, as_dataset((x_train, y_train), "digits"), OptimConfig(epochs=1, lr=0.01, optimizer="adam",
                                                                        batch_size=64), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model.eval(), x_train)
    decide, held = x_train.index_select(0, result.split.decide), x_train.index_select(0, result.split.holdout)
    export_onnx(model, x_train[:1], tmp_path / "original.onnx", verify_inputs=[held], exporter="torchscript")
    ranges = list(decide.split(64))
    noise = fp16.fp16_noise((tmp_path / "original.onnx").read_bytes(), model, ranges, [held])
    exported = export_onnx(result.module, x_train[:1], tmp_path / "model.onnx", verify_inputs=[held],
                           exporter="torchscript", dtype="fp16", range_inputs=decide, fp16_noise=noise)
    print(exported.fp16.summary())
    assert exported.fp16.error.within(exported.fp16.rtol)
    assert exported.fp16.top1_agreement["output"] >= 0.98, exported.fp16.summary()
    with torch.no_grad():
        reference = model(x_test)
    written = run_onnx(ort_session(tmp_path / "model.onnx"), x_test)[0]
    agreement = float((reference.argmax(-1).numpy() == written.argmax(-1)).mean())
    print(f"test split: top-1 agreement {agreement:.2%} on {len(x_test)} digits")
    assert agreement >= 0.98
