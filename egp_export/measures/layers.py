"""Per-layer and per-unit measures of a trained model, as report rows (``egp-export analyze --measure``).

- ``pqi``: the PQ Index of every weight tensor with dim > 1 (conv, linear,
  the first conv and the classifier included: the reference's set), at layer
  scope, with SAP's (r, c) at the defaults and the neuron-scope spread; a
  last row ``(global)`` over all of them. Masks: a ``weight_mask`` beside the
  weight (torch.nn.utils.prune) when the layer has one.
- ``energy``: per residual unit, the class energy score of its branch output
  (``energy.class_energy_score``), averaged over ``rounds`` rounds of
  ``samples`` inputs drawn with replacement (the reference's
  RandomSampler(replacement=True)); ``standardize`` divides by sqrt(dim)
  (the reference's ``score_standardize``).
- ``dcor``: per residual unit, the distance correlation between its branch
  output and the model's outputs, averaged the same way.
- ``nhsic``: ITPruner's per-unit t_i (normalised sum of linear-CKA
  similarities to the other units' outputs) and alpha_i = exp(-beta t_i),
  on one batch of ``samples`` inputs (the reference uses one test batch).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from egp_export.errors import CalibrationError
from egp_export.measures.cka import itpruner_importance, similarity_matrix
from egp_export.measures.energy import MAX_SAMPLES, class_energy_score, distance_correlation
from egp_export.measures.pqi import DEFAULT_P, DEFAULT_Q, pq_index, sap_prune_count
from egp_export.measures.units import require_units, unit_features

MEASURES = ("pqi", "energy", "dcor", "nhsic")
UNIT_SCORES = ("energy", "dcor")
# What each measure that runs the model reads; said when a model lacks it.
UNIT_MEASURE_NEEDS = {
    "energy": "scores residual units by the energy distance between classes (labelled data) of their branch outputs",
    "dcor": "scores residual units by the distance correlation of their branch outputs with the model's output",
    "nhsic": "scores residual units by the CKA similarity of their outputs",
}
DEFAULT_ROUNDS = 5
DEFAULT_SAMPLES = 512
DEFAULT_BETA = 1.0


def weight_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, weight, keep-mask) of every parameter named ``weight`` with dim > 1 (a pruned ``weight_orig`` with its mask)."""
    rows = []
    for name, module in model.named_modules():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            weight, mask = module.weight_orig.detach(), module.weight_mask.detach().to(torch.bool)
        elif isinstance(getattr(module, "weight", None), torch.Tensor):
            weight = module.weight.detach()
            mask = torch.ones_like(weight, dtype=torch.bool)
        else:
            continue
        if weight.dim() > 1:
            rows.append((f"{name}.weight" if name else "weight", weight, mask))
    return rows


def pqi_rows(model: nn.Module, p: float = DEFAULT_P, q: float = DEFAULT_Q) -> list[dict]:
    tensors = weight_tensors(model)
    rows = []
    for name, weight, mask in tensors:
        value = pq_index(weight, p, q, mask, "layer")
        neurons = pq_index(weight, p, q, mask, "neuron")
        d = int(mask.sum())
        r, c = sap_prune_count(d, value, p, q)
        rows.append({
            "name": name, "measure": "pqi", "value": value, "p": p, "q": q, "unmasked": d, "sap_r": r, "sap_prune": c,
            "neuron_min": float(neurons.min()), "neuron_mean": float(neurons.mean()), "neuron_max": float(neurons.max()),
        })
    if tensors:
        value = pq_index([t[1] for t in tensors], p, q, [t[2] for t in tensors], "global")
        d = sum(int(t[2].sum()) for t in tensors)
        r, c = sap_prune_count(d, value, p, q)
        rows.append({"name": "(global)", "measure": "pqi", "value": value, "p": p, "q": q, "unmasked": d, "sap_r": r,
                     "sap_prune": c})
    return rows


