"""Residual-unit removal by energy statistics (Soltani, Wu, Li, Ding, Tarokh; suuyawu/PED-Model-Compression).

Every stage, from the reference's ``mcfd/inform.py``, ``mcfd/utils.py:
Policy`` and ``mcfd/ckmeans.py``:

1. score every active residual unit: the class energy score of its branch
   output (after the branch's last BatchNorm, before the shortcut add,
   flattened per sample, no pooling), averaged over ``rounds`` draws of
   ``samples`` training inputs (``egp_export.measures.layers.unit_scores``);
   ``score="dcor"`` uses the distance correlation between that feature and
   the model's outputs instead;
2. cluster the scores into K groups with the exact 1-D k-means
   (``measures.ckmeans``, deterministic on ties);
3. in each group keep the first unit (closest to the input) and remove the
   others: active - K units go. A removed unit becomes relu(shortcut(x))
   (``measures.units.remove_units``);
4. retrain, keeping the best validation epoch.

Units of similar score are taken as redundant: the group keeps one
representative. ``groups`` gives K per stage (an int for every stage; None:
half the active units, rounded up). A stage with K >= active removes nothing
and ends the run. The result records ``removed_blocks`` (qualified module
names) in ``arch_kwargs``: ``digits_resnet(removed_blocks=...)`` rebuilds it.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence

from torch import nn

from egp_export.measures.ckmeans import ckmeans
from egp_export.measures.layers import DEFAULT_ROUNDS, DEFAULT_SAMPLES, UNIT_SCORES, unit_scores
from egp_export.measures.units import remove_units, require_units, residual_units
from egp_export.prune.outcome import PruneOutcome, check_outputs, train_keep_best, write_outcome
from egp_export.prune.training import DEFAULT_BATCH_SIZE, OptimConfig, as_dataset, evaluate, require_finite

DEFAULT_EPOCHS = 10
DEFAULT_LR = 0.05


def units_to_remove(scores: dict[str, float], groups: int) -> list[str]:
    """The units (in ``scores``' order, i.e. forward order) that all but the first of each k-means group make up."""
    names = list(scores)
    clusters = ckmeans([scores[name] for name in names], groups)
    return [names[index] for cluster in clusters for index in sorted(cluster)[1:]]


def prune_energy(
    model: nn.Module,
    train_data,
    eval_data,
    *,
    stages: int = 1,
    groups: int | Sequence[int] | None = None,
    score: str = "energy",
    rounds: int = DEFAULT_ROUNDS,
    samples: int = DEFAULT_SAMPLES,
    standardize: bool = False,
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
    """Remove residual units of the trained ``model`` by energy statistics over ``stages`` stages (``model`` untouched)."""
    require_finite(lr=lr, weight_decay=weight_decay)
    if score not in UNIT_SCORES:
        raise ValueError(f"score must be one of {', '.join(UNIT_SCORES)}, got {score!r}")
    if stages < 1:
        raise ValueError(f"stages must be at least 1, got {stages}")
    per_stage = list(groups) if isinstance(groups, Sequence) else [groups] * stages
    if len(per_stage) != stages:
        raise ValueError(f"groups gives K for {len(per_stage)} stages, but stages is {stages}")
    if any(k is not None and k < 1 for k in per_stage):
        raise ValueError(f"every K in groups must be at least 1, got {per_stage}")
    require_units(model, "energy block removal removes residual units")
    if out_dir is not None:
        check_outputs(out_dir, force=force)
    train_set, eval_set = as_dataset(train_data, "train_data"), as_dataset(eval_data, "eval_data")
    config = OptimConfig(epochs=epochs, optimizer=optimizer, lr=lr, scheduler=scheduler, weight_decay=weight_decay,
                         batch_size=batch_size)
    working = copy.deepcopy(model).eval()
    dense_accuracy = evaluate(working, eval_set)
    history = [{"stage": 0, "accuracy": dense_accuracy, "units": [unit.name for unit in residual_units(working)]}]
    removed: list[str] = []
    for stage, k in enumerate(per_stage, start=1):
        scores = unit_scores(working, train_set, score, rounds=rounds, samples=samples, standardize=standardize,
                             seed=seed + stage)
        k = math.ceil(len(scores) / 2) if k is None else k
        going = units_to_remove(scores, k)
        if not going:
            history[-1]["stop"] = f"stage {stage}: K={k} groups for {len(scores)} units remove nothing"
            break
        remove_units(working, going)
        removed += going
        accuracy, best_epoch = train_keep_best(working, train_set, eval_set, config, seed=seed + stage,
                                                     desc=f"stage {stage}'s retraining")
        history.append({"stage": stage, "groups": k, "scores": scores, "removed": going, "accuracy": accuracy,
                        "best_epoch": best_epoch, "units": [unit.name for unit in residual_units(working)]})
    outcome = PruneOutcome(
        model=working.eval(), method="energy" if score == "energy" else "dcor", dense_accuracy=dense_accuracy,
        accuracy=history[-1]["accuracy"], arch_kwargs={"removed_blocks": tuple(removed)}, history=history,
        details={"removed_blocks": list(removed), "units_left": len(residual_units(working)), "score": score,
                 "rounds": rounds, "samples": samples, "standardize": standardize},
    )
    if out_dir is not None:
        write_outcome(outcome, out_dir, force=force)
    return outcome
