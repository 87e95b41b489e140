"""LayerMerge's alternative for border-approximate chains: move all padding to the first conv.

A chain of convs whose later members pad (ResNet's 3x3 -> 3x3 once the ReLU
between them is linear) merges exactly only away from the border. LayerMerge
instead pads the first conv by the whole chain's padding and the later ones
not at all: the network's function changes at the border, the user
fine-tunes it, and then the chain merges exactly (class EXACT).

``padding_plan`` finds those chains in a model (the same analysis and folding
``compile`` runs, up to merging) and returns the plan as data;
``apply_padding_plan`` applies it to a model of the same architecture, in
place and only when asked, so a plan can be saved as JSON and applied to a
freshly built model before fine-tuning:

    P_1 = sum_k p_k prod_{m<k} s_m,   p_k = 0 for k > 1
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from egp_export.algebra.convchain import ChainClass, ConvLayer, chain_class
from egp_export.analysis.batches import as_batches
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.ops import named_modules
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.passes import PassManager, default_steps
from egp_export.passes.merge_conv_chains import conv_chains


@dataclass(frozen=True)
class PaddingMove:
    """One chain: its conv modules (by qualified name) and their padding before and after the move."""

    convs: tuple[str, ...]
    before: tuple[tuple[int, ...], ...]
    after: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _move(chain: list, modules: dict) -> PaddingMove | None:
    """All of a border-approximate chain's padding on its first conv, or None for chains that merge exactly."""
    layers = [ConvLayer.from_module(modules[str(n.target)]) for n in chain]
    if chain_class(layers) is not ChainClass.BORDER_APPROXIMATE:
        return None
    total = [0] * layers[0].rank
    stride = [1] * layers[0].rank
    for layer in layers:
        total = [t + p * s for t, p, s in zip(total, layer.padding, stride)]
        stride = [s * ls for s, ls in zip(stride, layer.stride)]
    after = (tuple(total),) + tuple((0,) * layer.rank for layer in layers[1:])
    return PaddingMove(tuple(str(n.target) for n in chain), tuple(lay.padding for lay in layers), after)


def padding_plan(model: nn.Module, calibration, *, tolerance: float = 1e-5) -> list[PaddingMove]:
    """The padding moves that would make every border-approximate linear chain of ``model`` exact."""
    batches = as_batches(calibration)
    gm = trace(model)
    calibrate(gm, batches)
    PassManager(default_steps(tolerance, conv_merging=False), example_input=batches[0][:1]).run(gm)
    propagate_shapes(gm, batches[0][:1])
    modules = named_modules(gm)
    moves = (_move(chain, modules) for chain, _ in conv_chains(gm))
    return [move for move in moves if move is not None]


def apply_padding_plan(model: nn.Module, moves: list[PaddingMove], example: torch.Tensor | None = None) -> nn.Module:
    """Set the planned paddings on ``model``'s convs, in place (the caller asked for exactly that).

    With ``example`` the model is run once to check that the output shape did
    not change (a chain whose strides do not line up would).
    """
    before = None
    if example is not None:
        with torch.no_grad():
            before = model.eval()(example).shape
    for move in moves:
        for name, padding in zip(move.convs, move.after):
            conv = model.get_submodule(name)
            if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ValueError(f"'{name}' is not a convolution in this model; the plan is for another architecture")
            conv.padding = tuple(padding)
    if example is not None:
        with torch.no_grad():
            after = model(example).shape
        if after != before:
            raise ValueError(f"the padding plan changed the output shape from {tuple(before)} to {tuple(after)}")
    return model


def save_plan(moves: list[PaddingMove]) -> str:
    return json.dumps([m.to_dict() for m in moves], indent=1)


def load_plan(text: str) -> list[PaddingMove]:
    return [
        PaddingMove(tuple(m["convs"]), tuple(tuple(p) for p in m["before"]), tuple(tuple(p) for p in m["after"]))
        for m in json.loads(text)
    ]
