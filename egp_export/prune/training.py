"""The plain training loop EGP fine-tunes with: optimizer and schedule from arguments, seeded batches, metrics.

Defaults follow EGP's reference code (ZhuLIAO001/Unstructured_Relu_Pruning_Reduce_Depth,
``src/main.py``), whose CIFAR-10 recipe EASIER's released code shares: SGD
with learning rate 0.1, momentum 0.9 and weight decay 1e-4, batch 128, and a
step schedule (MultiStepLR) dividing the learning rate by 10 at 50 % and 75 %
of the epochs (the reference's milestones 80 and 120 of 160). Every pruning
iteration builds a fresh optimizer and schedule, as the reference does, so
nothing but the model carries over between iterations and a resumed run
repeats an uninterrupted one exactly.

Batches are drawn from a ``torch.Generator`` seeded per call, never from the
global RNG, and the global RNG (dropout) is reseeded at the start of each
call: the same seed gives the same weights, on resume as well.

A :class:`~egp_export.distributed.Runtime` says where the work runs. The
default is one CPU process; under torchrun ``egp_export.distributed`` supplies
one for DistributedDataParallel that shards batches by rank and all-reduces
what the ranks must agree on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from egp_export.distributed import Runtime
from egp_export.errors import CalibrationError, OptionError, TrainingError
from egp_export.io.fileio import write_text_atomic

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("multistep", "cosine", "constant")
DEFAULT_LR = 0.1
DEFAULT_MOMENTUM = 0.9
DEFAULT_WEIGHT_DECAY = 1e-4
DEFAULT_BATCH_SIZE = 128
# The papers' MultiStepLR(milestones=[80, 120], gamma=0.1) over 160 epochs, as fractions of the epochs.
MILESTONE_FRACTIONS = (0.5, 0.75)
MILESTONE_GAMMA = 0.1
EVAL_BATCH_SIZE = 512

METRICS_LOG = "metrics.jsonl"
# What to try when fine-tuning produces NaN/Inf: the usual causes, gentlest first.
DIVERGENCE_ADVICE = "lower the learning rate (--lr, or lr= in Python)"


def require_finite(**values: float | None) -> None:
    """Refuse NaN and infinite numeric arguments (None: not given) with an OptionError naming the first one.

    ``inf > 0`` holds and NaN fails every comparison silently, so range checks
    alone let ``lr=inf`` through and word NaN's refusal wrongly.
    """
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise OptionError(f"{name} must be a finite number, got {value}")


def require_finite_state(model: nn.Module, where: str, lr: float) -> None:
    """Raise TrainingError when a parameter or buffer of ``model`` holds NaN/Inf (counting the tensors affected)."""
    bad = [name for name, value in model.state_dict().items() if value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise TrainingError(
            f"fine-tuning diverged {where}: {len(bad)} weight/buffer tensor(s) hold NaN/Inf ({shown}) at lr {lr:g}; "
            f"{DIVERGENCE_ADVICE}. Nothing of the diverged state was written."
        )


def checked_loss(loss: torch.Tensor, where: str, lr: float) -> float:
    """``loss`` as a float, or TrainingError when it is NaN/Inf (one diverged step poisons every later one)."""
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(
            f"fine-tuning diverged {where}: the loss is {value} at lr {lr:g}; {DIVERGENCE_ADVICE}. "
            "Nothing of the diverged state was written."
        )
    return value


@dataclass(frozen=True)
class OptimConfig:
    """How one fine-tuning phase trains."""

    epochs: int
    optimizer: str = "sgd"
    lr: float = DEFAULT_LR
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    scheduler: str = "multistep"
    batch_size: int = DEFAULT_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.epochs < 0:
            raise ValueError(f"epochs must be non-negative, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        require_finite(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if not self.lr > 0.0:
            raise ValueError(f"lr must be positive, got {self.lr}")


def as_dataset(data, what: str) -> Dataset:
    """A map-style dataset of (input, target) from ``(inputs, targets)`` tensors, a Dataset or a DataLoader.

    A DataLoader contributes its dataset only: batching and shuffling are
    redone here with a seeded generator, so that runs are reproducible and
    resumable and DDP ranks see disjoint shards.
    """
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = (torch.as_tensor(part) for part in data)
        if inputs.dim() == 0 or len(inputs) == 0:
            raise CalibrationError(f"{what}: the inputs are empty; give at least one sample.")
        if len(inputs) != len(targets):
            raise CalibrationError(f"{what}: {len(inputs)} inputs but {len(targets)} targets; give one target per input.")
        if targets.is_floating_point() or targets.is_complex():
            raise CalibrationError(f"{what}: targets must be integer class labels, got {targets.dtype}.")
        if not inputs.is_floating_point():
            inputs = inputs.to(torch.float32)
        bad = int((~torch.isfinite(inputs)).sum())
        if bad:
            raise CalibrationError(f"{what}: the inputs hold {bad} NaN/Inf values; clean or drop those samples.")
        return TensorDataset(inputs, targets.to(torch.int64))
    raise CalibrationError(
        f"{what} must be an (inputs, targets) pair of tensors, a map-style Dataset of (input, target), "
        f"or a DataLoader; got {type(data).__name__}."
    )


def iterate(dataset: Dataset, indices: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of ``dataset[indices]`` in that order."""
    if isinstance(dataset, TensorDataset):
        for start in range(0, len(indices), batch_size):
            inputs, targets = dataset[indices[start : start + batch_size]]
            yield inputs, targets
        return
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices.tolist(), num_workers=0)
    for inputs, targets in loader:
        yield inputs, targets


