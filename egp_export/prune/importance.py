"""How much each layer matters, and how many weights each one loses: EGP's and NEPENTHE's formulas.

Layer entropy, two definitions (``entropy=``):

- ``"reference"`` (EGP's default), as EGP's reference code computes it
  (``test_entropy``): per batch b of the entropy samples,
  ``p_c^b`` = mean of 1[z_c > 0] over the batch and space,
  ``H_l^b`` = mean of h(p_c^b) over the neurons c that are *not constant in
  that batch* (0 < p_c^b < 1), 0 when every neuron is; then
  ``H_l = mean over batches of H_l^b``. The reference clamps p at 1e-5 inside
  the logarithm; here h is exact. A neuron ON in one batch and OFF in another
  adds nothing, so H_l can be 0 while the pooled entropy is not.
- ``"pooled"``: ``H_l`` = mean over all neurons of h(p_c), p_c over every
  sample at once: ``SiteStats.entropy``, the compiler's measurement.

A layer feeding several sites takes their neurons together (per batch for
``"reference"``): zero only when every one of them is.

Importance and budget, per iteration over the eligible layers:

    I_l = H_l * mean |w|                       over the layer's non-zero weights (EGP)
    R_l = S / I_l                              S = sum of I_k over the layers still to be served
    n_l = amount * softmax(R)_l

NEPENTHE (Liao et al. 2024, no public code) uses neuron-level magnitudes:
``I_l = mean_c h(p_c) * mean|w_c|`` with ``w_c`` the non-zero incoming
weights of neuron c (0 for an emptied row), so a neuron that is already
constant adds nothing, however large its weights. Its text does not pin down
the aggregation; this one uses the pooled p_c.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from egp_export.analysis.activations import binary_entropy

ENTROPY_DEFINITIONS = ("reference", "pooled")


def pooled_layer_entropy(neuron_entropies: Sequence[torch.Tensor]) -> float:
    """H_l over every neuron of every site the layer feeds: mean of h(p_c), p_c pooled over all samples."""
    return float(torch.cat(list(neuron_entropies)).mean())


def batch_layer_entropies(batch_on_fractions: Sequence[torch.Tensor]) -> torch.Tensor:
    """H_l^b per batch: mean h(p_c^b) over the neurons not constant in batch b, 0 if all are (float64, [batches]).

    ``batch_on_fractions`` holds, per site the layer feeds, a ``[batches, neurons]``
    tensor of p_c^b; the sites' neurons are taken together.
    """
    fractions = torch.cat([f.to(torch.float64) for f in batch_on_fractions], dim=1)
    varying = (fractions > 0) & (fractions < 1)
    entropy_sum = torch.where(varying, binary_entropy(fractions), 0.0).sum(1)
    count = varying.sum(1)
    return torch.where(count > 0, entropy_sum / count.clamp_min(1), 0.0)


def egp_importance(entropy: float, weight: torch.Tensor) -> float:
    """I_l of EGP: the layer entropy times the mean |w| of the layer's non-zero weights."""
    alive = weight[weight != 0]
    mean_abs = float(alive.abs().to(torch.float64).mean()) if alive.numel() else 0.0
    return entropy * mean_abs


def nepenthe_importance(neuron_entropies: Sequence[torch.Tensor], weight: torch.Tensor) -> float:
    """I_l of NEPENTHE: mean over neurons of h(p_c) times the mean |w| of neuron c's non-zero weights."""
    rows = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    alive = (rows != 0).sum(1)
    row_mean = torch.where(alive > 0, rows.abs().sum(1) / alive.clamp_min(1), torch.zeros_like(rows[:, 0]))
    terms = []
    for entropies in neuron_entropies:
        if entropies.numel() != row_mean.numel():
            raise ValueError(
                f"a site fed by a layer with {row_mean.numel()} output neurons has {entropies.numel()} neurons"
            )
        terms.append(entropies.to(torch.float64) * row_mean)
    return float(torch.cat(terms).mean())


def softmax_shares(ratios: torch.Tensor) -> torch.Tensor:
    """softmax(ratios), computed as exp(R - max R); +inf entries share everything equally (the limit)."""
    ratios = ratios.to(torch.float64)
    infinite = torch.isinf(ratios) & (ratios > 0)
    if infinite.any():
        return infinite.to(torch.float64) / infinite.sum()
    exps = torch.exp(ratios - ratios.max())
    return exps / exps.sum()


def _ratios(importance: torch.Tensor) -> torch.Tensor:
    """R_l = S / I_l with S = sum of ``importance``; +inf where I_l = 0 (the limit of S / I)."""
    total = importance.sum()
    return torch.where(importance > 0, total / importance.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)


def allocate_budgets(importance: Mapping[str, float], remaining: Mapping[str, int], amount: int) -> dict[str, int]:
    """How many weights each layer loses: ``amount`` split by softmax(S / I), capped, excess redistributed.

    ``importance`` and ``remaining`` are keyed by the eligible layers, in graph
    order. As in EGP's reference code (its ``while True`` loop): R_l = S / I_l
    with S the sum of I over the layers still open; a layer whose share
    exceeds what it has left loses all of it, leaves the open set and takes
    its importance out of S; the rest of ``amount`` is split over the others
    with R recomputed from the new S, until no share exceeds its cap. The
    reference truncates each share to an integer; here shares are rounded by
    largest remainder (ties to the earlier layer), so the budgets add up to
    ``min(amount, sum(remaining))`` exactly. ``I_l = 0`` (NEPENTHE, when every
    neuron that still varies has lost its own weights) is R_l = +inf, the
    limit of the softmax: such layers share the budget equally first. The
    softmax is evaluated stably (``exp(R - max R)``).
    """
    names = list(importance)
    if set(names) != set(remaining):
        raise ValueError("importance and remaining must name the same layers")
    values = {name: float(importance[name]) for name in names}
    if any(value < 0 or math.isnan(value) for value in values.values()):
        raise ValueError(f"importances must be non-negative numbers, got {list(values.values())}")
    budgets = {name: 0 for name in names}
    left = min(int(amount), sum(int(remaining[n]) for n in names))
    open_layers = [n for n in names if remaining[n] > 0]
    while left > 0 and open_layers:
        ratios = _ratios(torch.tensor([values[n] for n in open_layers], dtype=torch.float64))
        desired = (left * softmax_shares(ratios)).tolist()
        capped = [n for n, want in zip(open_layers, desired) if want > remaining[n]]
        if capped:
            for name in capped:
                budgets[name] = int(remaining[name])
                left -= int(remaining[name])
            open_layers = [n for n in open_layers if n not in capped]
            continue
        floors = [math.floor(want) for want in desired]
        by_remainder = sorted(range(len(open_layers)), key=lambda i: -(desired[i] - floors[i]))
        for position in by_remainder[: left - sum(floors)]:
            floors[position] += 1
        for name, count in zip(open_layers, floors):
            budgets[name] = count
        left = 0
    return budgets
