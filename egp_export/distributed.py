"""The process a compile or a pruning run works in: one process, or one rank of a ``torchrun`` job.

    torchrun --nproc_per_node=2 -m egp_export compile ...
    torchrun --nproc_per_node=2 -m egp_export prune --arch ... --data builtin:digits --out DIR

The command line asks :func:`runtime_from_env` for the runtime it runs in; this
module knows nothing of the CLI, of compiling or of pruning. Under torchrun
(``WORLD_SIZE`` > 1) the process group is initialised from the environment:
NCCL on ``cuda:LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise.

A :class:`Runtime` offers what the ranks must agree on: each rank's shard of
the samples, sums and maxima over ranks, activation statistics merged field by
field (counts summed, ``low``/``margin`` minimised, ``high`` maximised, the
per-batch ON counts summed: the merged statistics equal those of one process
on all samples), DistributedDataParallel for training, and buffers
(BatchNorm running statistics) broadcast from rank 0.

- ``egp_export.compile(..., runtime=)`` calibrates, validates and verifies
  each part of the calibration data on the rank's share and merges
  statistics, errors and sample digests: every rank decides what one process
  decides on all samples.
- Pruning (``egp_export.prune``) trains under DistributedDataParallel on
  each rank's shard of one seeded permutation, merges the entropy statistics
  (so budgets, EASIER's choice and the masks are the same on every rank),
  broadcasts BatchNorm statistics after every fine-tuning phase and sums
  accuracy counts. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from egp_export.analysis.stats import SiteStats
from egp_export.errors import CalibrationError


class Runtime:
    """One process on one device: the single-machine case, and the interface DDP overrides."""

    rank = 0
    world_size = 1

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress."""
        return self.rank == 0

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's share of ``indices`` (every world_size-th one, so shards differ by at most one)."""
        return indices[self.rank :: self.world_size]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to train (DistributedDataParallel under torchrun)."""
        return model

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over ranks."""
        return values

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise maximum of ``values`` over ranks."""
        return values

    def reduce_sites(self, sites: list[SiteStats]) -> None:
        """Merge every rank's activation statistics into ``sites`` in place (one process: nothing to merge)."""

    def sync_buffers(self, model: nn.Module) -> None:
        """Make buffers (BatchNorm running statistics) identical on every rank."""

    def barrier(self) -> None:
        """Wait until every rank gets here."""


def all_reduce_site_stats(sites: list[SiteStats], device: torch.device | None = None) -> None:
    """Merge every rank's ``SiteStats`` into ``sites`` in place, with three collective calls.

    Every rank must hold the same sites in the same order (the same model
    traced the same way) and at least one observation of each.
    """
    if not sites:
        return
    device = device or torch.device("cpu")
    empty = [site.name for site in sites if site.observations == 0]
    if empty:
        raise CalibrationError(f"no calibration sample reached {', '.join(empty)} on rank {dist.get_rank()}.")
    # Counts: observations, then each site's region counts and ON counts, flattened.
    counts = torch.cat([
        torch.tensor([site.observations for site in sites], dtype=torch.int64),
        torch.tensor([site.samples for site in sites], dtype=torch.int64),
        *[torch.cat([site.region_counts.flatten(), site.on_counts]) for site in sites],
    ]).to(device)
    minima = torch.cat([torch.cat([site.low, site.margin]) for site in sites]).to(device)
    maxima = torch.cat([site.high for site in sites]).to(device)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    dist.all_reduce(minima, op=dist.ReduceOp.MIN)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    counts, minima, maxima = counts.cpu(), minima.cpu(), maxima.cpu()
    offset, low_offset, high_offset = 2 * len(sites), 0, 0
    for index, site in enumerate(sites):
        neurons = site.num_neurons
        regions = site.region_counts.numel()
        site.observations = int(counts[index])
        site.samples = int(counts[len(sites) + index])
        site.region_counts = counts[offset : offset + regions].reshape(site.region_counts.shape).clone()
        site.on_counts = counts[offset + regions : offset + regions + neurons].clone()
        offset += regions + neurons
        site.low = minima[low_offset : low_offset + neurons].clone()
        site.margin = minima[low_offset + neurons : low_offset + 2 * neurons].clone()
        low_offset += 2 * neurons
        site.high = maxima[high_offset : high_offset + neurons].clone()
        high_offset += neurons
        site.zero_crossed_margins()  # a neuron that crossed on one rank's data only


class DistributedRuntime(Runtime):
    """One rank of an initialised default process group."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        if not dist.is_initialized():
            raise RuntimeError("DistributedRuntime needs an initialised process group (torch.distributed)")
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if dist.get_backend() == "nccl" else "cpu"
        super().__init__(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        reduced = values.to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(values.device)

    def max(self, values: torch.Tensor) -> torch.Tensor:
        reduced = values.to(self.device)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced.to(values.device)

    def reduce_sites(self, sites: list[SiteStats]) -> None:
        all_reduce_site_stats(sites, self.device if self.device.type == "cuda" else None)

    def sync_buffers(self, model: nn.Module) -> None:
        with torch.no_grad():
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        dist.barrier()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def runtime_from_env() -> Runtime:
    """The runtime this process runs in: one CPU process, or a rank of the torchrun job that started it.

    Initialises the default process group from torchrun's environment when
    needed: NCCL when CUDA is available, gloo otherwise.
    """
    if not launched_by_torchrun():
        return Runtime()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    return DistributedRuntime()


def shutdown() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
