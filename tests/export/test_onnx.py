"""export_onnx: one valid self-contained file, verified against PyTorch, or no file at all."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import fx, nn

from egp_export.analysis.numerics import ORT_CPU_RTOL, compare
from egp_export.errors import ExportError, OutputError, VerificationError
from egp_export.export import onnx as onnx_export
from egp_export.export.onnx import DEFAULT_EXPORTER, EXPORTERS, count_ops, export_onnx, ort_session, run_onnx

SHAPE = (2, 3, 32, 32)


def conv_bn_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )
    with torch.no_grad():  # non-trivial statistics, so that folding BN changes the conv
        bn = model[1]
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return model.eval()


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features


class LinearBn(nn.Module):
    """Linear followed by BatchNorm1d: the TorchScript exporter leaves Identity nodes for onnxsim."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


class BatchAsInt(nn.Module):
    """Specializes the batch size: int() makes it a Python constant while tracing."""

    def forward(self, x):
        batch = int(x.shape[0])
        return x.reshape(batch, -1).mean(1)


class DataDependentBranch(nn.Module):
    def forward(self, x):
        return x * 2 if x.mean() > 0 else x - 1


class DictOutput(nn.Module):
    def forward(self, x):
        return {"logits": x.flatten(1)}


class NestedDictOutput(nn.Module):
    def forward(self, x):
        return x, {"logits": x.flatten(1)}


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """One export with every default, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("default_export")
    model = conv_bn_model()
    result = export_onnx(model, torch.randn(SHAPE), folder / "model.onnx")
    return folder, model, result


@pytest.fixture
def no_export(monkeypatch):
    """Fail the test if torch.onnx.export is reached (errors must come before the expensive work)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.onnx.export was called")

    monkeypatch.setattr(torch.onnx, "export", refuse)


def test_default_export_is_one_valid_self_contained_file(default_export):
    folder, _, result = default_export
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]
    loaded = onnx.load(result.path, load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in loaded.graph.initializer)
    onnx.checker.check_model(loaded, full_check=True)
    assert [i.name for i in loaded.graph.input] == ["input"]
    assert [o.name for o in loaded.graph.output] == ["output"]
    assert result.exporter == "dynamo" and result.exporter_requested == DEFAULT_EXPORTER == "auto"
    assert result.failed_attempts == [] and "first choice" in result.why()
    assert result.opset == next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx"))


def test_default_export_matches_pytorch_on_fresh_inputs(default_export):
    _, model, result = default_export
    assert result.error is not None and result.error.within(ORT_CPU_RTOL) and result.rtol == ORT_CPU_RTOL
    fresh = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        expected = model(fresh)
    error = compare(reference=expected, candidate=run_onnx(ort_session(result.path), fresh))
    assert error.within(ORT_CPU_RTOL), error


def test_default_export_op_counts(default_export):
    _, _, result = default_export
    assert result.op_counts == count_ops(onnx.load(result.path))
    # BatchNorm is folded into the conv before the file is written (both exporters already fold Conv+BN).
    assert "BatchNormalization" not in result.op_counts
    assert (result.op_counts["Conv"], result.op_counts["Relu"], result.op_counts["Gemm"]) == (1, 1, 1)
    assert sum(result.op_counts.values()) <= sum(result.op_counts_exported.values())
    assert result.simplified


