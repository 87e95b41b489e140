"""Report files (JSON, Markdown, entropy plot) from a real compile of a tiny MLP with one linear activation."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn

import egp_export
from egp_export.errors import OutputError
from egp_export.io.fileio import check_outputs
from egp_export.report.plots import plot_entropy
from egp_export.report.report import (
    ANALYZE_OUTPUTS,
    REPORT_JSON,
    REPORT_MARKDOWN,
    is_linearized,
    to_json,
    to_markdown,
    with_export,
    write_report,
)

FEATURES = 6


def tiny_mlp() -> nn.Module:
    """Linear -> ReLU (constant on the data) -> Linear -> ReLU (mixed) -> Linear.

    The first layer's biases are ±50, far beyond |W x| for unit-normal
    inputs, so every neuron of the first ReLU stays ON or OFF: that site is
    linear, its OFF neurons are dead, and the linear layers around it merge.
    The second layer's bias cancels the first ReLU's constant part, so the
    second ReLU sees inputs of both signs and stays.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([50.0, -50.0, 50.0, 50.0, -50.0, 50.0, -50.0, 50.0]))
        model[2].bias.copy_(-model[2].weight @ torch.relu(model[0].bias))
    return model.eval()


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(1)
    calibration = torch.randn(200, FEATURES)
    # A linear layer's neurons are observed once per sample: 120 decide samples, below the default 500.
    return egp_export.compile(tiny_mlp(), calibration, min_observations=100), calibration


@pytest.fixture(scope="module")
def exported_report(compiled, tmp_path_factory):
    result, calibration = compiled
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    export = egp_export.export_onnx(result.module, calibration[:1], path, verify_inputs=calibration[-40:])
    return with_export(result.report, export)


def test_compile_report_has_a_linearized_site(compiled):
    report = compiled[0].report

    assert report["activations_linearized"] == 1
    assert [is_linearized(site) for site in report["analysis"]["sites"]] == [True, False]
    assert report["after"]["depth"] < report["before"]["depth"]


def test_markdown_has_summary_sites_rewrites_refusals(compiled):
    report = compiled[0].report
    text = to_markdown(report)

    assert text.startswith("# egp-export compile report")
    for heading in ("## Summary", "## Activation sites", "## Rewrites", "## Refusals"):
        assert heading in text
    assert f"| depth (longest conv/linear chain) | {report['before']['depth']} | {report['after']['depth']} |" in text
    assert f"| parameters | {report['before']['params']:,} | {report['after']['params']:,} |" in text
    assert "**Activations linearized:** 1 of 2 sites." in text
    assert "PyTorch: compiled vs original, held-out inputs" in text
    for site in report["analysis"]["sites"]:
        assert f"`{site['name']}`" in text
        assert site["action"] in text
    for rewrite in report["rewrites"]:
        assert rewrite["action"] in text
    for refusal in report["refusals"]:
        assert refusal["reason"] in text
    assert "## ONNX export" not in text  # no export in this report


def test_markdown_tables_are_well_formed(compiled):
    text = to_markdown(compiled[0].report)
    tables = [line for line in text.splitlines() if line.startswith("|")]

    assert tables
    for line in tables:
        assert line.endswith("|"), line


def test_markdown_with_onnx_shows_op_counts_and_ort_error(exported_report):
    text = to_markdown(exported_report)
    onnx = exported_report["onnx"]

    assert "## ONNX export" in text
    assert "ONNX Runtime: exported file vs compiled module" in text
    assert f"exporter: {onnx['exporter']}, opset {onnx['opset']}" in text
    for op, count in onnx["op_counts"].items():
        assert f"| {op} | {onnx['op_counts_exported'].get(op, 0)} | {count} |" in text
    assert exported_report["verification"]["onnxruntime"]["passed"] is True
    assert exported_report["verification"]["onnxruntime"]["max_rel"] == onnx["error"]["max_rel"]


