"""Folding a per-neuron affine map into a conv/linear layer on either side, with the checks that make it exact.

Producer side (the map follows the layer), any padding:
    a * (W x + b) + c  =  (a W) x + (a b + c)          # scale output rows
Consumer side (the map precedes the layer):
    W (a x + c) + b    =  (W a) x + (W c + b)          # scale input columns
The consumer-side shift is only exact without zero padding: the padded border
holds 0, not c. Every check returns a reason for refusing, or None.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.algebra.convchain import explicit_padding
from egp_export.analysis.fx import sharing_refusal
from egp_export.analysis.ops import is_conv_module, is_layer_module, layer_opaque_reason, module_of
from egp_export.records import Reason, RefusalCode


def _layer_dim(module: nn.Module) -> int:
    return 1 if is_conv_module(module) else -1


def _dims_match(module: nn.Module, dim: int, rank: int | None) -> bool:
    want = _layer_dim(module)
    if want == dim:
        return True
    # A rank-2 activation [B, C]: dim 1 and dim -1 are the same axis.
    return rank == 2 and {want, dim} == {1, -1}


def layer_refusal(node: fx.Node, gm: fx.GraphModule, modules: dict[str, nn.Module]) -> Reason | None:
    """Why the weights of the layer called at ``node`` may not be changed, or None."""
    module = module_of(node, modules)
    if not is_layer_module(module):
        opaque = layer_opaque_reason(module)
        if opaque is not None:
            return Reason(opaque.code, {"node": node.name, **opaque.detail})
        return Reason(RefusalCode.NOT_A_LAYER, {"node": node.name})
    return sharing_refusal(gm, str(node.target))


def producer_refusal(
    producer: fx.Node, dim: int, rank: int | None, gm: fx.GraphModule, modules: dict[str, nn.Module]
) -> Reason | None:
    """Why a map on ``producer``'s output (along ``dim``) cannot fold into it, or None."""
    reason = layer_refusal(producer, gm, modules)
    if reason:
        return reason
    if len(producer.users) != 1:
        return Reason(RefusalCode.MULTIPLE_USERS, {"node": producer.name, "users": len(producer.users)})
    if not _dims_match(modules[str(producer.target)], dim, rank):
        return Reason(RefusalCode.AXIS_MISMATCH, {"axis": dim, "side": "output", "node": producer.name})
    return None


def consumer_refusal(
    consumer: fx.Node,
    source: fx.Node,
    dim: int,
    rank: int | None,
    has_shift: bool,
    gm: fx.GraphModule,
    modules: dict[str, nn.Module],
) -> Reason | None:
    """Why a map producing ``source`` cannot fold into ``consumer``'s input side, or None."""
    reason = layer_refusal(consumer, gm, modules)
    if reason:
        return reason
    module = modules[str(consumer.target)]
    if not _dims_match(module, dim, rank):
        return Reason(RefusalCode.AXIS_MISMATCH, {"axis": dim, "side": "input", "node": consumer.name})
    if has_shift and is_conv_module(module) and module.padding_mode == "zeros" and _pads(module):
        return Reason(RefusalCode.PADDED_SHIFT, {"node": consumer.name})
    return None


def _pads(conv: nn.Module) -> bool:
    try:
        return any(p != 0 for p in explicit_padding(conv))
    except ValueError:  # asymmetric 'same' padding: it pads
        return True


def _ensure_bias(module: nn.Module) -> torch.Tensor:
    if module.bias is None:
        rows = module.weight.shape[0]
        module.bias = nn.Parameter(torch.zeros(rows, dtype=module.weight.dtype, device=module.weight.device))
    return module.bias


def fold_into_producer(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """W' = a W (row-wise), b' = a b + c."""
    with torch.no_grad():
        weight = module.weight.to(torch.float64)
        bias = _ensure_bias(module).to(torch.float64)
        view = (-1,) + (1,) * (weight.dim() - 1)
        a = scale.to(torch.float64)
        module.weight.copy_((weight * a.reshape(view)).to(module.weight.dtype))
        module.bias.copy_((bias * a + shift.to(torch.float64)).to(module.bias.dtype))


def _input_index(module: nn.Module) -> torch.Tensor:
    """For each (output row, local input column) of the weight, the global input channel it reads."""
    rows, local = module.weight.shape[0], module.weight.shape[1]
    groups = getattr(module, "groups", 1)
    group_of_row = torch.arange(rows) // (rows // groups)
    return group_of_row[:, None] * local + torch.arange(local)[None, :]


def fold_into_consumer(module: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """W' = W a (column-wise, respecting groups), b' = b + sum_{i,k} W[o, i, k] c_i."""
    with torch.no_grad():
        weight = module.weight.to(torch.float64)
        index = _input_index(module)
        a = scale.to(torch.float64)[index]
        c = shift.to(torch.float64)[index]
        spatial = (1,) * (weight.dim() - 2)
        kernel_sums = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1)
        bias_delta = (kernel_sums * c).sum(1)
        module.weight.copy_((weight * a.reshape(*a.shape, *spatial)).to(module.weight.dtype))
        if bool((bias_delta != 0).any()):
            bias = _ensure_bias(module)
            bias.copy_((bias.to(torch.float64) + bias_delta).to(bias.dtype))