def test_result_to_dict_is_json(default_export):
    _, _, result = default_export
    as_dict = json.loads(json.dumps(result.to_dict()))
    assert as_dict["path"] == str(result.path)
    assert as_dict["error"] == {
        "max_abs": result.error.max_abs,
        "max_rel": result.error.max_rel,
        "max_sample_rel": result.error.max_sample_rel,
        "worst_output": "output",
        "outputs": [
            {"output": "output", "max_abs": result.error.max_abs, "max_rel": result.error.max_rel,
             "max_sample_rel": result.error.max_sample_rel, "scale": result.error.outputs[0].scale,
             "top1_agreement": result.error.outputs[0].top1_agreement, "top5_agreement": None,
             "predictions": result.error.outputs[0].predictions, "cosine_mean": result.error.outputs[0].cosine_mean,
             "cosine_min": result.error.cosine_min}
        ],
        # Agreement and cosine: each verify sample once (its batch-1 run), not its batched run again.
        "samples": result.verified_samples,
        "top1_agreement": result.error.top1_agreement,
        "top5_agreement": result.error.top5_agreement,
        "cosine_min": result.error.cosine_min,
    }
    assert as_dict["op_counts"] == result.op_counts and as_dict["exporter"] == result.exporter


def test_onnxsim_removes_what_the_exporter_left(tmp_path):
    model, x = LinearBn().eval(), torch.randn(2, 3, 2, 2)
    simplified = export_onnx(model, x, tmp_path / "simplified.onnx", exporter="torchscript")
    assert simplified.simplified
    assert simplified.op_counts_exported.get("Identity", 0) > 0
    assert "Identity" not in simplified.op_counts
    raw = export_onnx(model, x, tmp_path / "raw.onnx", exporter="torchscript", simplify=False)
    assert not raw.simplified and raw.op_counts == raw.op_counts_exported


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dynamic_batch(tmp_path, exporter):
    model = conv_bn_model()
    result = export_onnx(
        model, torch.randn(SHAPE), tmp_path / "m.onnx", verify_inputs=torch.randn(5, *SHAPE[1:]), exporter=exporter
    )
    batch_dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.WhichOneof("value") == "dim_param"
    seven = torch.randn(7, *SHAPE[1:])
    (output,) = run_onnx(ort_session(result.path), seven)
    with torch.no_grad():
        assert compare(reference=model(seven), candidate=output).within(ORT_CPU_RTOL)


def test_batch_of_one_example_with_several_verify_batches(tmp_path):
    # The CLI exports with one calibration sample as the example and verifies on held-out batches.
    model = conv_bn_model()
    verify = [torch.randn(5, *SHAPE[1:]), torch.randn(3, *SHAPE[1:])]
    result = export_onnx(model, torch.randn(1, *SHAPE[1:]), tmp_path / "m.onnx", verify_inputs=verify)
    assert result.error.within(ORT_CPU_RTOL)
    batch_dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.WhichOneof("value") == "dim_param"


def test_static_batch_rejects_other_batch_sizes_before_exporting(tmp_path, no_export):
    with pytest.raises(ExportError, match="batch size 2"):
        export_onnx(
            conv_bn_model(),
            torch.randn(SHAPE),
            tmp_path / "m.onnx",
            verify_inputs=torch.randn(5, *SHAPE[1:]),
            dynamic_batch=False,
        )
    assert not any(tmp_path.iterdir())


def test_static_batch_export(tmp_path):
    result = export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx", dynamic_batch=False)
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == list(SHAPE)


def test_refuses_to_overwrite_without_force_before_exporting(tmp_path, no_export):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    with pytest.raises(OutputError, match="already exists"):
        export_onnx(conv_bn_model(), torch.randn(SHAPE), path)
    assert path.read_bytes() == b"old"


