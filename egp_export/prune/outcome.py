"""What the literature's pruning methods (SAP, energy block removal, ITPruner) return and write.

Each method's entry function returns a :class:`PruneOutcome`; with an
output folder it writes ``pruned.pt`` (``{"state_dict": ..., "egp_prune":
metadata}``, the form ``egp-export compile --checkpoint`` reads) and
``history.json``. The metadata's ``arch_kwargs`` are the factory keyword
arguments that rebuild the result's architecture (``removed_blocks`` for
block removal, ``hidden_widths`` for ITPruner, none for SAP), so
``digits_resnet(**arch_kwargs)`` or ``--arch-kwargs`` loads the checkpoint
without editing code (:func:`rebuild`).

``train_keep_best`` is the retraining every method shares: one optimizer and
schedule for all epochs (``training.OptimConfig``), validation accuracy after
every epoch, and the weights of the best epoch kept (ties: the earlier
epoch). SAP's reference keeps the best epoch on the *test* split; here it is
the validation data the caller gives.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from egp_export.io.checkpoint import PRUNE_METADATA_KEY
from egp_export.io.fileio import check_writable, save_torch_atomic, write_text_atomic
from egp_export.prune.training import (
    OptimConfig,
    build_optimizer,
    build_scheduler,
    checked_loss,
    evaluate,
    iterate,
    require_finite_state,
)

PRUNED_CHECKPOINT = "pruned.pt"
HISTORY = "history.json"
METADATA_KEY = PRUNE_METADATA_KEY


@dataclass
class PruneOutcome:
    """A pruning method's result: the model (plain weights, eval mode), its accuracy, how to rebuild it, the history."""

    model: nn.Module
    method: str
    dense_accuracy: float
    accuracy: float
    arch_kwargs: dict
    history: list[dict]
    details: dict = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)


def check_outputs(out_dir: str | os.PathLike, *, force: bool) -> dict[str, Path]:
    """The output paths, refused before any work when one exists (without ``force``) or is not writable."""
    return {name: check_writable(Path(out_dir) / name, force=force) for name in (PRUNED_CHECKPOINT, HISTORY)}


def write_outcome(outcome: PruneOutcome, out_dir: str | os.PathLike, *, force: bool) -> dict[str, Path]:
    paths = check_outputs(out_dir, force=force)
    metadata = {
        "method": outcome.method, "accuracy": outcome.accuracy, "dense_accuracy": outcome.dense_accuracy,
        "arch_kwargs": outcome.arch_kwargs, **outcome.details,
    }
    state_dict = {key: value.detach().cpu().clone() for key, value in outcome.model.state_dict().items()}
    save_torch_atomic({"state_dict": state_dict, METADATA_KEY: metadata}, paths[PRUNED_CHECKPOINT], force=force)
    write_text_atomic(paths[HISTORY], json.dumps(outcome.history, indent=2, allow_nan=False) + "\n", force=force)
    outcome.paths = paths
    return paths


def rebuild(factory: Callable[..., nn.Module], path: str | os.PathLike, **kwargs) -> nn.Module:
    """``factory(**kwargs, **arch_kwargs)`` with the checkpoint at ``path`` loaded (eval mode)."""
    from egp_export.io.checkpoint import apply_state_dict, load_state_dict

    loaded = torch.load(Path(path), map_location="cpu", weights_only=True)
    metadata = loaded.get(METADATA_KEY, {}) if isinstance(loaded, dict) else {}
    model = factory(**kwargs, **metadata.get("arch_kwargs", {}))
    apply_state_dict(model, load_state_dict(path))
    return model.eval()


def train_keep_best(
    model: nn.Module, train_set: Dataset, eval_set: Dataset, config: OptimConfig, *, seed: int, desc: str = "retraining"
) -> tuple[float, int]:
    """Train ``model`` in place, keep the weights of its best validation epoch; return (accuracy, epoch; 0 = as given).

    A NaN/Inf loss, weight or output raises TrainingError naming ``desc`` and
    the epoch: a diverged run is an error, never hidden by keeping an earlier epoch.
    """
    best_accuracy, best_epoch = evaluate(model, eval_set), 0
    best_state = copy.deepcopy(model.state_dict())
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model.parameters(), config)
    scheduler = build_scheduler(optimizer, config)
    for epoch in range(1, config.epochs + 1):
        model.train()
        where = f"in {desc}, epoch {epoch} of {config.epochs}"
        for inputs, targets in iterate(train_set, torch.randperm(len(train_set), generator=generator), config.batch_size):
            loss = torch.nn.functional.cross_entropy(model(inputs), targets)
            checked_loss(loss, where, config.lr)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        require_finite_state(model, where, config.lr)
        accuracy = evaluate(model, eval_set)
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return best_accuracy, best_epoch
