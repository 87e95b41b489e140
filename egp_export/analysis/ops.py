"""The op vocabulary: what a graph node is, decided in one place.

Every pass, analysis and the pruning code ask this module whether a node is
a conv, a linear layer, a batch norm, an add, an eval-mode identity, a flatten,
a pool or a pad. Each predicate accepts every spelling torch.fx records for
the op (Torch-Pruning's ``module2type`` is the model):

- a module call (``self.conv(x)``: ``call_module``),
- a functional call (``F.conv2d(x, self.weight, ...)``, ``torch.add``),
- a method call (``x.add(y)``, ``x.flatten(1)``) and its in-place form
  (``x.add_(y)``, ``operator.iadd``),
- the ATen overloads that ``torch.export`` graphs hold (``aten.conv2d``,
  ``aten.linear``, ``aten.add.Tensor``, ...), so that a second front end can
  plug in without another vocabulary.

A layer is therefore not assumed to be a module call: ``layer_kind`` says
what a node computes, and ``functional_layer_args`` names the parameter
operands of a functional layer (``bind_functional_layers`` turns those with
constant parameters into modules the folding passes can change).
"""

from __future__ import annotations

import enum
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
LINEAR_TYPES = (nn.Linear,)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Modules that are the identity in eval mode.
IDENTITY_TYPES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
GLOBAL_POOL_TYPES = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
POOL_TYPES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
PAD_TYPES = (
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d, nn.ReplicationPad2d,
    nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d,
)


def _aten(*names: str) -> set:
    """ATen overload packets that exist in this torch (``torch.export`` graphs call them)."""
    found = set()
    for name in names:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            found.add(packet)
            found.update(getattr(packet, overload) for overload in packet.overloads())
    return found


class LayerKind(enum.Enum):
    CONV = "conv"
    LINEAR = "linear"
    BATCH_NORM = "batch_norm"


# Functional layers: the callables and, for each, where its parameter operands sit (position, keyword).
_FUNCTIONAL_LAYERS: dict[object, tuple[LayerKind, dict[str, tuple[int, str]]]] = {}
for _fn in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d, *_aten("conv1d", "conv2d", "conv3d")):
    _FUNCTIONAL_LAYERS[_fn] = (LayerKind.CONV, {"weight": (1, "weight"), "bias": (2, "bias")})
for _fn in (F.linear, *_aten("linear")):
    _FUNCTIONAL_LAYERS[_fn] = (LayerKind.LINEAR, {"weight": (1, "weight"), "bias": (2, "bias")})
for _fn in (F.batch_norm, torch.batch_norm, *_aten("batch_norm")):
    _FUNCTIONAL_LAYERS[_fn] = (
        LayerKind.BATCH_NORM,
        {"running_mean": (1, "running_mean"), "running_var": (2, "running_var"), "weight": (3, "weight"), "bias": (4, "bias")},
    )

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, *_aten("add", "add_")}
_ADD_METHODS = {"add", "add_"}
_FLATTEN_FUNCTIONS = {torch.flatten, *_aten("flatten")}
_GLOBAL_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, *_aten("adaptive_avg_pool2d")}
_POOL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    *_aten("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"),
}
_PAD_FUNCTIONS = {F.pad, *_aten("pad", "constant_pad_nd")}
# Functional ops that are the identity when their ``training`` operand is literally False: (position, default).
_TRAINING_ARGUMENT: dict[object, tuple[int, bool]] = {
    F.dropout: (2, True), F.dropout1d: (2, True), F.dropout2d: (2, True), F.dropout3d: (2, True),
    F.alpha_dropout: (2, False), F.feature_alpha_dropout: (2, False),
    **{packet: (2, True) for packet in _aten("dropout")},
}
try:  # torchvision is a dependency, but the vocabulary does not need it
    from torchvision.ops import stochastic_depth as _stochastic_depth

    _TRAINING_ARGUMENT[_stochastic_depth] = (3, True)
except ImportError:  # pragma: no cover - torchvision missing
    pass


