"""The ONNX check sees what the PyTorch check saw: every held-out sample alone and batched, each output on its own
scale; exporter warnings of traced control flow fail an export verified on the example alone and are printed."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from egp_export.cli import main as cli
from egp_export.errors import VerificationError
from egp_export.export.onnx import export_onnx


class _BatchBranch(nn.Module):
    """A branch on the batch's mean: TorchScript bakes in the example's branch (with a TracerWarning)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return x
        return x + 0.065


def branchy_net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _BatchBranch(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.zero_()
    return model


def _samples(n: int, *, other_branch_every: int | None) -> torch.Tensor:
    """Samples with a positive mean; every ``other_branch_every``-th (from the 6th) takes the other branch alone."""
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(3)) * 0.3 + 1.0
    if other_branch_every:
        x[5::other_branch_every] -= 2.0  # ~10%: every batch of 64 still has a positive mean
    return x


@pytest.mark.parametrize("exporter", ["torchscript", "auto"])  # auto: dynamo refuses the data-dependent branch
def test_a_baked_branch_taken_alone_by_10_percent_of_the_samples_is_refused(tmp_path, exporter):
    model, x = branchy_net(), _samples(200, other_branch_every=10)

    # Old code: verified on batches of 64 (the same branch as the example) and on the example alone: exit 0.
    with pytest.raises(VerificationError, match="batch sizes 1, 8, 64"):
        export_onnx(model, x[:1], tmp_path / "m.onnx", verify_inputs=list(x.split(64)), exporter=exporter)
    assert not (tmp_path / "m.onnx").exists()


def test_trace_warnings_fail_an_export_verified_on_the_example_alone(tmp_path):
    model = branchy_net()
    with pytest.raises(VerificationError, match="TracerWarning.*verified on the example alone"):
        export_onnx(model, _samples(1, other_branch_every=None), tmp_path / "m.onnx", exporter="torchscript")
    assert not (tmp_path / "m.onnx").exists()


def test_trace_warnings_pass_with_every_sample_verified_and_are_reported(tmp_path):
    model, x = branchy_net(), _samples(70, other_branch_every=None)

    result = export_onnx(model, x[:1], tmp_path / "m.onnx", verify_inputs=list(x.split(64)), exporter="torchscript")

    assert result.warnings and result.warnings[0].startswith("TracerWarning")
    assert result.verified_samples == 70 and result.verified_batch_sizes == [1, 6, 64]


def test_every_sample_is_checked_alone_and_batched_even_when_given_one_at_a_time(tmp_path):
    model, x = branchy_net(), _samples(30, other_branch_every=10)
    # Given alone, the samples taking the other branch are caught at batch 1; the file is also run batched.
    with pytest.raises(VerificationError, match="batch sizes 1, 30\\)"):
        export_onnx(model, x[:1], tmp_path / "m.onnx", verify_inputs=list(x.split(1)), exporter="torchscript")


def _cli_compile(tmp_path, data: torch.Tensor, *extra: str) -> int:
    path = tmp_path / "data.pt"
    torch.save(data, path)
    return cli.main([
        "compile", "--arch", f"{__name__}:branchy_net", "--calibration", str(path), "--out", str(tmp_path / "out"),
        "--exporter", "torchscript", "--quiet", *extra,
    ])


def test_the_cli_refuses_the_baked_branch_and_prints_trace_warnings(tmp_path, capsys):
    # 10% of the held-out samples take the other branch alone: old code wrote the wrong file with exit 0.
    assert _cli_compile(tmp_path, _samples(300, other_branch_every=10)) == 3
    assert not (tmp_path / "out" / "model.onnx").exists()
    capsys.readouterr()

    assert _cli_compile(tmp_path, _samples(300, other_branch_every=None), "--force") == 0
    err = capsys.readouterr().err
    assert "egp-export: warning: ONNX export of model.onnx: TracerWarning" in err
    assert "verified on all 60 held-out samples" in err
