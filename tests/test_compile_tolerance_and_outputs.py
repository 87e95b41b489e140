"""compile's tolerance is a finite number >= 0 and never loosens the ONNX Runtime check; the report states the
per-output check."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.analysis.numerics import NOISE_CAP
from egp_export.cli import main as cli
from egp_export.errors import CalibrationError


class _BoxesAndScores(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
        self.boxes, self.scores = nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return 1000 * self.boxes(features), torch.sigmoid(self.scores(features))


@pytest.mark.parametrize("tolerance", [math.inf, -math.inf, math.nan, -1e-5])
def test_a_non_finite_or_negative_tolerance_is_refused_up_front(tolerance):
    # Old code accepted inf and failed every check ("8.5e-08 > allowed inf"); nan passed nothing either.
    with pytest.raises(CalibrationError, match="tolerance must be a finite number >= 0"):
        egp_export.compile(_BoxesAndScores().eval(), torch.randn(50, 4), tolerance)


def test_the_report_names_the_worst_output_and_states_the_rule():
    result = egp_export.compile(_BoxesAndScores().eval(), torch.randn(100, 4))

    guarantee = result.report["guarantee"]
    assert set(guarantee["outputs"]) == {"output[0]", "output[1]"}
    assert guarantee["worst_output"] in guarantee["outputs"]
    assert guarantee["max_rel"] == max(guarantee["outputs"].values())
    assert guarantee["max_sample_rel"] >= guarantee["max_rel"]
    assert "every output tensor" in guarantee["checked"]
    pytorch = result.report["verification"]["pytorch"]
    assert [row["output"] for row in pytorch["outputs"]] == ["output[0]", "output[1]"]


def _cli_compile(tmp_path, *args: str) -> tuple[int, dict | None]:
    path = tmp_path / "data.pt"
    torch.save(torch.randn(200, 1, 8, 8, generator=torch.Generator().manual_seed(5)), path)
    out = tmp_path / "out"
    try:
        code = cli.main([
            "compile", "--arch", "tests.test_verification:easier_net", "--calibration", str(path), "--out", str(out),
            "--quiet", *args,
        ])
    except SystemExit as exit_:  # argparse refuses what its type refuses (-1 and nan today)
        code = exit_.code
    return code, json.loads((out / "report.json").read_text()) if code == 0 else None


def test_the_tolerance_never_loosens_the_onnx_runtime_check(tmp_path):
    code, report = _cli_compile(tmp_path, "--tolerance", "1e308")

    assert code == 0
    # Old code allowed ONNX Runtime 1e+308: the user's tolerance, not fp32 noise.
    assert report["verification"]["onnxruntime"]["rtol"] <= NOISE_CAP
    assert report["verification"]["onnxruntime"]["verified_samples"] == report["calibration"]["holdout_samples"]


@pytest.mark.parametrize("value", ["inf", "nan", "-1"])
def test_the_cli_refuses_a_non_finite_tolerance(tmp_path, capsys, value):
    code, _ = _cli_compile(tmp_path, f"--tolerance={value}")

    assert code == 2
    err = capsys.readouterr().err
    assert "egp-export" in err and "error:" in err and "tolerance" in err and "Traceback" not in err
