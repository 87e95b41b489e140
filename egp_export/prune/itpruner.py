"""ITPruner (Zheng et al., "An Information Theory-inspired Strategy for Automatic Network Pruning";
MAC-AutoML/ITPruner): unit widths from the units' mutual similarity, under a FLOPs budget, trained from scratch.

From the reference's ``Cifar/feature_extract.py``:

1. the outputs of every residual unit on one batch, flattened
   (``measures.units.unit_features(where="output")``);
2. S_ij = CKA of units i and j (linear kernel; ``kernel="gaussian"`` for the
   median-bandwidth RBF kernel of the CKA code), t_i = sum_{j != i} S_ij normalised to sum 1,
   alpha_i = exp(-beta t_i) (``measures.cka``);
3. widths maximising sum alpha_i x_i under FLOPs(x) <= ratio * FLOPs(dense),
   rounded and repaired to meet the budget (``measures.widths``, where the
   reference's scale flaw and what is done about it are described);
4. the architecture rebuilt with those hidden widths (``rebuild(hidden_widths=
   {unit: width})``; a width of 0 removes the unit's branch) and trained
   from scratch, as the reference trains its pruned configurations.

The reference takes the batch from the test loader; here it is the first
``samples`` training inputs. The rebuilt model's MACs are counted and must
equal the plan's: a ``rebuild`` that ignores the widths is refused.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from egp_export.measures.layers import inputs_and_labels, nhsic_importance
from egp_export.measures.widths import DEFAULT_MULTIPLE, DEFAULT_STARTS, itpruner_widths, model_macs, width_cost
from egp_export.prune.outcome import PruneOutcome, check_outputs, train_keep_best, write_outcome
from egp_export.prune.training import DEFAULT_BATCH_SIZE, DEFAULT_LR, OptimConfig, as_dataset, evaluate, require_finite

DEFAULT_EPOCHS = 20
DEFAULT_SAMPLES = 256
DEFAULT_FLOPS_RATIO = 0.5
DEFAULT_BETA = 1.0
# The plan's cost is a float64 sum of MACs times width fractions; the rebuilt model's an integer count.
_MACS_TOLERANCE = 1e-9


def prune_itpruner(
    model: nn.Module,
    train_data,
    eval_data,
    *,
    rebuild: Callable[..., nn.Module],
    flops_ratio: float = DEFAULT_FLOPS_RATIO,
    beta: float = DEFAULT_BETA,
    kernel: str = "linear",
    samples: int = DEFAULT_SAMPLES,
    multiple: int = DEFAULT_MULTIPLE,
    x_min: float = 0.0,
    starts: int = DEFAULT_STARTS,
    epochs: int = DEFAULT_EPOCHS,
    optimizer: str = "sgd",
    lr: float = DEFAULT_LR,
    scheduler: str = "cosine",
    weight_decay: float = 5e-4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    force: bool = False,
) -> PruneOutcome:
    """Choose hidden widths of the trained ``model``'s units for ``flops_ratio`` of its MACs, rebuild, train from scratch."""
    require_finite(flops_ratio=flops_ratio, beta=beta, x_min=x_min, lr=lr, weight_decay=weight_decay)
    if not 0.0 < flops_ratio <= 1.0:
        raise ValueError(f"flops_ratio must be in (0, 1], got {flops_ratio}")
    if samples < 2:
        raise ValueError(f"samples must be at least 2 (CKA compares samples), got {samples}")
    if out_dir is not None:
        check_outputs(out_dir, force=force)
    train_set, eval_set = as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data")
    inputs, _ = inputs_and_labels(train_set)
    batch = inputs[:samples]
    dense_accuracy = evaluate(model, eval_set)
    importance = nhsic_importance(model, batch, beta, kernel)
    cost, names, full_widths = width_cost(model, batch[:1])
    if list(importance) != names:
        raise RuntimeError(f"units measured {list(importance)} differ from the units costed {names}")
    full = cost([1.0] * len(names))
    plan = itpruner_widths([importance[name][1] for name in names], cost, full_widths, flops_ratio * full,
                           x_min=x_min, multiple=multiple, starts=starts, seed=seed)
    widths = dict(zip(names, plan.widths, strict=True))
    torch.manual_seed(seed)
    pruned = rebuild(hidden_widths=widths)
    measured = model_macs(pruned, batch[:1])
    if abs(measured - plan.flops) > _MACS_TOLERANCE * full:
        raise ValueError(
            f"the rebuilt model costs {measured:.0f} MACs but the widths {widths} cost {plan.flops:.0f}: "
            "rebuild must build the architecture with hidden_widths={unit name: width} (0 removes the unit's branch)"
        )
    config = OptimConfig(epochs=epochs, optimizer=optimizer, lr=lr, scheduler=scheduler, weight_decay=weight_decay,
                         batch_size=batch_size)
    accuracy, best_epoch = train_keep_best(pruned, train_set, eval_set, config, seed=seed,
                                           desc="training the pruned widths")
    history = [
        {"stage": "dense", "accuracy": dense_accuracy, "macs": full, "widths": dict(zip(names, full_widths, strict=True))},
        {"stage": "pruned", "accuracy": accuracy, "best_epoch": best_epoch, "macs": measured, "widths": widths,
         "importance": {name: {"t": t, "alpha": alpha} for name, (t, alpha) in importance.items()},
         "fractions": dict(zip(names, plan.fractions, strict=True)), "solver": plan.solver},
    ]
    outcome = PruneOutcome(
        model=pruned.eval(), method="itpruner", dense_accuracy=dense_accuracy, accuracy=accuracy,
        arch_kwargs={"hidden_widths": widths}, history=history,
        details={"hidden_widths": widths, "macs_dense": full, "macs": measured, "macs_budget": plan.budget,
                 "units_removed": [name for name, width in widths.items() if width == 0], "beta": beta,
                 "kernel": kernel},
    )
    if out_dir is not None:
        write_outcome(outcome, out_dir, force=force)
    return outcome
