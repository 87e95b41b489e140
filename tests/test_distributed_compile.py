"""compile under torchrun: two gloo processes on the CPU decide, validate and verify on their shares of the samples
and end with the module and report one process makes on all of them."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import egp_export
from egp_export.errors import CalibrationError, EgpExportError

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
    return torch.randn(SAMPLES, 1, 6, 6, generator=torch.Generator().manual_seed(1))


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
        "outputs": outputs,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, folder: str) -> None:
    from egp_export.prune.distributed import DistributedRuntime

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        runtime = DistributedRuntime()
        result = egp_export.compile(_model(), _data(), min_observations=1, runtime=runtime)
        torch.save(_summary(result), os.path.join(folder, f"rank{rank}.pt"))
        with pytest.raises(EgpExportError, match="measured cost model"):
            egp_export.compile(_model(), _data(), cost_model="measured", runtime=runtime)
        with pytest.raises(CalibrationError, match="2 processes need at least 2 samples"):
            egp_export.compile(_model(), _data()[:6], runtime=runtime)  # one held-out sample for two ranks
    finally:
        dist.destroy_process_group()


def test_two_ranks_compile_what_one_process_compiles(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    single = _summary(egp_export.compile(_model(), _data(), min_observations=1))
    assert single["rewrites"] and any("dead" in action for action in single["rewrites"])
    for rank in range(WORLD):
        merged = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(merged.pop("outputs"), single["outputs"])
        assert merged == {k: v for k, v in single.items() if k != "outputs"}
