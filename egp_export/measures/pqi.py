"""The PQ Index of a weight tensor and SAP's pruning count (Diao et al., "Pruning Deep Neural Networks from a
Sparsity Perspective", ICLR 2023).

Written from the paper's formulas, checked against the reference code
(diaoenmao/Pruning-Deep-Neural-Networks-from-a-Sparsity-Perspective,
``src/modules/sparsity_index.py: SparsityIndex.make_si`` and
``src/modules/compression.py: make_bound_si, Compression.compress``):

    I_{p,q}(w) = 1 - d^(1/q - 1/p) * ||w||_p / ||w||_q        0 < p < q
    r = ceil(d * (1 + eta_r)^(q/(p-q)) * (1 - I)^(q*p/(q-p)))  the bound on the entries that matter
    ratio = clamp(gamma * (1 - r/d), 0, beta),  c = floor(d * ratio)

``d`` counts the *unmasked* entries: pruned entries are out of ``d`` and of
the norms, an unmasked weight that is exactly zero still counts. I lies in
[0, 1 - d^(1/q-1/p)] (power-mean inequality): 0 for a flat vector, larger the
sparser. Where the reference leaves a case open:

- ``d = 0`` gives 0, as in the reference. Unmasked entries that are all zero
  give 0 too (the reference divides 0 by 0 and gets NaN, which SAP's count
  cannot use); with I = 0 SAP prunes nothing there.
- Rounding: a negative I (rounding noise, the exact value is >= 0) is 0, as
  the reference's clamp of values in (-1e-5, 0) does. ``r`` is the ceiling of
  a product that is often an exact integer in exact arithmetic (1 - I = 1/d
  for a one-hot vector); the ceiling is taken after a relative 1e-12 shave so
  that float error (``1 - 0.99 = 0.010000000000000009``) cannot add one, and
  c's floor after a 1e-12 lift, so that ``144 * (1 - 125/144)`` is 19, not
  18 (the reference computes both in float32 and can be off by one).
- Sums run in float64 whatever the weight's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SCOPES = ("neuron", "layer", "global")
DEFAULT_P = 0.5
DEFAULT_Q = 1.0
DEFAULT_ETA_R = 0.0
DEFAULT_GAMMA = 1.0
DEFAULT_BETA = 0.9
# Relative slack before the ceiling of r and the floor of c (see the module docstring).
_ROUNDING_SLACK = 1e-12


def _check_pq(p: float, q: float) -> None:
    if not 0.0 < p < q:
        raise ValueError(f"the PQ Index needs 0 < p < q, got p={p}, q={q}")


def _pq_rows(rows: torch.Tensor, keep: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """I_{p,q} of every row of ``rows`` over its entries where ``keep`` (float64, one value per row)."""
    magnitudes = torch.where(keep, rows.abs().to(torch.float64), torch.zeros((), dtype=torch.float64))
    d = keep.sum(dim=1).to(torch.float64)
    # ||w||_p / ||w||_q with the sums taken once; d^(1/q - 1/p) puts both on the per-entry (power-mean) scale.
    norm_p = magnitudes.pow(p).sum(dim=1).pow(1.0 / p)
    norm_q = magnitudes.pow(q).sum(dim=1).pow(1.0 / q)
    usable = (d > 0) & (norm_q > 0)
    ratio = torch.where(usable, norm_p / torch.where(usable, norm_q, 1.0), 1.0)
    scale = torch.where(d > 0, d, 1.0).pow(1.0 / q - 1.0 / p)
    index = torch.where(usable, 1.0 - scale * ratio, 0.0)
    return index.clamp(min=0.0)


def pq_index(
    weight: torch.Tensor | Sequence[torch.Tensor],
    p: float = DEFAULT_P,
    q: float = DEFAULT_Q,
    mask: torch.Tensor | Sequence[torch.Tensor] | None = None,
    scope: str = "layer",
) -> float | torch.Tensor:
    """The PQ Index I_{p,q} of ``weight`` over its unmasked entries (``mask`` true = kept; None = all kept).

    ``scope="layer"``: one float for the whole tensor. ``"neuron"``: a float64
    tensor with one value per output neuron (row of ``weight.view(out, -1)``).
    ``"global"``: one float over several tensors concatenated (``weight`` and
    ``mask`` may then be sequences of tensors).
    """
    _check_pq(p, q)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    weights = list(weight) if isinstance(weight, (list, tuple)) else [weight]
    if isinstance(mask, (list, tuple)):
        masks = list(mask)
    else:
        masks = [mask] * len(weights) if mask is None else [mask]
    if len(masks) != len(weights):
        raise ValueError(f"{len(weights)} weight tensors but {len(masks)} masks")
    keeps = []
    for tensor, keep in zip(weights, masks, strict=True):
        keep = torch.ones_like(tensor, dtype=torch.bool) if keep is None else keep.to(torch.bool)
        if keep.shape != tensor.shape:
            raise ValueError(f"mask of shape {tuple(keep.shape)} for a weight of shape {tuple(tensor.shape)}")
        keeps.append(keep)
    if scope == "global":
        flat = torch.cat([tensor.detach().reshape(-1) for tensor in weights]).view(1, -1)
        return float(_pq_rows(flat, torch.cat([keep.reshape(-1) for keep in keeps]).view(1, -1), p, q)[0])
    if len(weights) != 1:
        raise ValueError(f"scope {scope!r} takes one weight tensor, got {len(weights)}; use scope='global'")
    tensor, keep = weights[0].detach(), keeps[0]
    if scope == "layer":
        return float(_pq_rows(tensor.reshape(1, -1), keep.reshape(1, -1), p, q)[0])
    rows = tensor.reshape(tensor.shape[0], -1) if tensor.dim() else tensor.reshape(1, 1)
    return _pq_rows(rows, keep.reshape(rows.shape), p, q)


def sap_prune_count(
    d: int,
    pqi: float,
    p: float = DEFAULT_P,
    q: float = DEFAULT_Q,
    eta_r: float = DEFAULT_ETA_R,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
) -> tuple[int, int]:
    """SAP's (r, c) for ``d`` unmasked entries of PQ Index ``pqi``: r entries matter, c are to be pruned.

    r = ceil(d (1+eta_r)^(q/(p-q)) (1-I)^(qp/(q-p))); c = floor(d clamp(gamma (1 - r/d), 0, beta)).
    """
    _check_pq(p, q)
    if d < 0:
        raise ValueError(f"d must be non-negative, got {d}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (the largest fraction pruned at once) must be in [0, 1], got {beta}")
    if eta_r <= -1.0:
        raise ValueError(f"eta_r must be greater than -1, got {eta_r}")
    if d == 0:
        return 0, 0
    bound = d * (1.0 + eta_r) ** (q / (p - q)) * max(1.0 - pqi, 0.0) ** (q * p / (q - p))
    r = math.ceil(bound * (1.0 - _ROUNDING_SLACK))
    ratio = min(max(gamma * (1.0 - r / d), 0.0), beta)
    return r, math.floor(d * ratio * (1.0 + _ROUNDING_SLACK))