def build_optimizer(parameters, config: OptimConfig) -> torch.optim.Optimizer:
    trainable = [p for p in parameters if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(trainable, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(trainable, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-epoch schedule: step decay at the papers' milestones, cosine annealing, or constant."""
    if config.scheduler == "multistep":
        milestones = sorted({max(1, math.ceil(f * config.epochs)) for f in MILESTONE_FRACTIONS})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=MILESTONE_GAMMA)
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def train(
    model: nn.Module,
    dataset: Dataset,
    config: OptimConfig,
    *,
    seed: int,
    runtime: Runtime | None = None,
    progress: bool = False,
    desc: str = "training",
) -> float:
    """Train ``model`` in place for ``config.epochs`` epochs; return the mean loss of the last epoch (nan if none).

    Each rank trains on its shard of one seeded permutation per epoch with
    ``batch_size // world_size`` samples per step, so the global batch is
    ``batch_size`` whatever the number of processes. The model is left in
    eval mode. A NaN/Inf loss, or weights or buffers holding NaN/Inf after
    an epoch, raise TrainingError (``desc`` and the epoch say where).
    """
    runtime = runtime or Runtime()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    per_rank = max(1, config.batch_size // runtime.world_size)
    trained = runtime.wrap(model)
    optimizer = build_optimizer(trained.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    epochs = range(config.epochs)
    if progress and runtime.is_main:
        from tqdm.auto import tqdm

        epochs = tqdm(epochs, desc=desc, unit="epoch", leave=False)
    last_loss = float("nan")
    for epoch in epochs:
        trained.train()
        order = runtime.shard(torch.randperm(len(dataset), generator=generator))
        total = torch.zeros(2, dtype=torch.float64)
        where = f"in {desc}, epoch {epoch + 1} of {config.epochs}"
        for inputs, targets in iterate(dataset, order, per_rank):
            inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
            loss = F.cross_entropy(trained(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.tensor([loss.item() * len(targets), len(targets)], dtype=torch.float64)
        scheduler.step()
        # Checked on the loss summed over ranks and on the (all-reduced) weights: every rank stops together.
        total = runtime.sum(total)
        if total[1]:
            last_loss = checked_loss(total[0] / total[1], where, config.lr)
        require_finite_state(model, where, config.lr)
        if progress and runtime.is_main:
            epochs.set_postfix(loss=f"{last_loss:.4f}")
    model.eval()
    runtime.sync_buffers(model)
    return last_loss


def evaluate(model: nn.Module, dataset: Dataset, *, runtime: Runtime | None = None, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on all of ``dataset``, counted over every rank's shard.

    Outputs holding NaN/Inf raise TrainingError: argmax would still name a
    class, and an accuracy from such outputs means nothing.
    """
    runtime = runtime or Runtime()
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # correct, samples, non-finite output values
    with torch.no_grad():
        for inputs, targets in iterate(dataset, runtime.shard(torch.arange(len(dataset))), batch_size):
            outputs = model(inputs.to(runtime.device))
            predictions = outputs.argmax(dim=1).cpu()
            counts += torch.tensor(
                [float((predictions == targets).sum()), float(len(targets)), float((~outputs.isfinite()).sum())],
                dtype=torch.float64,
            )
    counts = runtime.sum(counts)
    if counts[2]:
        raise TrainingError(
            f"the model's outputs hold {int(counts[2])} NaN/Inf values on the eval data: its weights overflow on "
            f"this data; if it was fine-tuned, {DIVERGENCE_ADVICE}. Nothing of this state was written."
        )
    return float(counts[0] / counts[1])


def input_batches(
    dataset: Dataset, samples: int | None, *, runtime: Runtime | None = None, batch_size: int = EVAL_BATCH_SIZE
) -> list[torch.Tensor]:
    """This rank's share of each batch of the first ``samples`` inputs of ``dataset`` (all for None), on the CPU.

    The first ``samples`` inputs are cut into consecutive batches of
    ``batch_size`` (the last may be smaller); every rank gets its share of
    every batch (possibly empty for the last one), so the list has one entry
    per batch on every rank, and the shards of all ranks together are exactly
    the batches one process would see: statistics merged across ranks, per
    batch or pooled, equal the single-process ones.
    """
    runtime = runtime or Runtime()
    count = len(dataset) if samples is None else min(samples, len(dataset))
    if min(count, batch_size) < runtime.world_size:
        raise CalibrationError(
            f"{count} sample(s) in batches of {batch_size} for activation statistics cannot be shared by "
            f"{runtime.world_size} processes (each needs a sample of the first batch); use more data or fewer processes."
        )
    sample_shape = torch.as_tensor(dataset[0][0]).shape
    shares = []
    for start in range(0, count, batch_size):
        indices = runtime.shard(torch.arange(start, min(count, start + batch_size)))
        inputs = [batch for batch, _ in iterate(dataset, indices, batch_size)]
        shares.append(inputs[0] if inputs else torch.empty((0, *sample_shape)))
    return shares


# Files -------------------------------------------------------------------


def write_metrics(records: Sequence[dict], path: str | os.PathLike, *, force: bool = True) -> Path:
    """The whole metrics log as JSON lines (rewritten each time, so a resumed run never duplicates a line)."""
    text = "".join(json.dumps(record, allow_nan=False) + "\n" for record in records)
    return write_text_atomic(path, text, force=force)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
