"""Sparsity-informed Adaptive Pruning (SAP; Diao et al., ICLR 2023): prune by the PQ Index, rewind, retrain.

The loop of the reference (``src/train_classifier.py: runExperiment``,
``src/modules/compression.py: Compression.compress``), written from its
formulas (``egp_export.measures.pqi``):

    iteration 0:  train the model as given (the dense model), keep the best epoch
    iteration t:  for every weight tensor with dim > 1 (first conv and classifier included):
                    I = PQ Index of its unmasked entries      (per row for scope "neuron", over all for "global")
                    (r, c) = sap_prune_count(d, I, p, q, eta_r, gamma, beta)
                    prune the unmasked entries with |w| < the (c+1)-th smallest unmasked |w|
                  rewind, retrain, keep the best epoch

- **Strict pivot.** Entries *below* the pivot are pruned: ties with it
  survive, so fewer than c entries may go (the reference's
  ``param.abs() < pivot_value``). With c = d every unmasked entry goes.
- **Rewinding.** ``rewind="init"`` (the paper's and the reference's choice)
  sets every parameter back to its value when ``prune_sap`` was called,
  pruned entries zero; buffers (BatchNorm statistics) keep their trained
  values, as in the reference (it rewinds ``named_parameters`` only). Give
  the untrained model for the paper's procedure. ``rewind="pre_prune"``
  keeps the trained weights and fine-tunes them instead.
- **Selection.** Every retraining keeps its best epoch on ``eval_data``
  (the reference selects on the test split). The result is the last
  iteration, or with ``max_accuracy_drop`` the last whose accuracy is within
  that of the dense model's; the loop also stops when an iteration prunes
  nothing.
- **Masks** are ``torch.nn.utils.prune`` reparametrizations during the run
  (the optimizer only moves unmasked weights); the returned model has them
  folded (plain weights, pruned entries zero).
"""

from __future__ import annotations

import copy
import dataclasses
import os

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

from egp_export.measures.pqi import (
    DEFAULT_BETA,
    DEFAULT_ETA_R,
    DEFAULT_GAMMA,
    DEFAULT_P,
    DEFAULT_Q,
    SCOPES,
    pq_index,
    sap_prune_count,
)
from egp_export.prune.outcome import PruneOutcome, check_outputs, train_keep_best, write_outcome
from egp_export.prune.training import DEFAULT_BATCH_SIZE, DEFAULT_LR, OptimConfig, as_dataset, require_finite

