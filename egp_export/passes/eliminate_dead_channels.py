"""Remove channels that are zero everywhere from their producers and consumers.

A channel is dead when every conv/linear producing it has an all-zero filter
and zero bias for it: left by unstructured pruning, or by folding a dead-neuron
mask or an OFF neuron of a linearized activation. The channel then stays zero
through every op in its *channel group* (the nodes sharing one channel axis):
activations with f(0) = 0, dropout/identity, pooling, affine maps without
shift on it, and residual adds (0 + 0 = 0) whose every operand is in the group.
It is removed from every producer (output rows), every affine map in the group
and every consumer (conv input columns, linear columns; through a flatten after
pooling, the block of H*W columns).

The group is refused, with the node that blocks it, when a member feeds
anything else: the model output, a concat, a reshape, a grouped conv, a shared
layer, an op whose f(0) != 0.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from egp_export.analysis.activations import activation_spec
from egp_export.analysis.fx import call_sites, shape_of
from egp_export.analysis.ops import (
    flatten_dims,
    is_add,
    is_conv_module,
    is_identity,
    is_layer_module,
    is_linear_module,
    is_pool,
    module_of,
    named_modules,
)
from egp_export.passes.base import Fact, GraphPass, Recorder
from egp_export.passes.modules import ChannelAffine
from egp_export.records import Reason, RefusalCode, RewriteKind


def zero_rows(module: nn.Module) -> torch.Tensor:
    """Output channels of a conv/linear whose filter and bias are all zero."""
    weight = module.weight.detach().reshape(module.weight.shape[0], -1)
    dead = (weight == 0).all(1)
    if module.bias is not None:
        dead &= module.bias.detach() == 0
    return dead


class _Group:
    """The nodes that share one channel axis, found by walking both ways from a producer."""

    def __init__(self) -> None:
        self.producers: list[fx.Node] = []
        self.members: list[fx.Node] = []  # transparent ops inside the group
        self.consumers: list[tuple[fx.Node, int]] = []  # (layer, columns per channel)
        self.blocker: str | None = None
        self.channels_first = True  # conv layout [B, C, ...]; False for linear's [..., C]


# Channel counts are kept at multiples of this: ONNX Runtime's CPU convolutions
# run blocked layouts, and an odd count falls off the fast path. Measured (ORT
# 1.31, one AVX-512 thread, 3x3 conv C->16 at 32x32): C = 56, 60, 64 take
# 188-192 us, C = 59 and 62 take 290-308 us; a 64->59 cut made a two-conv
# model 0.70x as fast. Dead channels beyond the multiple stay (as zeros).
CHANNEL_ALIGNMENT = 8


class EliminateDeadChannels(GraphPass):
    name = "eliminate_dead_channels"
    requires = frozenset({Fact.SHAPES})

    def __init__(self, alignment: int = CHANNEL_ALIGNMENT) -> None:
        self.alignment = max(1, alignment)

    def run(self, gm: fx.GraphModule, record: Recorder) -> None:
        _DeadChannelRun(self.alignment, gm).run(record)


class _DeadChannelRun:
    """One run over one graph: its modules and the channel groups found so far live here, not on the pass."""

    def __init__(self, alignment: int, gm: fx.GraphModule) -> None:
        self.alignment = alignment
        self.gm = gm
        self.modules = named_modules(gm)

    def run(self, record: Recorder) -> None:
        gm = self.gm
        done: set[fx.Node] = set()
        for node in list(gm.graph.nodes):
            if node in done:
                continue
            if not self._is_free_layer(node):
                module = module_of(node, self.modules)
                if is_layer_module(module) and zero_rows(module).any():
                    count = int(zero_rows(module).sum())
                    record.refuse(node, Reason(RefusalCode.ZERO_CHANNELS_IN_TIED_LAYER, {"count": count}))
                continue
            group = self._collect(node)
            done.update(group.producers)
            own = zero_rows(self.modules[str(node.target)])
            dead = own.clone()
            for producer in group.producers:
                dead &= zero_rows(self.modules[str(producer.target)])
            if own.any() and not dead.any() and len(group.producers) > 1:
                others = [p.name for p in group.producers if p is not node]
                record.refuse(node, Reason(RefusalCode.ZERO_CHANNELS_NOT_SHARED, {"count": int(own.sum()), "others": others}))
                continue
            if not dead.any():
                continue
            names = [p.name for p in group.producers]
            if group.blocker:
                detail = {"count": int(dead.sum()), "producers": names, "blocker": group.blocker}
                record.refuse(node, Reason(RefusalCode.ZERO_CHANNELS_BLOCKED, detail))
                continue
            for member in group.members:
                affine = module_of(member, self.modules)
                if isinstance(affine, ChannelAffine):
                    dead &= affine.shift == 0
            # Keep at least one channel (zero-width tensors are not portable) and round the kept count up.
            alive = int((~dead).sum())
            keep = min(dead.numel(), max(self.alignment, -(-alive // self.alignment) * self.alignment))
            spare = keep - alive
            if spare > 0:
                dead[dead.nonzero().flatten()[:spare]] = False
            if not dead.any():
                if spare > 0 and alive < dead.numel():
                    detail = {"count": dead.numel() - alive, "alignment": self.alignment}
                    record.refuse(node, Reason(RefusalCode.CHANNELS_KEPT_FOR_ALIGNMENT, detail))
                continue
            self._remove(group, ~dead)
            record.rewrote(
                RewriteKind.CHANNELS_REMOVED,
                group.producers + [c for c, _ in group.consumers],
                removed=int(dead.sum()),
                channels=dead.numel(),
                producers=names,
                consumers=[c.name for c, _ in group.consumers],
            )

    # Classification ------------------------------------------------------

    def _is_free_layer(self, node: fx.Node) -> bool:
        """An unshared conv/linear whose output channels can be dropped on their own.

        A grouped conv's output channels are tied to its input channels, which
        belong to another channel group; those are left alone.
        """
        module = module_of(node, self.modules)
        if not is_layer_module(module) or call_sites(self.gm, str(node.target)) != 1:
            return False
        return not (is_conv_module(module) and module.groups != 1)

    def _transparent(self, node: fx.Node) -> bool:
        """A single-input op that maps a zero channel to a zero channel in place."""
        module = module_of(node, self.modules)
        if isinstance(module, ChannelAffine) or is_identity(node, self.modules) or is_pool(node, self.modules):
            return True
        if isinstance(module, nn.PReLU) and module.num_parameters > 1:
            return False
        spec = activation_spec(node, self.modules)
        return spec is not None and spec.zero_at_zero

    def _is_add(self, node: fx.Node) -> bool:
        """A residual add of two tensors (adding a constant makes a zero channel non-zero)."""
        return is_add(node) and all(isinstance(o, fx.Node) for o in node.args)

    def _flatten_block(self, node: fx.Node) -> int | None:
        """Columns per channel when ``node`` flattens [B, C, *spatial] from dim 1, else None."""
        dims = flatten_dims(node, self.modules)
        if dims is None:
            return None
        start, end = dims
        shape = shape_of(node.args[0])
        if shape is None or start != 1 or end not in (-1, len(shape) - 1):
            return None
        block = 1
        for size in shape[2:]:
            block *= int(size)
        return block

    # Walking the group ---------------------------------------------------

    def _collect(self, start: fx.Node) -> _Group:
        group = _Group()
        group.producers.append(start)
        group.channels_first = is_conv_module(module_of(start, self.modules))
        seen = {start}
        forward = [start]
        while forward and group.blocker is None:
            node = forward.pop()
            for user in node.users:
                if user not in seen:
                    self._classify_user(user, node, group, seen, forward)
                elif user in group.producers and not _is_consumer(user, group):
                    # x + conv(x), with the add reached first: conv is a producer and reads the group too.
                    self._classify_user(user, node, group, seen, forward)
        return group

    def _classify_user(self, user: fx.Node, source: fx.Node, group: _Group, seen: set, forward: list) -> None:
        module = module_of(user, self.modules)
        if is_layer_module(module):
            shape = shape_of(source)
            same_axis = is_conv_module(module) == group.channels_first or (shape is not None and len(shape) == 2)
            if not same_axis:
                group.blocker = f"'{user.name}' reads a different axis than the channel axis"
            elif call_sites(self.gm, str(user.target)) > 1:
                group.blocker = f"consumer '{user.target}' is shared by several call sites"
            elif is_conv_module(module) and module.groups != 1:
                group.blocker = f"consumer '{user.name}' is a grouped convolution"
            else:
                seen.add(user)
                group.consumers.append((user, 1))
            return
        block = self._flatten_block(user) if group.channels_first else None
        if block is not None:
            linears = [u for u in user.users if is_linear_module(module_of(u, self.modules))]
            if len(linears) != len(user.users) or any(call_sites(self.gm, str(u.target)) > 1 for u in linears):
                group.blocker = f"flatten '{user.name}' feeds something other than unshared linear layers"
                return
            seen.add(user)
            seen.update(linears)
            group.consumers.extend((u, block) for u in linears)
            return
        if (self._transparent(user) and user.args and user.args[0] is source) or self._is_add(user):
            self._join(user, group, seen, forward)
            return
        group.blocker = f"channels reach '{user.name}' ({user.op} {getattr(user.target, '__name__', user.target)})"

    def _walk_back(self, node: fx.Node, group: _Group, seen: set, forward: list) -> None:
        """An operand of a residual add joins the group: it must come from producers through transparent ops."""
        seen.add(node)
        if self._is_free_layer(node):
            if is_conv_module(module_of(node, self.modules)) != group.channels_first:
                group.blocker = f"residual operand '{node.name}' has a different channel layout"
                return
            group.producers.append(node)
            forward.append(node)
            return
        if (self._transparent(node) or self._is_add(node)) and node.all_input_nodes:
            self._join(node, group, seen, forward)
            return
        group.blocker = f"residual operand '{node.name}' is not produced by a prunable conv/linear"

    def _join(self, node: fx.Node, group: _Group, seen: set, forward: list) -> None:
        """``node`` shares the group's channels: its users are walked, and its other inputs (a residual add's
        operands) must themselves come from the group's producers."""
        seen.add(node)
        group.members.append(node)
        forward.append(node)
        for operand in node.all_input_nodes:
            if operand not in seen:
                self._walk_back(operand, group, seen, forward)
            elif _is_consumer(operand, group) and operand not in group.producers:
                # x + conv(x): conv reads the group's channels and its output is added back into them, so its
                # input columns and its output rows are both the group's channels.
                self._consumer_also_produces(operand, group, forward)

    def _consumer_also_produces(self, node: fx.Node, group: _Group, forward: list) -> None:
        block = dict(group.consumers)[node]
        if block != 1 or not self._is_free_layer(node):
            group.blocker = f"residual operand '{node.name}' reads the group's channels through a flatten or is shared"
            return
        group.producers.append(node)
        forward.append(node)

    # Removing ------------------------------------------------------------

    def _remove(self, group: _Group, keep: torch.Tensor) -> None:
        with torch.no_grad():
            for producer in group.producers:
                module = self.modules[str(producer.target)]
                module.weight = nn.Parameter(module.weight.detach()[keep].clone())
                if module.bias is not None:
                    module.bias = nn.Parameter(module.bias.detach()[keep].clone())
                _set_width(module, out=int(keep.sum()))
            for member in group.members:
                affine = module_of(member, self.modules)
                if isinstance(affine, ChannelAffine):
                    affine.scale = affine.scale[keep].clone()
                    affine.shift = affine.shift[keep].clone()
            for consumer, block in group.consumers:
                module = self.modules[str(consumer.target)]
                columns = keep.repeat_interleave(block)
                module.weight = nn.Parameter(module.weight.detach()[:, columns].clone())
                _set_width(module, inp=int(columns.sum()))


def _is_consumer(node: fx.Node, group: _Group) -> bool:
    return any(consumer is node for consumer, _ in group.consumers)


def _set_width(module: nn.Module, *, out: int | None = None, inp: int | None = None) -> None:
    if is_linear_module(module):
        if out is not None:
            module.out_features = out
        if inp is not None:
            module.in_features = inp
    else:
        if out is not None:
            module.out_channels = out
        if inp is not None:
            module.in_channels = inp
