"""Two real gloo processes on the CPU: merged activation statistics equal one process's, masks agree on both ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp
import torch.nn as nn

from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.distributed import Runtime
from egp_export.prune.api import prune
from egp_export.prune.training import as_dataset, input_batches
from tests.gloo import free_port, gloo_rank

WORLD = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        x = self.relu(self.bn(self.conv(x)))
        x = self.relu(self.conv2(x) + x)  # the shared ReLU's second call site
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def _model() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def _data(samples: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 1, 6, 6, generator=generator)
    return x, (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()


def _worker(rank: int, port: int, folder: str) -> None:
    with gloo_rank(rank, port, WORLD) as runtime:
        # 37 samples: shards of 19 and 18, so merging must also get unequal shards right.
        batches = input_batches(as_dataset(_data(37, 3), "stats"), None, runtime=runtime, batch_size=8)
        sites = calibrate(trace(_model()), batches)
        runtime.reduce_sites(sites)
        result = prune(
            _model(), _data(96, 0), _data(40, 1), "egp", iterations=3, epochs_per_iteration=1, batch_size=32, lr=0.05,
            progress=False, runtime=runtime, out_dir=os.path.join(folder, "out"),
        )
        torch.save(
            {
                "sites": [
                    (s.name, s.observations, s.samples, s.on_counts, s.region_counts, s.low, s.high, s.margin)
                    for s in sites
                ],
                "masks": result.masks,
                "state": result.model.state_dict(),
                "history": [(r["accuracy"], r["entropies"], r["budgets"]) for r in result.history],
                "dense_layers": result.history[0]["layers"],
            },
            os.path.join(folder, f"rank{rank}.pt"),
        )


def test_two_gloo_ranks_prune_identically(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]

    # All-reduced statistics equal one process's statistics on all 37 samples.
    single = calibrate(trace(_model()), input_batches(as_dataset(_data(37, 3), "stats"), None, runtime=Runtime()))
    for merged in (ranks[0]["sites"], ranks[1]["sites"]):
        for site, (name, observations, samples, on, regions, low, high, margin) in zip(single, merged):
            assert (site.name, site.observations, site.samples) == (name, observations, samples)
            assert torch.equal(site.on_counts, on) and torch.equal(site.region_counts, regions)
            # Extremes are exact maxima/minima, but of values each rank computed at its own batch size: CPU conv
            # kernels chosen per batch size round differently (last fp32 bits; seen on this 2-core runner), so the
            # pre-activations themselves may differ by fp32 rounding. Counts above are exact.
            for mine, theirs in ((site.low, low), (site.high, high), (site.margin, margin)):
                torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-6)

    zero, one = ranks
    assert zero["masks"] and zero["masks"].keys() == one["masks"].keys()
    assert all(torch.equal(zero["masks"][k], one["masks"][k]) for k in zero["masks"])
    assert any(not mask.all() for mask in zero["masks"].values())
    assert all(torch.equal(v, one["state"][k]) for k, v in zero["state"].items())  # BN statistics included
    assert zero["history"] == one["history"]
    # The reference entropy is per batch of 128: each rank holds its share of every batch, and the merged
    # per-batch counts give exactly the single process's layer entropies.
    alone = prune(_model(), _data(96, 0), _data(40, 1), "egp", iterations=0, progress=False)
    assert [(r["layer"], r["entropy"]) for r in zero["dense_layers"]] == [
        (r["layer"], r["entropy"]) for r in alone.history[0]["layers"]
    ]
    assert any(r["entropy"] > 0 for r in zero["dense_layers"])
    assert (tmp_path / "out" / "pruned.pt").exists()  # written once, by rank 0


def test_torchrun_runs_the_prune_command(tmp_path):
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        "-m", "egp_export", "prune",
        "--arch", "egp_export.demo.digits:digits_resnet", "--arch-kwargs", "width=8", "expansion=2", "stages=(1,)",
        "--data", "builtin:digits", "--out", str(tmp_path / "out"), "--iterations", "1", "--epochs-per-iteration", "1",
        "--batch-size", "64", "--lr", "0.01", "--entropy-samples", "200",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("EGP: 1 iteration(s)") == 1  # only rank 0 prints
    assert (tmp_path / "out" / "pruned.pt").exists()
