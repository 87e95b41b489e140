"""export_onnx honours --opset: the written file imports the requested default-domain opset, or the export fails
saying why (regression: the dynamo exporter wrote opset 18 for opset=13, 7 or 99 and said nothing)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from egp_export.errors import ExportError
from egp_export.export.onnx import MIN_OPSET, _convert_opset, _default_opset, export_onnx, ort_session, run_onnx


def _conv_relu() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval()


def _written_opset(path) -> int:
    return _default_opset(onnx.load(str(path)))


@pytest.mark.parametrize("exporter", ["torchscript", "auto"])
def test_an_older_opset_is_written_as_requested(tmp_path, exporter):
    """dynamo cannot write opset 13 for a ReLU (no 14 -> 13 adapter): auto falls back to TorchScript, which can."""
    module, example = _conv_relu(), torch.randn(2, 3, 8, 8)
    fresh = torch.randn(5, 3, 8, 8)
    result = export_onnx(module, example, tmp_path / "m.onnx", opset=13, exporter=exporter, verify_inputs=fresh)
    assert result.opset == _written_opset(tmp_path / "m.onnx") == 13
    assert result.exporter == "torchscript" and "opset 13 as requested" in result.why()
    assert result.to_dict()["opset_requested"] == 13
    if exporter == "auto":
        assert "dynamo exporter wrote opset 18, not the requested 13" in result.why()
    check = torch.randn(3, 3, 8, 8)
    np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "m.onnx"), check)[0], module(check).detach().numpy(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip


def test_dynamo_alone_refuses_an_opset_it_cannot_write(tmp_path):
    with pytest.raises(ExportError, match=r"dynamo exporter wrote opset 18, not the requested 13.*--exporter torchscript"):
        export_onnx(_conv_relu(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", opset=13, exporter="dynamo")
    assert not (tmp_path / "m.onnx").exists()


def test_a_newer_opset_than_the_default_is_written(tmp_path):
    result = export_onnx(_conv_relu(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", opset=21, exporter="dynamo")
    assert result.opset == _written_opset(tmp_path / "m.onnx") == 21 and "opset 21 as requested" in result.why()


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, onnx.defs.onnx_opset_version() + 1, 99])
def test_an_opset_outside_the_range_is_refused_before_any_work(tmp_path, opset):
    class Untouchable(nn.Module):
        def forward(self, x):
            raise AssertionError("the module ran before the opset was checked")

    with pytest.raises(ExportError, match=rf"opset {opset} cannot be written here: choose --opset .* from {MIN_OPSET} to"):
        export_onnx(Untouchable().eval(), torch.randn(2, 3), tmp_path / "m.onnx", opset=opset)


def _one_node_model(op: str, opset: int) -> onnx.ModelProto:
    inputs = ["x", "w", "b"] if op == "Gemm" else ["x"]
    initializers = []
    if op == "Gemm":
        initializers = [
            helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.eye(4, dtype=np.float32).ravel()),
            helper.make_tensor("b", TensorProto.FLOAT, [4], np.ones(4, dtype=np.float32)),
        ]
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_the_version_converter_route_and_its_refusal():
    """An exporter's opset 18 becomes the requested 13 where onnx has the adapters (Gemm), else a reason."""
    converted = _convert_opset(_one_node_model("Gemm", 18), 13, "dynamo")
    assert _default_opset(converted) == 13
    onnx.checker.check_model(converted, full_check=True)
    with pytest.raises(ExportError, match="wrote opset 18, not the requested 13, and onnx's version converter cannot"):
        _convert_opset(_one_node_model("Relu", 18), 13, "dynamo")


def test_an_exporter_that_ignores_the_opset_is_converted_and_says_so(tmp_path, monkeypatch):
    """The route through onnx.version_converter, end to end: an exporter that writes its default opset whatever it
    is asked for (as dynamo did for 13) has its model converted, verified, and the result names the route."""
    from egp_export.export import onnx as onnx_export

    real_export = onnx_export._export
    monkeypatch.setattr(onnx_export, "_export", lambda *args: real_export(*args[:5], None, *args[6:]))
    torch.manual_seed(0)
    module = nn.Linear(4, 3).eval()
    result = export_onnx(module, torch.randn(2, 4), tmp_path / "m.onnx", opset=13, exporter="dynamo")
    default = result.opset_converted_from
    assert default is not None and default > 13
    assert result.opset == _written_opset(tmp_path / "m.onnx") == 13
    assert f"opset 13 converted from the exporter's {default} by onnx.version_converter" in result.why()
    check = torch.randn(5, 4)
    np.testing.assert_allclose(run_onnx(ort_session(tmp_path / "m.onnx"), check)[0], module(check).detach().numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