def test_overwrites_with_force(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    export_onnx(conv_bn_model(), torch.randn(SHAPE), path, force=True)
    onnx.checker.check_model(onnx.load(path), full_check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def _perturbed_run_onnx(monkeypatch):
    real_run_onnx = onnx_export.run_onnx

    def perturbed(session, inputs):
        return [output + np.float32(1e-3) for output in real_run_onnx(session, inputs)]

    monkeypatch.setattr(onnx_export, "run_onnx", perturbed)


def test_failed_verification_raises_and_leaves_no_file(tmp_path, monkeypatch):
    _perturbed_run_onnx(monkeypatch)
    with pytest.raises(VerificationError, match=r"max_abs=.*max_rel=.*rtol=1e-05"):
        export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx")
    assert not any(tmp_path.iterdir())  # neither the output nor a temporary file


def test_failed_verification_keeps_the_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"old")
    _perturbed_run_onnx(monkeypatch)
    with pytest.raises(VerificationError):
        export_onnx(conv_bn_model(), torch.randn(SHAPE), path, force=True, exporter="torchscript")
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_rtol_is_the_callers(tmp_path):
    model, x = conv_bn_model(), torch.randn(SHAPE)
    measured = export_onnx(model, x, tmp_path / "loose.onnx", exporter="torchscript").error
    assert measured.max_rel > 0  # folding BN re-rounds the weights
    with pytest.raises(VerificationError, match="max_rel"):
        export_onnx(model, x, tmp_path / "tight.onnx", exporter="torchscript", rtol=measured.max_rel / 2)
    assert not (tmp_path / "tight.onnx").exists()


@pytest.mark.parametrize("in_training", ["module", "submodule"])
def test_module_in_training_mode_is_refused(tmp_path, no_export, in_training):
    model = conv_bn_model()
    if in_training == "module":
        model.train()
    else:
        model[1].train()
    flags = [m.training for m in model.modules()]
    with pytest.raises(ExportError, match=r"training mode.*\.eval\(\)"):
        export_onnx(model, torch.randn(SHAPE), tmp_path / "m.onnx")
    assert [m.training for m in model.modules()] == flags
    assert not any(tmp_path.iterdir())


def test_export_does_not_mutate_the_module(tmp_path):
    model, x = conv_bn_model(), torch.randn(SHAPE)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    export_onnx(model, x, tmp_path / "m.onnx")
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_fx_graph_module_exports(tmp_path):
    traced = fx.symbolic_trace(conv_bn_model())
    result = export_onnx(traced, torch.randn(SHAPE), tmp_path / "m.onnx", verify_inputs=torch.randn(4, *SHAPE[1:]))
    assert result.error.within(ORT_CPU_RTOL)
    assert "BatchNormalization" not in result.op_counts and result.op_counts["Conv"] == 1


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_multi_output_module(tmp_path, exporter):
    model, x = TwoHeads().eval(), torch.randn(3, *SHAPE[1:])
    result = export_onnx(model, torch.randn(SHAPE), tmp_path / "m.onnx", verify_inputs=x, exporter=exporter)
    loaded = onnx.load(result.path)
    assert [o.name for o in loaded.graph.output] == ["output_0", "output_1"]
    logits, features = run_onnx(ort_session(result.path), x)
    assert logits.shape == (3, 5) and features.shape == (3, 6)
    with torch.no_grad():
        assert compare(reference=model(x), candidate=[logits, features]).within(ORT_CPU_RTOL)


def _spy_on_dynamo_flag(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real_export = torch.onnx.export

    def spy(*args, **kwargs):
        calls.append(kwargs["dynamo"])
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spy)
    return calls


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_exporter_override(tmp_path, monkeypatch, exporter):
    calls = _spy_on_dynamo_flag(monkeypatch)
    result = export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx", exporter=exporter)
    assert calls == [exporter == "dynamo"]
    assert result.exporter == exporter
    deprecation_noted = any("DeprecationWarning" in note for note in result.notes)
    assert deprecation_noted == (exporter == "torchscript")  # captured into notes, not printed


def test_default_exporter_tries_dynamo_first(tmp_path, monkeypatch):
    calls = _spy_on_dynamo_flag(monkeypatch)
    result = export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx")
    assert DEFAULT_EXPORTER == "auto" and calls == [True] and result.exporter == "dynamo"


def test_unknown_exporter_is_refused(tmp_path, no_export):
    with pytest.raises(ExportError, match="unknown exporter 'onnxscript'"):
        export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx", exporter="onnxscript")


def test_dynamo_refuses_a_batch_size_it_had_to_fix(tmp_path):
    with pytest.raises(ExportError, match=r"fixed the batch size to 2.*--static-batch \(static_batch=True\)"):
        export_onnx(BatchAsInt().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", exporter="dynamo")
    assert not any(tmp_path.iterdir())
    result = export_onnx(BatchAsInt().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", dynamic_batch=False)
    assert result.error.within(ORT_CPU_RTOL)


def test_torchscript_baked_batch_is_caught_without_verify_inputs(tmp_path):
    # The TorchScript trace bakes batch 2 into the Reshape while declaring the input dynamic;
    # only the automatic batch-3 check can see it.
    with pytest.raises(VerificationError, match=r"batch 3.*\(3, 3, 4, 4\).*output shape differs"):
        export_onnx(BatchAsInt().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", exporter="torchscript")
    assert not any(tmp_path.iterdir())


def test_exporter_failure_is_an_export_error_with_cause_and_hint(tmp_path):
    expected = r"dynamo exporter\) failed: .*cause: .*Try --exporter torchscript or auto \(exporter='torchscript'"
    with pytest.raises(ExportError, match=expected) as info:
        export_onnx(DataDependentBranch().eval(), torch.randn(2, 3), tmp_path / "m.onnx", exporter="dynamo")
    assert info.value.__cause__ is not None
    assert "\x1b[" not in str(info.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("failure", ["raises", "check_fails"])
def test_onnxsim_failure_keeps_the_unsimplified_model(tmp_path, monkeypatch, failure):
    import onnxsim

    def broken_simplify(model, **kwargs):
        if failure == "raises":
            raise RuntimeError("simplifier exploded")
        return model, False

    monkeypatch.setattr(onnxsim, "simplify", broken_simplify)
    result = export_onnx(LinearBn().eval(), torch.randn(2, 3, 2, 2), tmp_path / "m.onnx", exporter="torchscript")
    assert not result.simplified
    assert result.op_counts == result.op_counts_exported
    expected_note = "simplifier exploded" if failure == "raises" else "own check failed"
    assert any(expected_note in note for note in result.notes)
    assert result.error.within(ORT_CPU_RTOL)


def test_checker_failure_is_an_export_error(tmp_path, monkeypatch):
    import onnxsim

    def simplify_to_invalid(model, **kwargs):
        model.graph.node.append(onnx.helper.make_node("NoSuchOp", ["input"], ["dangling"]))
        return model, True

    monkeypatch.setattr(onnxsim, "simplify", simplify_to_invalid)
    with pytest.raises(ExportError, match="invalid"):
        export_onnx(conv_bn_model(), torch.randn(SHAPE), tmp_path / "m.onnx", exporter="torchscript")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (DictOutput().eval(), torch.randn(SHAPE), "returns a dict"),
        (NestedDictOutput().eval(), torch.randn(SHAPE), "returns a dict"),
        (nn.Identity().eval(), SHAPE, "example_input must be a torch.Tensor"),
        (lambda x: x, torch.randn(SHAPE), "expected a torch.nn.Module"),
    ],
    ids=["dict", "nested-dict", "not-a-tensor-input", "not-a-module"],
)
def test_unsupported_arguments_are_refused(tmp_path, no_export, model, x, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(model, x, tmp_path / "m.onnx")


def test_ort_session_is_cpu_with_fixed_threads(default_export):
    _, _, result = default_export
    data = result.path.read_bytes()
    session = ort_session(data, threads=2)
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 2)
    assert session.get_providers() == ["CPUExecutionProvider"]
    x = torch.randn(SHAPE)
    (from_tensor,) = run_onnx(session, x)
    (from_array,) = run_onnx(session, x.numpy())
    np.testing.assert_array_equal(from_tensor, from_array)


def test_ort_session_rejects_garbage():
    with pytest.raises(ExportError, match=r"ONNX Runtime \(CPU\) cannot load"):
        ort_session(b"not an onnx model")
