"""Residual units: which modules are ones, what their branch is, and their features on data.

A residual unit computes ``relu(branch(x) + shortcut(x))``. The structured
methods need three facts about one, kept in one registry keyed by module
type (Torch-Pruning's habit: one table, every method asks it):

- ``branch_end``: the last module of the branch (its BatchNorm); its output,
  before the add, is the unit's feature for the energy statistics;
- ``shortcut``: the attribute holding the shortcut module (torchvision's
  ``downsample``), or None for the identity;
- ``width_out`` / ``width_in``: the convolutions whose output / input
  channels are the unit's hidden width (ITPruner's variable): the cost of
  each scales with the width once per side.

Removing a unit replaces it by ``relu(shortcut(x))`` (``nn.ReLU()`` for an
identity shortcut, whose state dict is empty; ``Sequential(downsample, relu)``
otherwise, whose keys equal the unit's shortcut keys), so a checkpoint of
the shallower model loads into an architecture built with the unit removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from egp_export.errors import UnsupportedModelError


@dataclass(frozen=True)
class UnitKind:
    """How one residual-unit type is built (attribute names of its submodules)."""

    branch_end: str
    shortcut: str | None
    width_out: tuple[str, ...]
    width_in: tuple[str, ...]


# Keyed by the class's qualified name, so that measures imports neither the demo nor torchvision.
UNIT_KINDS: dict[str, UnitKind] = {
    # relu2(bn2(conv2(relu1(conv1(x)))) + x): hidden = conv1's outputs = conv2's inputs
    "egp_export.demo.digits.ExpansionBlock": UnitKind(branch_end="bn2", shortcut=None, width_out=("conv1",), width_in=("conv2",)),
    # relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x))
    "torchvision.models.resnet.BasicBlock": UnitKind(
        branch_end="bn2", shortcut="downsample", width_out=("conv1",), width_in=("conv2",)
    ),
    # relu(bn3(conv3(.. conv2(.. conv1(x)))) + downsample(x)): conv2 is width x width, its cost is quadratic
    "torchvision.models.resnet.Bottleneck": UnitKind(
        branch_end="bn3", shortcut="downsample", width_out=("conv1", "conv2"), width_in=("conv2", "conv3")
    ),
}


@dataclass(frozen=True)
class ResidualUnit:
    name: str
    module: nn.Module
    kind: UnitKind


def kind_of(module: nn.Module) -> UnitKind | None:
    """The registry entry of ``module``'s exact type (subclasses may compute something else), or None."""
    return UNIT_KINDS.get(f"{type(module).__module__}.{type(module).__qualname__}")


def residual_units(model: nn.Module) -> list[ResidualUnit]:
    """The registered residual units of ``model`` in registration (forward) order."""
    return [ResidualUnit(name, module, kind) for name, module in model.named_modules() if (kind := kind_of(module))]


def require_units(
    model: nn.Module, needed_by: str = "this method needs residual units", instead: str = ""
) -> list[ResidualUnit]:
    """``residual_units``, or UnsupportedModelError (a ValueError) saying what ``needed_by`` needs and ``instead``."""
    units = residual_units(model)
    if not units:
        known = ", ".join(UNIT_KINDS)
        raise UnsupportedModelError(
            f"{needed_by}, and {type(model).__name__} has no residual unit of a known type "
            f"({known}); {instead + ', or ' if instead else ''}add its unit type to "
            "egp_export.measures.units.UNIT_KINDS"
        )
    return units


def removed_unit(unit: ResidualUnit) -> nn.Module:
    """What a removed unit becomes: relu(shortcut(x)), with the shortcut's weights kept under the same keys."""
    shortcut = getattr(unit.module, unit.kind.shortcut) if unit.kind.shortcut else None
    if shortcut is None:
        return nn.ReLU()
    return nn.Sequential(OrderedDict([(unit.kind.shortcut, shortcut), ("relu", nn.ReLU())]))


def remove_units(model: nn.Module, names: Sequence[str]) -> None:
    """Replace the residual units ``names`` of ``model`` (in place) by relu(shortcut(x))."""
    units = {unit.name: unit for unit in residual_units(model)}
    missing = [name for name in names if name not in units]
    if missing:
        raise ValueError(f"no residual units named {', '.join(missing)}; the model has {', '.join(units) or 'none'}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, removed_unit(units[name]))


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(tensor.shape[0], -1).to(torch.float64).cpu()


@torch.no_grad()
def unit_features(
    model: nn.Module, inputs: torch.Tensor, where: str = "branch", batch_size: int = 256
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({unit name: features (n, C*H*W) float64}, model outputs) of ``model`` (eval mode) on ``inputs``.

    ``where="branch"``: the residual branch's output before the add (the
    energy method's feature); ``"output"``: the unit's output (ITPruner's).
    """
    if where not in ("branch", "output"):
        raise ValueError(f"where must be 'branch' or 'output', got {where!r}")
    units = require_units(model)
    captured: dict[str, list[torch.Tensor]] = {unit.name: [] for unit in units}
    handles = []
    for unit in units:
        target = getattr(unit.module, unit.kind.branch_end) if where == "branch" else unit.module
        handles.append(target.register_forward_hook(lambda _m, _i, out, name=unit.name: captured[name].append(_flat(out))))
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for start in range(0, len(inputs), batch_size):
            # A copy of each batch: a model may write into its input, and ``inputs`` are the caller's.
            outputs.append(_flat(model(inputs[start : start + batch_size].clone())))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in captured.items()}, torch.cat(outputs)
