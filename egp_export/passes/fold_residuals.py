"""Fold a residual add into the conv of its branch: x + conv(x) = conv'(x) (exact).

When the branch f of ``y = x + f(x)`` is one conv (what ``merge_conv_chains``
leaves of a linear inverted residual or a linear block) with stride 1, as
many outputs as inputs and a centred odd kernel, the identity is one more tap:

    y[o] = x[o] + sum_{c,t} W[o, c, t] x[c, p + t - P] + b[o]
         = sum_{c,t} W'[o, c, t] ...,   W' = W + delta(c = o) delta(t = centre)

The centre tap of a centred stride-1 conv reads x at the output position
itself, never padding, so this holds at the border too. A constant bias map
after the conv (from an exact bias-map merge) stays where it is:
x + (conv(x) + m) = conv'(x) + m.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from egp_export.algebra.convchain import explicit_padding
from egp_export.analysis.fx import shape_of, sharing_refusal
from egp_export.analysis.ops import CONV_TYPES, module_of, named_modules
from egp_export.passes.base import GraphPass
from egp_export.passes.modules import ConstantAdd

_ADDS = {operator.add, torch.add, operator.iadd}


class FoldResiduals(GraphPass):
    name = "fold_residuals"

    def run(self, gm: fx.GraphModule) -> None:
        modules = named_modules(gm)
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in _ADDS or len(node.args) != 2 or node.kwargs:
                continue
            for branch, skip in (node.args, node.args[::-1]):
                if not isinstance(branch, fx.Node) or not isinstance(skip, fx.Node):
                    continue
                conv, bias_map = self._branch_conv(branch, modules)
                if conv is None or conv.args[0] is not skip:
                    continue
                reason = self._refusal(conv, modules, gm)
                if reason:
                    self.refuse(node, f"residual around '{conv.name}' not folded: {reason}")
                    break
                self._add_identity(modules[str(conv.target)])
                node.replace_all_uses_with(bias_map if bias_map is not None else conv)
                gm.graph.erase_node(node)
                self.rewrote([node.name, conv.name], f"residual add folded into '{conv.target}' (identity on the centre tap)")
                break

    @staticmethod
    def _branch_conv(branch: fx.Node, modules) -> tuple[fx.Node | None, fx.Node | None]:
        """(conv, bias-map node) when the branch is conv(x) or bias_map(conv(x)), each read only here."""
        if isinstance(module_of(branch, modules), ConstantAdd) and len(branch.users) == 1:
            inner = branch.args[0]
            if isinstance(module_of(inner, modules), CONV_TYPES) and len(inner.users) == 1:
                return inner, branch
            return None, None
        if isinstance(module_of(branch, modules), CONV_TYPES) and len(branch.users) == 1:
            return branch, None
        return None, None

    @staticmethod
    def _refusal(conv: fx.Node, modules, gm: fx.GraphModule) -> str | None:
        module = modules[str(conv.target)]
        shared = sharing_refusal(gm, str(conv.target))
        if shared:
            return shared
        if shape_of(conv) is None or shape_of(conv) != shape_of(conv.args[0]):
            return "the branch changes the shape"
        if any(s != 1 for s in module.stride):
            return "the conv is strided"
        if module.groups not in (1, module.in_channels):
            return "grouped conv that is not depthwise"
        try:
            padding = explicit_padding(module)
        except ValueError as error:
            return str(error)
        for k, d, p in zip(module.kernel_size, module.dilation, padding):
            if k % 2 == 0 or p != d * (k - 1) // 2:
                return "the kernel is not centred (even size or padding other than 'same')"
        return None

    @staticmethod
    def _add_identity(conv) -> None:
        centre = tuple(k // 2 for k in conv.kernel_size)
        with torch.no_grad():
            for channel in range(conv.out_channels):
                column = 0 if conv.groups > 1 else channel
                conv.weight[(channel, column) + centre] += 1.0
