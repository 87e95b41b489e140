"""compile under torchrun: two gloo processes on the CPU decide, validate and verify on their shares of the samples
and end with the module and report one process makes on all of them."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import egp_export
from egp_export.errors import CalibrationError, EgpExportError
from tests.gloo import free_port, gloo_rank

WORLD = 2
SAMPLES = 83  # shares of unequal size in every part


def _model() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),  # always ON: becomes affine, then merges
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),  # mixed
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():
        net[1].bias.fill_(10.0)
        net[3].bias[:2] = -50.0  # two dead channels
    return net.eval()


def _data() -> torch.Tensor:
    data = torch.randn(SAMPLES, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    data[60:75] = data[:15]  # duplicates, read by different ranks: counted once all the same
    return data


def _summary(result) -> dict:
    report = result.report
    fresh = torch.randn(16, 1, 6, 6, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        outputs = result.module(fresh)
    sites = [
        {k: row[k] for k in ("name", "observations", "samples", "entropy", "dead_neurons", "min_margin", "action")}
        for row in report["analysis"]["sites"]
    ]
    return {
        "sites": sites,
        "rewrites": [r["action"] for r in report["rewrites"]],
        "withdrawals": [w["code"] for w in report["withdrawals"]],
        "max_rel": report["verification"]["pytorch"]["max_rel"],
        "calibration": report["calibration"],
        "evidence": report["evidence"],
        "guarantee": {k: report["guarantee"][k] for k in ("verified_new_samples", "decided_on_distinct_samples")},
        "outputs": outputs,
    }


def _worker(rank: int, port: int, folder: str) -> None:
    with gloo_rank(rank, port, WORLD) as runtime:
        result = egp_export.compile(_model(), _data(), min_observations=1, runtime=runtime)
        torch.save(_summary(result), os.path.join(folder, f"rank{rank}.pt"))
        with pytest.raises(EgpExportError, match="measured cost model"):
            egp_export.compile(_model(), _data(), cost_model="measured", runtime=runtime)
        with pytest.raises(CalibrationError, match="2 processes need at least 2 samples"):
            egp_export.compile(_model(), _data()[:6], runtime=runtime)  # one held-out sample for two ranks
        other = _model()
        if rank == 1:
            with torch.no_grad():
                other[7].bias[0] += 1e-3
        with pytest.raises(CalibrationError, match="hold different weights"):
            egp_export.compile(other, _data(), runtime=runtime)


def test_two_ranks_compile_what_one_process_compiles(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _summary(egp_export.compile(_model(), _data(), min_observations=1))
    assert single["rewrites"] and any("dead" in action for action in single["rewrites"])
    assert single["calibration"]["distinct_decide_samples"] < single["calibration"]["decide_samples"]
    for rank in range(WORLD):
        merged = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(merged.pop("outputs"), single["outputs"])
        assert merged == {k: v for k, v in single.items() if k != "outputs"}


def test_torchrun_runs_the_compile_command(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    checkpoint = tmp_path / "dense.pt"
    torch.save(_digits_model().state_dict(), checkpoint)

    def torchrun(*extra: str):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
            "-m", "egp_export", "compile", "--arch", "egp_export.demo.digits:digits_resnet", "--arch-kwargs", "width=8",
            "expansion=2", "stages=(1,)", "--calibration", "builtin:digits", "--calibration-limit", "500", *extra,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)

    # Without a checkpoint each process initialises its own random weights: refused, clearly, on every rank.
    refused = torchrun("--out", str(tmp_path / "refused"))
    assert refused.returncode != 0
    assert "egp-export: error: the processes of this torchrun job hold different weights" in refused.stderr
    run = torchrun("--checkpoint", str(checkpoint), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("depth ") == 1  # only rank 0 prints its summary
    import json

    report = json.loads((out / "report.json").read_text())
    alone = egp_export.compile(
        _digits_model(), egp_export_digits()[:500], min_observations=report["guarantee"]["min_observations"]
    )
    cli_calibration = dict(report["calibration"])
    # The command line records how it read images (the API is given tensors): pixels / 255, no normalisation.
    assert cli_calibration.pop("preprocessing") == {"scale": "pixels / 255", "mean": None, "std": None, "source": "default"}
    assert cli_calibration == alone.report["calibration"]
    assert [row["observations"] for row in report["analysis"]["sites"]] == [
        row["observations"] for row in alone.report["analysis"]["sites"]
    ]
    assert report["verification"]["pytorch"]["max_rel"] == alone.report["verification"]["pytorch"]["max_rel"]


def _digits_model() -> nn.Module:
    from egp_export.demo.digits import digits_resnet

    torch.manual_seed(0)
    return digits_resnet(width=8, expansion=2, stages=(1,)).eval()


def egp_export_digits() -> torch.Tensor:
    from egp_export.io.datasets import load_calibration

    return load_calibration("builtin:digits")