def named_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _argument(node: fx.Node, position: int, keyword: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


# Layers --------------------------------------------------------------------


def layer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> LayerKind | None:
    """What layer ``node`` computes (module call or functional), or None."""
    module = module_of(node, modules)
    if module is not None:
        if isinstance(module, CONV_TYPES):
            return LayerKind.CONV
        if isinstance(module, LINEAR_TYPES):
            return LayerKind.LINEAR
        if isinstance(module, BATCHNORM_TYPES):
            return LayerKind.BATCH_NORM
        return None
    if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
        return _FUNCTIONAL_LAYERS[node.target][0]
    return None


def functional_layer_args(node: fx.Node) -> dict[str, object] | None:
    """The parameter operands (weight, bias, running statistics) of a functional layer call, else None."""
    if node.op != "call_function" or node.target not in _FUNCTIONAL_LAYERS:
        return None
    _, slots = _FUNCTIONAL_LAYERS[node.target]
    return {name: _argument(node, position, keyword) for name, (position, keyword) in slots.items()}


def is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.CONV


def is_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.LINEAR


def is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.BATCH_NORM


def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Conv or linear, in any spelling: the layers whose chain length is the network's depth."""
    return layer_kind(node, modules) in (LayerKind.CONV, LayerKind.LINEAR)


def is_module_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A conv/linear module call: a layer whose weights a pass can read and change."""
    return isinstance(module_of(node, modules), CONV_TYPES + LINEAR_TYPES)


# Elementwise and structural ops ---------------------------------------------


def is_add(node: fx.Node) -> bool:
    """``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)``, ``a.add_(b)`` (no ``alpha``)."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
    if node.op == "call_method" and node.target in _ADD_METHODS:
        return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
    return False


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op that returns its first input unchanged in eval mode: Identity/Dropout modules, and
    functional dropout / stochastic depth whose ``training`` operand is literally False."""
    if isinstance(module_of(node, modules), IDENTITY_TYPES):
        return True
    if node.op == "call_function" and node.target in _TRAINING_ARGUMENT:
        position, default = _TRAINING_ARGUMENT[node.target]
        keyword = "train" if node.target in _aten("dropout") else "training"
        return _argument(node, position, keyword, default) is False
    return False


def identity_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short name of an identity op for the report (module type or function name)."""
    module = module_of(node, modules)
    if module is not None:
        return type(module).__name__
    return getattr(node.target, "__name__", str(node.target))


def flatten_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int] | None:
    """(start_dim, end_dim) when ``node`` is a flatten (module, function or method), else None."""
    module = module_of(node, modules)
    if isinstance(module, nn.Flatten):
        return module.start_dim, module.end_dim
    if (node.op == "call_function" and node.target in _FLATTEN_FUNCTIONS) or (
        node.op == "call_method" and node.target == "flatten"
    ):
        return _argument(node, 1, "start_dim", 0), _argument(node, 2, "end_dim", -1)
    return None


def is_flatten_from_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """flatten(x, 1) (to the last dim): [B, C, *spatial] -> [B, C*prod(spatial)]."""
    return flatten_dims(node, modules) == (1, -1)


def is_global_average_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Adaptive average pooling to size 1 (module or function)."""
    module = module_of(node, modules)
    if isinstance(module, GLOBAL_POOL_TYPES):
        size = module.output_size
    elif node.op == "call_function" and node.target in _GLOBAL_POOL_FUNCTIONS:
        size = _argument(node, 1, "output_size")
    else:
        return False
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Any max/average pooling (channel-wise: pooling keeps zero channels zero)."""
    return isinstance(module_of(node, modules), POOL_TYPES) or (node.op == "call_function" and node.target in _POOL_FUNCTIONS)


def is_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Explicit padding (``F.pad`` or a padding module)."""
    return isinstance(module_of(node, modules), PAD_TYPES) or (node.op == "call_function" and node.target in _PAD_FUNCTIONS)


def conv_padding(module: nn.Module) -> tuple[int, ...]:
    """A conv module's padding per spatial axis, with 'valid'/'same' made explicit.

    Raises ValueError for 'same' padding that is not symmetric (an even
    effective kernel), which no single padding tuple describes.
    """
    padding = module.padding
    if padding == "valid":
        return (0,) * len(module.kernel_size)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
        if any(t % 2 for t in total):
            raise ValueError("asymmetric 'same' padding (even effective kernel)")
        return tuple(t // 2 for t in total)
    return tuple(int(p) for p in padding)


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` overwrites an input (``x.relu_()``, ``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x += y``).

    Dead-code elimination must keep such a node even when nothing reads its
    result: the other readers of the input it overwrites see the write.
    """
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    return False


def follow_identities(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node | None]:
    """Eval-mode identities after ``node`` (each the only user of the one before) and the node after them."""
    between: list[fx.Node] = []
    current = node
    while len(current.users) == 1:
        user = next(iter(current.users))
        if is_identity(user, modules) and user.args and user.args[0] is current:
            between.append(user)
            current = user
            continue
        return between, user
    return between, None
