"""Pruning masks: which weights are gone, kept as ``torch.nn.utils.prune`` reparametrizations.

The first pruning of a layer calls ``torch.nn.utils.prune.custom_from_mask``
(``weight_orig`` + ``weight_mask``); later iterations update that
``weight_mask`` in place, so one reparametrization per layer carries every
iteration and checkpoints have the form ``checkpoint.load_state_dict`` folds.
Ties in magnitude inside a layer: the lower flat index is pruned first (a
stable sort), so runs are deterministic. A weight that is exactly zero counts
as pruned.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight the module computes with: ``weight_orig * weight_mask`` while pruning masks are attached."""
    with torch.no_grad():
        if hasattr(module, "weight_orig") and hasattr(module, "weight_mask"):
            return (module.weight_orig * module.weight_mask).detach()
        return module.weight.detach()


def refresh_pruned_weights(model: nn.Module) -> None:
    """Recompute pruned ``weight`` attributes outside autograd, so the model can be deep-copied.

    A forward pass with gradients leaves ``weight = weight_orig * weight_mask``
    as a non-leaf tensor, which ``copy.deepcopy`` refuses.
    """
    with torch.no_grad():
        for module in model.modules():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, torch_prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``, pruning reparametrizations included."""
    refresh_pruned_weights(model)
    return copy.deepcopy(model)


def make_permanent(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every pruning mask folded into its tensor (``torch.nn.utils.prune.remove``)."""
    permanent = copy_model(model)
    for module in permanent.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                torch_prune.remove(module, hook._tensor_name)
    return permanent


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Qualified layer name -> boolean keep-mask of its weight, for every layer with a pruning mask."""
    return {
        name: module.weight_mask.detach().to(torch.bool).clone()
        for name, module in model.named_modules()
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig")
    }


def prune_smallest(module: nn.Module, count: int) -> int:
    """Prune the ``count`` smallest-magnitude non-zero weights of ``module`` (ties: lower flat index first).

    The first call attaches a ``torch.nn.utils.prune`` mask; later calls update
    it in place. Returns the number of weights left.
    """
    weight = effective_weight(module)
    alive = (weight != 0).flatten()
    if count > int(alive.sum()):
        raise ValueError(f"cannot prune {count} weights: only {int(alive.sum())} are left")
    scores = torch.where(alive, weight.abs().flatten(), torch.full_like(weight.flatten(), torch.inf))
    chosen = torch.argsort(scores, stable=True)[:count]
    keep = alive.clone()
    keep[chosen] = False
    mask = keep.view_as(weight).to(weight.dtype)
    with torch.no_grad():
        if hasattr(module, "weight_mask") and hasattr(module, "weight_orig"):
            module.weight_mask.copy_(mask)
        else:
            torch_prune.custom_from_mask(module, "weight", mask)
    return int(keep.sum())


def attach_masks(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Give every layer that ``state_dict`` has a ``weight_mask`` for a (still all-ones) pruning mask."""
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith(".weight_mask"):
            continue
        module = modules.get(key[: -len(".weight_mask")])
        if module is not None and not hasattr(module, "weight_mask"):
            torch_prune.identity(module, "weight")

