"""The op vocabulary: what a node is (conv, linear, batch norm, identity, ...), in one place."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn


def named_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


LINEAR_TYPES = (nn.Linear,)


BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# Modules that are the identity in eval mode.
IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Conv or linear: the layers whose chain length is the network's depth."""
    return isinstance(module_of(node, modules), CONV_TYPES + LINEAR_TYPES)


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return isinstance(module_of(node, modules), IDENTITY_TYPES)