def inputs_and_labels(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) tensors from an ``(inputs, labels)`` pair or a map-style Dataset of (input, label)."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        inputs, labels = data.tensors
    elif isinstance(data, Dataset):
        pairs = [data[index] for index in range(len(data))]
        inputs = torch.stack([torch.as_tensor(pair[0]) for pair in pairs]) if pairs else torch.empty(0)
        labels = torch.as_tensor([int(pair[1]) for pair in pairs])
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, labels = (torch.as_tensor(part) for part in data)
    else:
        raise CalibrationError(
            f"data must be an (inputs, labels) pair or a Dataset of (input, label), got {type(data).__name__}."
        )
    if len(inputs) == 0 or len(inputs) != len(labels):
        raise CalibrationError(
            f"data has {len(inputs)} inputs and {len(labels)} labels; give one label per input, at least one."
        )
    if not torch.isfinite(inputs.to(torch.float64)).all():
        raise CalibrationError("data: the inputs hold NaN/Inf values; clean or drop those samples.")
    return inputs.to(torch.float32) if not inputs.is_floating_point() else inputs, labels


def unit_scores(
    model: nn.Module,
    data,
    score: str = "energy",
    *,
    rounds: int = DEFAULT_ROUNDS,
    samples: int = DEFAULT_SAMPLES,
    standardize: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    """Unit name -> score averaged over ``rounds`` draws of ``samples`` inputs with replacement (seeded)."""
    if score not in UNIT_SCORES:
        raise ValueError(f"score must be one of {', '.join(UNIT_SCORES)}, got {score!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not 2 <= samples <= MAX_SAMPLES:
        raise ValueError(f"samples must be in [2, {MAX_SAMPLES}] (the statistics need O(n^2) memory), got {samples}")
    inputs, labels = inputs_and_labels(data)
    generator = torch.Generator().manual_seed(seed)
    totals: dict[str, float] = {}
    counts: dict[str, int] = {}
    for _ in range(rounds):
        chosen = torch.randint(len(inputs), (samples,), generator=generator)
        features, outputs = unit_features(model, inputs[chosen], where="branch")
        for name, values in features.items():
            if score == "energy":
                value = class_energy_score(values, labels[chosen])
            else:
                value = distance_correlation(values, outputs)
            if value is None:
                continue
            if standardize:
                value /= math.sqrt(values.shape[1])
            totals[name] = totals.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    if not counts:
        raise CalibrationError(
            f"no round of {samples} samples held two classes: the energy score compares classes; "
            "give labelled data with at least two classes or draw more samples."
        )
    return {name: totals[name] / counts[name] for name in totals}


def nhsic_importance(
    model: nn.Module, inputs: torch.Tensor, beta: float = DEFAULT_BETA, kernel: str = "linear"
) -> dict[str, tuple[float, float]]:
    """Unit name -> (t_i, alpha_i) from the CKA similarity (``kernel``) of the units' outputs on ``inputs``."""
    features, _ = unit_features(model, inputs, where="output")
    names = list(features)
    if len(names) < 2:
        raise ValueError(f"ITPruner's importance compares units with each other; the model has {len(names)}")
    shares, alphas = itpruner_importance(similarity_matrix([features[name] for name in names], kernel), beta)
    return {name: (share, alpha) for name, share, alpha in zip(names, shares, alphas, strict=True)}


def layer_measures(
    model: nn.Module,
    data=None,
    measure: str = "pqi",
    *,
    rounds: int = DEFAULT_ROUNDS,
    samples: int = DEFAULT_SAMPLES,
    beta: float = DEFAULT_BETA,
    seed: int = 0,
) -> list[dict]:
    """Report rows of ``measure`` (one of MEASURES) for ``model``; ``data`` = (inputs, labels), unused by pqi
    (nhsic also takes the inputs alone)."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    if measure == "pqi":
        return pqi_rows(model)
    if data is None:
        raise CalibrationError(f"the {measure} measure runs the model: give data ((inputs, labels) or a Dataset).")
    require_units(model, f"the {measure} measure {UNIT_MEASURE_NEEDS[measure]}",
                  "the measures that work on any model are entropy (analyze's default) and pqi")
    if measure == "nhsic":
        inputs = data if isinstance(data, torch.Tensor) else inputs_and_labels(data)[0]
        count = min(samples, len(inputs))
        importance = nhsic_importance(model, inputs[:count], beta)
        return [{"name": name, "measure": "nhsic", "value": share, "alpha": alpha, "beta": beta, "samples": count}
                for name, (share, alpha) in importance.items()]
    scores = unit_scores(model, data, measure, rounds=rounds, samples=samples, seed=seed)
    return [{"name": name, "measure": measure, "value": value, "rounds": rounds, "samples": samples}
            for name, value in scores.items()]