REWINDS = ("init", "pre_prune")
DEFAULT_ITERATIONS = 3
DEFAULT_EPOCHS = 10


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, for every module whose ``weight`` has dim > 1 (the reference's set)."""
    layers = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight_orig", None)
        if weight is None:
            weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.dim() > 1:
            layers[name] = module
    return layers


def _weight_and_mask(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(module, "weight_mask"):
        return module.weight_orig.detach(), module.weight_mask.detach().to(torch.bool)
    return module.weight.detach(), torch.ones_like(module.weight, dtype=torch.bool)


def _set_mask(module: nn.Module, keep: torch.Tensor) -> None:
    mask = keep.to(_weight_and_mask(module)[0].dtype)
    with torch.no_grad():
        if hasattr(module, "weight_mask"):
            module.weight_mask.copy_(mask)
        else:
            torch_prune.custom_from_mask(module, "weight", mask)


def _below_pivot(magnitudes: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """Which kept entries fall strictly below the (count+1)-th smallest kept magnitude (all of them when count >= d)."""
    kept = magnitudes[keep]
    if count <= 0:
        return torch.zeros_like(keep)
    if count >= kept.numel():
        return keep.clone()
    pivot = torch.sort(kept).values[count]
    return keep & (magnitudes < pivot)


def sap_step(
    model: nn.Module,
    *,
    p: float = DEFAULT_P,
    q: float = DEFAULT_Q,
    eta_r: float = DEFAULT_ETA_R,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    scope: str = "layer",
) -> list[dict]:
    """Prune ``model`` in place by one SAP step; return one row per layer (PQ Index, d, r, c, entries pruned)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    layers = prunable_layers(model)
    tensors = {name: _weight_and_mask(module) for name, module in layers.items()}
    rows, new_keeps = [], {}
    if scope == "global":
        weights = [weight for weight, _ in tensors.values()]
        keeps = [keep for _, keep in tensors.values()]
        index = pq_index(weights, p, q, keeps, "global")
        d = sum(int(keep.sum()) for keep in keeps)
        r, c = sap_prune_count(d, index, p, q, eta_r, gamma, beta)
        flat = torch.cat([weight.abs().reshape(-1) for weight in weights])
        flat_keep = torch.cat([keep.reshape(-1) for keep in keeps])
        gone = _below_pivot(flat, flat_keep, c)
        start = 0
        for name, (weight, keep) in tensors.items():
            size = weight.numel()
            new_keeps[name] = keep & ~gone[start : start + size].view_as(keep)
            start += size
        rows.append({"layer": "(global)", "pqi": index, "unmasked": d, "r": r, "c": c, "pruned": int(gone.sum())})
    for name, (weight, keep) in tensors.items():
        if scope == "layer":
            index = pq_index(weight, p, q, keep, "layer")
            d = int(keep.sum())
            r, c = sap_prune_count(d, index, p, q, eta_r, gamma, beta)
            gone = _below_pivot(weight.abs(), keep, c)
            new_keeps[name] = keep & ~gone
            rows.append({"layer": name, "pqi": index, "unmasked": d, "r": r, "c": c, "pruned": int(gone.sum())})
        elif scope == "neuron":
            indices = pq_index(weight, p, q, keep, "neuron")
            row_weights, row_keeps = weight.abs().reshape(weight.shape[0], -1), keep.reshape(weight.shape[0], -1)
            gone = torch.zeros_like(row_keeps)
            counts = []
            for row in range(weight.shape[0]):
                _, c = sap_prune_count(int(row_keeps[row].sum()), float(indices[row]), p, q, eta_r, gamma, beta)
                counts.append(c)
                gone[row] = _below_pivot(row_weights[row], row_keeps[row], c)
            new_keeps[name] = keep & ~gone.view_as(keep)
            rows.append({"layer": name, "pqi_mean": float(indices.mean()), "unmasked": int(keep.sum()), "c": sum(counts),
                         "pruned": int(gone.sum())})
    for name, module in layers.items():
        _set_mask(module, new_keeps[name])
    return rows


def _rewind(model: nn.Module, initial: dict[str, torch.Tensor]) -> None:
    """Every parameter back to ``initial`` (``weight_orig`` takes the initial ``weight``); pruned entries stay masked."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            key = name[: -len("_orig")] if name.endswith("weight_orig") else name
            parameter.copy_(initial[key])


def sparsity(model: nn.Module) -> float:
    """Fraction of the prunable weights that are masked or exactly zero."""
    total = pruned = 0
    for module in prunable_layers(model).values():
        weight, keep = _weight_and_mask(module)
        total += weight.numel()
        pruned += int((~keep | (weight == 0)).sum())
    return pruned / total if total else 0.0


def folded(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its pruning masks folded into plain weights, in eval mode."""
    result = copy.deepcopy(model)
    for module in prunable_layers(result).values():
        if hasattr(module, "weight_mask"):
            torch_prune.remove(module, "weight")
    return result.eval()


def prune_sap(
    model: nn.Module,
    train_data,
    eval_data,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    epochs: int = DEFAULT_EPOCHS,
    dense_epochs: int | None = None,
    p: float = DEFAULT_P,
    q: float = DEFAULT_Q,
    eta_r: float = DEFAULT_ETA_R,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    scope: str = "layer",
    rewind: str = "init",
    max_accuracy_drop: float | None = None,
    optimizer: str = "sgd",
    lr: float = DEFAULT_LR,
    scheduler: str = "cosine",
    weight_decay: float = 5e-4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> PruneOutcome:
    """SAP: train ``model`` (``dense_epochs``, default ``epochs``), then ``iterations`` times prune by the PQ Index,
    rewind and retrain ``epochs``. ``model`` is not modified; its weights are the rewind point for ``rewind="init"``.
    """
    require_finite(p=p, q=q, eta_r=eta_r, gamma=gamma, beta=beta, max_accuracy_drop=max_accuracy_drop, lr=lr,
                   weight_decay=weight_decay)
    if rewind not in REWINDS:
        raise ValueError(f"rewind must be one of {', '.join(REWINDS)}, got {rewind!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")
    if max_accuracy_drop is not None and not max_accuracy_drop >= 0.0:
        raise ValueError(f"max_accuracy_drop must be non-negative, got {max_accuracy_drop}")
    if out_dir is not None:
        check_outputs(out_dir, force=force)
    train_set, eval_set = as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data")
    config = OptimConfig(epochs=epochs, optimizer=optimizer, lr=lr, scheduler=scheduler, weight_decay=weight_decay,
                         batch_size=batch_size)
    working = copy.deepcopy(model)
    initial = {key: value.detach().clone() for key, value in working.named_parameters()}
    first = dataclasses.replace(config, epochs=epochs if dense_epochs is None else dense_epochs)
    accuracy, best_epoch = train_keep_best(working, train_set, eval_set, first, seed=seed, desc="dense training")
    dense_accuracy = accuracy
    history = [{"iteration": 0, "accuracy": accuracy, "best_epoch": best_epoch, "sparsity": sparsity(working), "layers": []}]
    chosen = folded(working)
    chosen_record = history[0]
    for iteration in range(1, iterations + 1):
        rows = sap_step(working, p=p, q=q, eta_r=eta_r, gamma=gamma, beta=beta, scope=scope)
        if not any(row["pruned"] for row in rows):
            history[-1]["stop"] = "SAP pruned nothing more"
            break
        if rewind == "init":
            _rewind(working, initial)
        accuracy, best_epoch = train_keep_best(working, train_set, eval_set, config, seed=seed + iteration,
                                                     desc=f"iteration {iteration}'s retraining")
        record = {"iteration": iteration, "accuracy": accuracy, "best_epoch": best_epoch, "sparsity": sparsity(working),
                  "layers": rows}
        history.append(record)
        if max_accuracy_drop is None or accuracy >= dense_accuracy - max_accuracy_drop:
            chosen, chosen_record = folded(working), record
    outcome = PruneOutcome(
        model=chosen, method="sap", dense_accuracy=dense_accuracy, accuracy=chosen_record["accuracy"], arch_kwargs={},
        history=history,
        details={"iteration": chosen_record["iteration"], "sparsity": chosen_record["sparsity"], "scope": scope,
                 "rewind": rewind, "p": p, "q": q, "eta_r": eta_r, "gamma": gamma, "beta": beta},
    )
    if out_dir is not None:
        write_outcome(outcome, out_dir, force=force)
    return outcome