def test_report_has_the_provenance_of_every_onnx_node(exported_report):
    import onnx

    rows = exported_report["onnx"]["provenance"]
    model = onnx.load(exported_report["onnx"]["path"])
    assert [row["node"] for row in rows] == [node.name for node in model.graph.node]
    assert all(row["source_modules"] and row["origin"] == "model" for row in rows), rows
    # The linearized ReLU folded into the layers around it: the node that computes them names it and the rewrite.
    linearized = [row for row in rows if "linearized" in row["rewrites"]]
    assert linearized and all(len(row["source_modules"]) >= 2 for row in linearized), rows
    assert json.loads(json.dumps(rows)) == rows


def test_with_export_does_not_mutate_the_compile_report(compiled, exported_report):
    report = compiled[0].report

    assert "onnx" not in report
    assert "onnxruntime" not in report["verification"]
    assert exported_report["verification"]["pytorch"] == report["verification"]["pytorch"]


def test_markdown_of_an_analysis_only_report(compiled):
    _, calibration = compiled
    analysis = egp_export.analyze(tiny_mlp(), calibration)

    for report in (analysis, {"tolerance": 1e-5, "analysis": analysis}):
        text = to_markdown(report)
        assert text.startswith("# egp-export activation analysis")
        assert "## Rewrites" not in text
        assert "- linear on the calibration data (would be linearized): 1" in text
        assert "| yes |" in text  # the linear site's row
        assert "no: " in text  # the other site says why not


def test_write_report_writes_json_and_markdown(compiled, tmp_path):
    report = compiled[0].report
    paths = write_report(report, tmp_path / "out")

    assert set(paths) == set(ANALYZE_OUTPUTS)
    assert json.loads(paths[REPORT_JSON].read_text()) == json.loads(to_json(report))
    assert paths[REPORT_MARKDOWN].read_text() == to_markdown(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(ANALYZE_OUTPUTS)  # no temporary files left


def test_write_report_refuses_to_overwrite_either_file(compiled, tmp_path):
    report = compiled[0].report
    (tmp_path / REPORT_MARKDOWN).write_text("keep me")

    with pytest.raises(OutputError, match="report.md already exists"):
        write_report(report, tmp_path)
    assert not (tmp_path / REPORT_JSON).exists()  # checked before anything was written
    assert (tmp_path / REPORT_MARKDOWN).read_text() == "keep me"

    write_report(report, tmp_path, force=True)
    assert (tmp_path / REPORT_MARKDOWN).read_text() == to_markdown(report)


def test_json_is_strict_for_non_finite_numbers():
    text = to_json({"a": float("inf"), "b": [float("nan"), -float("inf")], "c": 1.5})

    assert json.loads(text) == {"a": "inf", "b": ["nan", "-inf"], "c": 1.5}


def test_plot_entropy_writes_a_png(exported_report, tmp_path):
    path = plot_entropy(exported_report, tmp_path / "entropy.png")

    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 100 and image.height > 100
    with pytest.raises(OutputError, match="already exists"):
        plot_entropy(exported_report, path)
    plot_entropy(exported_report, path, force=True)


def test_plot_entropy_colours_linearized_sites_differently(compiled, tmp_path):
    """Two reports differing only in which site is linearized give different pictures."""
    report = compiled[0].report
    swapped = json.loads(to_json(report))
    for site in swapped["analysis"]["sites"]:
        site["linearized"] = False

    first = plot_entropy(report, tmp_path / "a.png").read_bytes()
    second = plot_entropy(swapped, tmp_path / "b.png").read_bytes()

    assert first != second


def test_plot_entropy_of_a_model_without_activations(tmp_path):
    path = plot_entropy({"sites": []}, tmp_path / "empty.png")

    assert path.stat().st_size > 0


def test_check_outputs_names_the_existing_file(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"x")

    with pytest.raises(OutputError, match="model.onnx already exists"):
        check_outputs(tmp_path, ("report.json", "model.onnx"), force=False)
    assert set(check_outputs(tmp_path, ("report.json", "model.onnx"), force=True)) == {"report.json", "model.onnx"}
