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

The functional spellings are tables: each callable with its *own* operand
order (``F.batch_norm(input, running_mean, running_var, weight, bias, ...)``
is not ``torch.batch_norm(input, weight, bias, running_mean, running_var,
...)``), and ``operand`` binds a call by that order, positional or keyword.
To teach the vocabulary a spelling, add one line to a table; the tests
enumerate the tables and call every entry.

A module counts as a kind only if it computes what the torch.nn class does:
a subclass that overrides ``forward`` (timm's ``Conv2dSame`` pads by the
input's size at run time, ``StdConv2d`` standardises its weight), a
parametrized module or one with forward hooks is *opaque* to the algebra,
and ``opaque_reason`` says why.

A layer is therefore not assumed to be a module call: ``layer_kind`` says
what a node computes, and ``functional_layer_args`` names the parameter
operands of a functional layer (``bind_functional_layers`` turns those with
constant parameters into modules the folding passes can change).
"""

from __future__ import annotations

import enum
import functools
import inspect
import operator
from collections.abc import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from egp_export.records import Reason, RefusalCode

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

# The methods a torch.nn layer's call runs: a subclass that redefines one computes something else.
_COMPUTING_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl")


def aten_ops(*names: str) -> list:
    """ATen ops by ``"packet.overload"`` name (the packet too), those that exist in this torch."""
    found = []
    for name in names:
        packet_name, _, overload = name.partition(".")
        packet = getattr(torch.ops.aten, packet_name, None)
        if packet is None:
            continue
        found.append(packet)
        if overload and hasattr(packet, overload):
            found.append(getattr(packet, overload))
    return found


class LayerKind(enum.Enum):
    CONV = "conv"
    LINEAR = "linear"
    BATCH_NORM = "batch_norm"


# Operand orders (the keyword names are the same). ATen's schemas call the first operand ``self`` for most ops.
Signature = tuple[str, ...]
_CONV: Signature = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_LINEAR: Signature = ("input", "weight", "bias")
_F_BATCH_NORM: Signature = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_ATEN_BATCH_NORM: Signature = (
    "input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled",
)
# aten.convolution: a conv only when ``transposed`` is False (checked in ``layer_kind``).
_ATEN_CONVOLUTION: Signature = (
    "input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups",
)
# The eval-mode batch norm of decomposed export graphs: (output, save_mean, save_invstd), no ``training`` operand.
_ATEN_BATCH_NORM_NO_TRAINING: Signature = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")

# Functional layers: callable -> (what it computes, its operand order). F.conv2d is torch.conv2d.
FUNCTIONAL_LAYERS: dict[object, tuple[LayerKind, Signature]] = {
    **{fn: (LayerKind.CONV, _CONV) for fn in (F.conv1d, F.conv2d, F.conv3d)},
    **{fn: (LayerKind.CONV, _CONV) for fn in aten_ops("conv1d.default", "conv2d.default", "conv3d.default")},
    **{fn: (LayerKind.CONV, _CONV) for fn in aten_ops("conv1d.padding", "conv2d.padding", "conv3d.padding")},
    F.linear: (LayerKind.LINEAR, _LINEAR),
    **{fn: (LayerKind.LINEAR, _LINEAR) for fn in aten_ops("linear.default")},
    F.batch_norm: (LayerKind.BATCH_NORM, _F_BATCH_NORM),
    torch.batch_norm: (LayerKind.BATCH_NORM, _ATEN_BATCH_NORM),
    **{fn: (LayerKind.BATCH_NORM, _ATEN_BATCH_NORM) for fn in aten_ops("batch_norm.default")},
    **{fn: (LayerKind.CONV, _ATEN_CONVOLUTION) for fn in aten_ops("convolution.default")},
    **{
        fn: (LayerKind.BATCH_NORM, _ATEN_BATCH_NORM_NO_TRAINING)
        for fn in aten_ops("_native_batch_norm_legit_no_training.default")
    },
}
# PReLU as a function of its slopes (torch.export's spelling of nn.PReLU): bound to an nn.PReLU module when the
# slopes are constant (analysis/bound_layers.py), so that the activation vocabulary sees a module call.
PRELU_FUNCTIONS: dict[object, Signature] = {
    F.prelu: ("input", "weight"), torch.prelu: ("input", "weight"),
    **{fn: ("input", "weight") for fn in aten_ops("prelu.default", "_prelu_kernel.default")},
}
# Functional layers whose result is a tuple holding the layer's output at index 0 (read through ``getitem``).
TUPLE_LAYERS = set(aten_ops("_native_batch_norm_legit_no_training.default"))
# The operands of each layer kind that are its parameters (constant in a deployable model).
LAYER_PARAMETERS: dict[LayerKind, tuple[str, ...]] = {
    LayerKind.CONV: ("weight", "bias"),
    LayerKind.LINEAR: ("weight", "bias"),
    LayerKind.BATCH_NORM: ("running_mean", "running_var", "weight", "bias"),
}

# a + b of two operands (operator, function, ATen; ``alpha`` must be 1). Methods: ADD_METHODS.
ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, *aten_ops("add.Tensor", "add_.Tensor")}
ADD_METHODS = {"add", "add_"}
# Functional ops that are the identity when their training operand is literally False:
# callable -> (operand order, name of the training operand, its default; None = required).
_DROPOUT: Signature = ("input", "p", "training", "inplace")
_ATEN_DROPOUT: Signature = ("input", "p", "train")
EVAL_IDENTITY_FUNCTIONS: dict[object, tuple[Signature, str, bool | None]] = {
    **{fn: (_DROPOUT, "training", True) for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d)},
    **{fn: (_DROPOUT, "training", False) for fn in (F.alpha_dropout, F.feature_alpha_dropout)},
    **{
        fn: (_ATEN_DROPOUT, "train", None)
        for fn in (torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout)
    },
    **{
        fn: (_ATEN_DROPOUT, "train", None)
        for fn in aten_ops("dropout.default", "alpha_dropout.default", "feature_dropout.default", "feature_alpha_dropout.default")
    },
}
try:  # torchvision is a dependency, but the vocabulary does not need it
    from torchvision.ops import stochastic_depth as _stochastic_depth

    EVAL_IDENTITY_FUNCTIONS[_stochastic_depth] = (("input", "p", "mode", "training"), "training", True)
except ImportError:  # pragma: no cover - torchvision missing
    pass
_FLATTEN: Signature = ("input", "start_dim", "end_dim")
FLATTEN_FUNCTIONS: dict[object, Signature] = {torch.flatten: _FLATTEN, **{fn: _FLATTEN for fn in aten_ops("flatten.using_ints")}}
_ADAPTIVE_POOL: Signature = ("input", "output_size")
GLOBAL_POOL_FUNCTIONS: dict[object, Signature] = {
    **{fn: _ADAPTIVE_POOL for fn in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d)},
    **{fn: _ADAPTIVE_POOL for fn in aten_ops("adaptive_avg_pool2d.default", "adaptive_avg_pool3d.default")},
}
GLOBAL_POOL_FUNCTIONS.update({fn: _ADAPTIVE_POOL for fn in aten_ops("adaptive_avg_pool1d.default")})
# Means over dimensions: a global average pool when they are every spatial dim and ``keepdim`` is True.
_MEAN: Signature = ("input", "dim", "keepdim")
MEAN_FUNCTIONS: dict[object, Signature] = {torch.mean: _MEAN, **{fn: _MEAN for fn in aten_ops("mean.dim")}}
POOL_FUNCTIONS = {
    *GLOBAL_POOL_FUNCTIONS, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    *aten_ops(
        "max_pool1d.default", "max_pool2d.default", "max_pool3d.default", "avg_pool1d.default", "avg_pool2d.default",
        "avg_pool3d.default",
    ),  # ATen's adaptive max pools return (values, indices): not channel-wise ops on one tensor
}
PAD_FUNCTIONS = {
    F.pad, torch.constant_pad_nd,
    *aten_ops(
        "pad.default", "constant_pad_nd.default", "reflection_pad1d.default", "reflection_pad2d.default",
        "reflection_pad3d.default", "replication_pad1d.default", "replication_pad2d.default", "replication_pad3d.default",
    ),
}
# Axis permutations (what moves the neuron axis): callable -> operand order.
PERMUTE_FUNCTIONS: dict[object, Signature] = {
    torch.permute: ("input", "dims"), **{fn: ("input", "dims") for fn in aten_ops("permute.default")},
}
TRANSPOSE_FUNCTIONS: dict[object, Signature] = {
    torch.transpose: ("input", "dim0", "dim1"), torch.swapaxes: ("input", "axis0", "axis1"),
    **{fn: ("input", "dim0", "dim1") for fn in aten_ops("transpose.int")},
    **{fn: ("input", "axis0", "axis1") for fn in aten_ops("swapaxes.default")},
}
TRANSPOSE_METHODS = {"transpose", "swapaxes"}
# Layer norm over the last dimension(s): fixes a channels-last (token) layout.
LAYER_NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm, *aten_ops("layer_norm.default", "native_layer_norm.default")}


def named_modules(gm: fx.GraphModule) -> dict[str, nn.Module]:
    return dict(gm.named_modules())


def module_of(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def _argument(node: fx.Node, position: int, keyword: str, default=None):
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword, default)


def bind(node: fx.Node, signature: Signature, name: str, default=None):
    """Operand ``name`` of a call whose operands are ordered by ``signature`` (positional or keyword)."""
    return _argument(node, signature.index(name), name, default)


def operand(node: fx.Node, name: str, default=None):
    """Operand ``name`` (``"running_var"``, ``"stride"``, ``"eps"``) of a functional layer call, bound by
    the callable's own signature; ``default`` when the call leaves it out or its spelling has no such operand
    (``aten._native_batch_norm_legit_no_training`` has no ``training``)."""
    signature = FUNCTIONAL_LAYERS[node.target][1]
    return bind(node, signature, name, default) if name in signature else default


# Modules ---------------------------------------------------------------------


def opaque_reason(module: nn.Module, bases: Iterable[type]) -> Reason | None:
    """Why ``module``, an instance of one of ``bases``, does not compute what that base computes, or None.

    A subclass that redefines ``forward`` (or ``_conv_forward``) computes
    something the base's attributes do not describe; a parametrization
    recomputes ``weight`` on every access and forward hooks change the call,
    so writing folded weights into such a module would not change (or not
    only change) what it computes.
    """
    base = next((b for b in bases if isinstance(module, b)), None)
    if base is None:
        return None
    detail = {"module_type": type(module).__name__, "base": base.__name__}
    overridden = [m for m in _COMPUTING_METHODS if getattr(type(module), m, None) is not getattr(base, m, None)]
    if overridden:
        return Reason(RefusalCode.OPAQUE_MODULE, {**detail, "why": f"overrides {overridden[0]}"})
    if parametrize.is_parametrized(module):
        return Reason(RefusalCode.OPAQUE_MODULE, {**detail, "why": "parametrized"})
    if module._forward_hooks or module._forward_pre_hooks:
        return Reason(RefusalCode.OPAQUE_MODULE, {**detail, "why": "forward hooks"})
    return None


def computes_as(module: nn.Module | None, bases: tuple[type, ...]) -> bool:
    """``module`` is an instance of one of ``bases`` and computes exactly what that base does."""
    return isinstance(module, bases) and opaque_reason(module, bases) is None


def is_conv_module(module: nn.Module | None) -> bool:
    return computes_as(module, CONV_TYPES)


def is_linear_module(module: nn.Module | None) -> bool:
    return computes_as(module, LINEAR_TYPES)


def is_batchnorm_module(module: nn.Module | None) -> bool:
    return computes_as(module, BATCHNORM_TYPES)


def is_layer_module(module: nn.Module | None) -> bool:
    """A conv or linear module whose weights describe what it computes (a pass may read and change them)."""
    return is_conv_module(module) or is_linear_module(module)


def is_any_layer_module(module: nn.Module | None) -> bool:
    """A conv/linear module or subclass, whatever its ``forward``: a layer for the network's depth and for
    pruning masks (zeroing its weight prunes it), though an opaque one is no layer for the algebra."""
    return isinstance(module, CONV_TYPES + LINEAR_TYPES)


def layer_opaque_reason(module: nn.Module | None) -> Reason | None:
    """Why a conv/linear/batch-norm subclass is opaque to the algebra, or None."""
    return opaque_reason(module, CONV_TYPES + LINEAR_TYPES + BATCHNORM_TYPES) if module is not None else None


# Layers --------------------------------------------------------------------


def layer_kind(node: fx.Node, modules: dict[str, nn.Module]) -> LayerKind | None:
    """What layer ``node`` computes (module call or functional), or None."""
    module = module_of(node, modules)
    if module is not None:
        if is_conv_module(module):
            return LayerKind.CONV
        if is_linear_module(module):
            return LayerKind.LINEAR
        if is_batchnorm_module(module):
            return LayerKind.BATCH_NORM
        return None
    if node.op == "call_function" and node.target in FUNCTIONAL_LAYERS:
        kind, signature = FUNCTIONAL_LAYERS[node.target]
        if signature is _ATEN_CONVOLUTION and not _plain_convolution(node):
            return None  # a transposed convolution
        return kind
    return None


def _plain_convolution(node: fx.Node) -> bool:
    """aten.convolution that is no transposed convolution (its ``transposed`` literally False)."""
    output_padding = bind(node, _ATEN_CONVOLUTION, "output_padding", ())
    return bind(node, _ATEN_CONVOLUTION, "transposed") is False and all(p == 0 for p in output_padding or ())


def functional_layer_args(node: fx.Node) -> dict[str, object] | None:
    """The parameter operands (weight, bias, running statistics) of a functional layer call, else None."""
    if node.op != "call_function" or node.target not in FUNCTIONAL_LAYERS:
        return None
    kind, signature = FUNCTIONAL_LAYERS[node.target]
    return {name: bind(node, signature, name) for name in LAYER_PARAMETERS[kind]}


def is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.CONV


def is_linear(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.LINEAR


def is_batch_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return layer_kind(node, modules) is LayerKind.BATCH_NORM


def is_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Conv or linear, in any spelling (opaque subclasses too): the layers whose chain length is the network's depth."""
    return layer_kind(node, modules) in (LayerKind.CONV, LayerKind.LINEAR) or is_any_layer_module(module_of(node, modules))


def is_module_layer(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A conv/linear module call: a layer whose weights a pass can read and change."""
    return is_layer_module(module_of(node, modules))


# Elementwise and structural ops ---------------------------------------------


def is_add(node: fx.Node) -> bool:
    """``a + b``, ``a += b``, ``torch.add(a, b)``, ``a.add(b)``, ``a.add_(b)``, ``aten.add.Tensor`` (no ``alpha``)."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
    if node.op == "call_method" and node.target in ADD_METHODS:
        return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
    return False


def is_identity(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An op that returns its first input unchanged in eval mode: Identity/Dropout modules, and
    functional dropout / stochastic depth whose ``training`` operand is literally False."""
    if computes_as(module_of(node, modules), IDENTITY_TYPES):
        return True
    if node.op == "call_function" and node.target in EVAL_IDENTITY_FUNCTIONS:
        signature, training, default = EVAL_IDENTITY_FUNCTIONS[node.target]
        return bind(node, signature, training, default) is False
    return False


def identity_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A short name of an identity op for the report (module type or function name)."""
    module = module_of(node, modules)
    if module is not None:
        return type(module).__name__
    if isinstance(node.target, torch._ops.OpOverload):  # aten.dropout, not "dropout.default"
        return f"aten.{node.target._schema.name.split('::')[-1]}"
    return getattr(node.target, "__name__", str(node.target))


def flatten_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int] | None:
    """(start_dim, end_dim) when ``node`` is a flatten (module, function or method), else None."""
    module = module_of(node, modules)
    if computes_as(module, (nn.Flatten,)):
        return module.start_dim, module.end_dim
    if node.op == "call_function" and node.target in FLATTEN_FUNCTIONS:
        signature = FLATTEN_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target == "flatten":
        signature = ("self", "start_dim", "end_dim")
    else:
        return None
    return bind(node, signature, "start_dim", 0), bind(node, signature, "end_dim", -1)


def is_flatten_from_channels(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """flatten(x, 1) (to the last dim): [B, C, *spatial] -> [B, C*prod(spatial)]."""
    return flatten_dims(node, modules) == (1, -1)


def is_global_average_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Adaptive average pooling to size 1 (module or function)."""
    module = module_of(node, modules)
    if computes_as(module, GLOBAL_POOL_TYPES):
        size = module.output_size
    elif node.op == "call_function" and node.target in GLOBAL_POOL_FUNCTIONS:
        size = bind(node, GLOBAL_POOL_FUNCTIONS[node.target], "output_size")
    else:
        spatial_mean = _spatial_mean(node)
        return spatial_mean is not None and spatial_mean[1]
    return all(s == 1 for s in (size if isinstance(size, (tuple, list)) else (size,)))


def _spatial_mean(node: fx.Node) -> tuple[tuple[int, ...], bool] | None:
    """(dims, keepdim) of a mean over every spatial dimension of a ``[B, C, *spatial]`` input
    (``x.mean((2, 3))``, ``torch.mean``, ``aten.mean.dim``), else None. Negative dims need the input's shape."""
    if node.op == "call_function" and node.target in MEAN_FUNCTIONS:
        signature = MEAN_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target == "mean":
        signature = ("self", "dim", "keepdim")
    else:
        return None
    dims, keepdim = bind(node, signature, "dim"), bind(node, signature, "keepdim", False)
    if dims is None or isinstance(dims, fx.Node) or not isinstance(keepdim, bool) or not node.args:
        return None
    dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
    meta = node.args[0].meta.get("tensor_meta") if isinstance(node.args[0], fx.Node) else None
    rank = len(meta.shape) if meta is not None and hasattr(meta, "shape") else None
    if rank is None:
        if any(not isinstance(d, int) or d < 0 for d in dims):
            return None
        rank = max(dims) + 1
    if any(not isinstance(d, int) for d in dims):
        return None
    normalised = sorted(d % rank for d in dims)
    return (tuple(normalised), keepdim) if rank >= 3 and normalised == list(range(2, rank)) else None


def is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Any max/average pooling, a mean over the spatial dims included (channel-wise: keeps zero channels zero)."""
    if computes_as(module_of(node, modules), POOL_TYPES) or (node.op == "call_function" and node.target in POOL_FUNCTIONS):
        return True
    return _spatial_mean(node) is not None


def is_pad(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Explicit padding (``F.pad`` or a padding module)."""
    return computes_as(module_of(node, modules), PAD_TYPES) or (node.op == "call_function" and node.target in PAD_FUNCTIONS)


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


def permutation(node: fx.Node, rank: int) -> list[int] | None:
    """Output axis i of a permute/transpose node (method, function or ATen) takes input axis perm[i]; else None."""
    is_method = node.op == "call_method"
    if (is_method and node.target == "permute") or (node.op == "call_function" and node.target in PERMUTE_FUNCTIONS):
        if is_method:
            dims = list(node.args[1:]) or [node.kwargs.get("dims")]
        else:
            dims = [bind(node, PERMUTE_FUNCTIONS[node.target], "dims")]
        dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
        return [d % rank for d in dims]
    if is_method and node.target in TRANSPOSE_METHODS:
        pair = node.args[1:3]
    elif node.op == "call_function" and node.target in TRANSPOSE_FUNCTIONS:
        signature = TRANSPOSE_FUNCTIONS[node.target]
        pair = (bind(node, signature, signature[1]), bind(node, signature, signature[2]))
    else:
        return None
    a, b = (d % rank for d in pair)
    perm = list(range(rank))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def is_permutation(node: fx.Node) -> bool:
    """A permute or transpose in any spelling (whether or not its shape is known)."""
    if node.op == "call_method":
        return node.target == "permute" or node.target in TRANSPOSE_METHODS
    return node.op == "call_function" and (node.target in PERMUTE_FUNCTIONS or node.target in TRANSPOSE_FUNCTIONS)


def is_layer_norm(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A layer norm (module, function or ATen): it normalises the last dimension(s), a channels-last layout."""
    return isinstance(module_of(node, modules), nn.LayerNorm) or (
        node.op == "call_function" and node.target in LAYER_NORM_FUNCTIONS
    )


_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``node`` overwrites an input (``x.relu_()``, ``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)`` or
    ``F.relu(x, True)``, ``x += y``, ``aten.relu_.default``).

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
        if isinstance(node.target, torch._ops.OpOverload):  # aten.relu_.default: its schema says it writes
            return any(a.alias_info is not None and a.alias_info.is_write for a in node.target._schema.arguments)
        position = _inplace_position(node.target)
        if position is not None and len(node.args) > position and node.args[position] is True:
            return True  # F.relu(x, True)
        name = getattr(node.target, "__name__", "")
        return node.target in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_"))
    return False


@functools.cache
def _inplace_position(target) -> int | None:
    """Where a Python function takes its ``inplace`` operand (F.relu, F.dropout, ...), or None."""
    try:
        names = list(inspect.signature(target).parameters)
    except (TypeError, ValueError):  # C builtins have no Python signature
        return None
    return names.index("inplace") if "inplace" in names else None


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
