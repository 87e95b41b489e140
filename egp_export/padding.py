"""LayerMerge's alternative for border-approximate chains: move all padding to the first conv.

A chain of convs whose later members pad (ResNet's 3x3 -> 3x3 once the ReLU
between them is linear) merges exactly only away from the border. LayerMerge
instead pads the first conv by the whole chain's padding and the later ones
not at all: the network's function changes at the border, the user
fine-tunes it, and then the chain merges exactly (class EXACT).

``padding_plan`` finds those chains in a model and returns the plan as data:
it runs the compile's own stages (stages.PIPELINE) up to and including the
rewrite, with the same options (split, evidence, validation, perturbation
search, leaf modules, front end) and conv merging off, so the plan rests on
the decisions the compile it accompanies makes.
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
from egp_export.analysis.inputs import Batch, call_on_copy
from egp_export.analysis.ops import named_modules
from egp_export.compile_options import CompileOptions
from egp_export.passes.merge_conv_chains import conv_chains
from egp_export.stages import PIPELINE, CompileContext

# The compile's stages the plan runs: everything up to the rewrite (no verification: nothing is compiled).
PLAN_STAGES = PIPELINE[: [stage.name for stage in PIPELINE].index("rewrite") + 1]


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


def padding_plan(model: nn.Module, calibration, options: CompileOptions | None = None, **overrides) -> list[PaddingMove]:
    """The padding moves that would make every border-approximate linear chain of ``model`` exact.

    ``options`` and ``overrides`` as for ``compile`` (give the compile's own,
    so the plan decides the same sites on the same split); conv merging is
    always off here, and ``on_stage`` sees the stages it runs.
    """
    ctx = CompileContext((options or CompileOptions()).but(**{**overrides, "conv_merging": False}), model, calibration)
    ctx.run(PLAN_STAGES)
    modules = named_modules(ctx.attempt.gm)
    moves = (_move(chain, modules) for chain, _ in conv_chains(ctx.attempt.gm))
    return [move for move in moves if move is not None]


def apply_padding_plan(model: nn.Module, moves: list[PaddingMove], example: Batch | None = None) -> nn.Module:
    """Set the planned paddings on ``model``'s convs, in place (the caller asked for exactly that).

    With ``example`` the model is run once to check that the output shape did
    not change (a chain whose strides do not line up would).
    """
    before = None
    if example is not None:
        with torch.no_grad():
            before = call_on_copy(model.eval(), example).shape
    for move in moves:
        for name, padding in zip(move.convs, move.after):
            conv = model.get_submodule(name)
            if not isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                raise ValueError(f"'{name}' is not a convolution in this model; the plan is for another architecture")
            conv.padding = tuple(padding)
    if example is not None:
        with torch.no_grad():
            after = call_on_copy(model, example).shape
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
