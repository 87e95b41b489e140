"""Activation functions as data: where their linear regions are, and how to find their call sites.

An activation is piecewise: ``boundaries`` split the real line into regions and
each region has an affine map ``y = slope * z + intercept`` (``None`` where the
function is not affine inside the region, e.g. Hardswish between -3 and 3).
Smooth activations (GELU, SiLU, Mish) have no boundaries and one nonlinear region;
they are only ever replaced by an affine *surrogate* fitted on the calibrated
input range, within a measured tolerance.

Region ``r`` holds the inputs ``boundaries[r-1] < z <= boundaries[r]``
(``torch.bucketize`` with ``right=False``). Every function here is continuous,
so the maps of two neighbouring regions agree on their shared boundary and it
does not matter which region a boundary point is counted in.

A call site is a module call (``nn.ReLU``), a functional call (``F.relu``,
``torch.relu``, inplace forms, the ATen ops of torch.export graphs) or a method
call (``x.relu()``). Per-neuron parameters (PReLU's slopes) are resolved from
the module at the call site (a functional PReLU with constant slopes is bound
to an nn.PReLU module first, analysis/bound_layers.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.ops import Signature, aten_ops, bind, computes_as


@dataclass(frozen=True)
class ActivationSpec:
    """One activation at one call site, with its parameters resolved."""

    kind: str
    boundaries: tuple[float, ...]
    # (slope, intercept) per region; slope None = not affine in that region.
    # A slope may be a per-neuron tensor (PReLU).
    regions: tuple[tuple[float | torch.Tensor | None, float], ...]
    fn: Callable[[torch.Tensor], torch.Tensor]
    inplace: bool = False

    @property
    def smooth(self) -> bool:
        return not self.boundaries

    @property
    def zero_at_zero(self) -> bool:
        """f(0) == 0: a channel that is zero before the activation stays zero after it."""
        return float(self.fn(torch.zeros(1))[0]) == 0.0

    def region_map(self, region: int, num_neurons: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-neuron (slope, intercept) vectors of ``region``, or None if not affine there."""
        slope, intercept = self.regions[region]
        if slope is None:
            return None
        slope_vec = torch.as_tensor(slope, dtype=torch.float64).flatten()
        if slope_vec.numel() == 1:
            slope_vec = slope_vec.expand(num_neurons)
        return slope_vec.clone(), torch.full((num_neurons,), float(intercept), dtype=torch.float64)


def _relu() -> ActivationSpec:
    # relu(z) = 0 for z <= 0, z for z > 0
    return ActivationSpec("relu", (0.0,), ((0.0, 0.0), (1.0, 0.0)), F.relu)


def _hardtanh(kind: str, low: float, high: float) -> ActivationSpec:
    # clamp(z, low, high): constant low | identity | constant high
    return ActivationSpec(
        kind, (low, high), ((0.0, low), (1.0, 0.0), (0.0, high)), lambda z: F.hardtanh(z, low, high)
    )


def _leaky_relu(negative_slope: float) -> ActivationSpec:
    # leaky_relu(z) = a*z for z <= 0, z for z > 0
    return ActivationSpec(
        "leaky_relu", (0.0,), ((negative_slope, 0.0), (1.0, 0.0)), lambda z: F.leaky_relu(z, negative_slope)
    )


def _prelu(weight: torch.Tensor) -> ActivationSpec:
    slopes = weight.detach().to(torch.float64).flatten().clone()
    return ActivationSpec(
        "prelu",
        (0.0,),
        ((slopes, 0.0), (1.0, 0.0)),
        lambda z: torch.where(z > 0, z, z * _broadcast_like(slopes.to(z.dtype), z)),
    )


def _broadcast_like(values: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # PReLU's slopes index dim 1 (or are a single shared slope).
    if values.numel() == 1 or z.dim() < 2:
        return values.reshape(()) if values.numel() == 1 else values
    return values.reshape(1, -1, *([1] * (z.dim() - 2)))


def _hardswish() -> ActivationSpec:
    # z * relu6(z + 3) / 6 = 0 for z <= -3 | quadratic | z for z >= 3
    return ActivationSpec("hardswish", (-3.0, 3.0), ((0.0, 0.0), (None, 0.0), (1.0, 0.0)), F.hardswish)


def _hardsigmoid() -> ActivationSpec:
    # relu6(z + 3) / 6 = 0 for z <= -3 | z/6 + 1/2 | 1 for z >= 3
    return ActivationSpec("hardsigmoid", (-3.0, 3.0), ((0.0, 0.0), (1.0 / 6.0, 0.5), (0.0, 1.0)), F.hardsigmoid)


def _gelu(approximate: str = "none") -> ActivationSpec:
    return ActivationSpec("gelu", (), ((None, 0.0),), lambda z: F.gelu(z, approximate=approximate))


def _silu() -> ActivationSpec:
    return ActivationSpec("silu", (), ((None, 0.0),), F.silu)


def _mish() -> ActivationSpec:
    return ActivationSpec("mish", (), ((None, 0.0),), F.mish)


# Activation modules, most specific first (ReLU6 is a Hardtanh). A subclass with its own ``forward``
# (a ReLU that scales) computes something else: no spec (see ops.opaque_reason).
ACTIVATION_MODULES: tuple[tuple[type, Callable[[nn.Module], ActivationSpec]], ...] = (
    (nn.ReLU6, lambda m: _hardtanh("relu6", 0.0, 6.0)),
    (nn.ReLU, lambda m: _relu()),
    (nn.Hardtanh, lambda m: _hardtanh("hardtanh", float(m.min_val), float(m.max_val))),
    (nn.LeakyReLU, lambda m: _leaky_relu(float(m.negative_slope))),
    (nn.PReLU, lambda m: _prelu(m.weight)),
    (nn.Hardswish, lambda m: _hardswish()),
    (nn.Hardsigmoid, lambda m: _hardsigmoid()),
    (nn.GELU, lambda m: _gelu(m.approximate)),
    (nn.SiLU, lambda m: _silu()),
    (nn.Mish, lambda m: _mish()),
)


ACTIVATION_TYPES = tuple(base for base, _ in ACTIVATION_MODULES)


def _module_spec(module: nn.Module) -> ActivationSpec | None:
    for base, build in ACTIVATION_MODULES:
        if isinstance(module, base):
            if not computes_as(module, (base,)):
                return None
            return replace(build(module), inplace=bool(getattr(module, "inplace", False)))
    return None


# Functional spellings, rules as data: callable -> (its operand order, builder reading the bound
# operands, whether it always writes in place). ATen's ``_``-suffixed ops and F.*_ write in place;
# the others do when their ``inplace`` operand is True (positional or keyword).
_Build = Callable[[Callable[[str, object], object]], ActivationSpec]
_UNARY: Signature = ("input", "inplace")
_SELF: Signature = ("self",)
_HARDTANH: Signature = ("input", "min_val", "max_val", "inplace")
_LEAKY: Signature = ("input", "negative_slope", "inplace")
_GELU: Signature = ("input", "approximate")


def _relu_build(arg) -> ActivationSpec:
    return _relu()


def _hardtanh_build(arg) -> ActivationSpec:
    return _hardtanh("hardtanh", float(arg("min_val", -1.0)), float(arg("max_val", 1.0)))


def _leaky_build(arg) -> ActivationSpec:
    return _leaky_relu(float(arg("negative_slope", 0.01)))


def _gelu_build(arg) -> ActivationSpec:
    return _gelu(str(arg("approximate", "none")))


ACTIVATION_FUNCTIONS: dict[Callable, tuple[Signature, _Build, bool]] = {
    F.relu: (_UNARY, _relu_build, False),
    torch.relu: (_SELF, _relu_build, False),
    F.relu_: (_SELF, _relu_build, True),  # is torch.relu_
    F.relu6: (_UNARY, lambda arg: _hardtanh("relu6", 0.0, 6.0), False),
    F.hardtanh: (_HARDTANH, _hardtanh_build, False),
    F.hardtanh_: (_HARDTANH[:3], _hardtanh_build, True),
    F.leaky_relu: (_LEAKY, _leaky_build, False),
    F.leaky_relu_: (_LEAKY[:2], _leaky_build, True),
    F.hardswish: (_UNARY, lambda arg: _hardswish(), False),
    F.hardsigmoid: (_UNARY, lambda arg: _hardsigmoid(), False),
    F.gelu: (_GELU, _gelu_build, False),
    F.silu: (_UNARY, lambda arg: _silu(), False),
    F.mish: (_UNARY, lambda arg: _mish(), False),
    # ATen, as torch.export graphs hold them (ReLU6 is hardtanh(x, 0, 6) there).
    **{fn: (_SELF, _relu_build, False) for fn in aten_ops("relu.default")},
    **{fn: (_SELF, _relu_build, True) for fn in aten_ops("relu_.default")},
    **{fn: (_SELF, lambda arg: _hardtanh("relu6", 0.0, 6.0), False) for fn in aten_ops("relu6.default")},
    **{fn: (_SELF, lambda arg: _hardtanh("relu6", 0.0, 6.0), True) for fn in aten_ops("relu6_.default")},
    **{fn: (("self", "min_val", "max_val"), _hardtanh_build, False) for fn in aten_ops("hardtanh.default")},
    **{fn: (("self", "min_val", "max_val"), _hardtanh_build, True) for fn in aten_ops("hardtanh_.default")},
    **{fn: (("self", "negative_slope"), _leaky_build, False) for fn in aten_ops("leaky_relu.default")},
    **{fn: (("self", "negative_slope"), _leaky_build, True) for fn in aten_ops("leaky_relu_.default")},
    **{fn: (_SELF, lambda arg: _hardswish(), False) for fn in aten_ops("hardswish.default")},
    **{fn: (_SELF, lambda arg: _hardswish(), True) for fn in aten_ops("hardswish_.default")},
    **{fn: (_SELF, lambda arg: _hardsigmoid(), False) for fn in aten_ops("hardsigmoid.default")},
    **{fn: (_SELF, lambda arg: _hardsigmoid(), True) for fn in aten_ops("hardsigmoid_.default")},
    **{fn: (("self", "approximate"), _gelu_build, False) for fn in aten_ops("gelu.default")},
    **{fn: (("self", "approximate"), _gelu_build, True) for fn in aten_ops("gelu_.default")},
    **{fn: (_SELF, lambda arg: _silu(), False) for fn in aten_ops("silu.default")},
    **{fn: (_SELF, lambda arg: _silu(), True) for fn in aten_ops("silu_.default")},
    **{fn: (_SELF, lambda arg: _mish(), False) for fn in aten_ops("mish.default")},
    **{fn: (_SELF, lambda arg: _mish(), True) for fn in aten_ops("mish_.default")},
}

# Tensor methods: name -> builder (``relu_`` writes in place).
ACTIVATION_METHODS: dict[str, _Build] = {"relu": _relu_build, "relu_": _relu_build}


def activation_spec(node: fx.Node, modules: dict[str, nn.Module]) -> ActivationSpec | None:
    """The activation called at ``node``, or None if the node is no supported activation."""
    if node.op == "call_module":
        module = modules.get(str(node.target))
        return _module_spec(module) if module is not None else None
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        signature, build, always_inplace = ACTIVATION_FUNCTIONS[node.target]
        spec = build(lambda name, default: bind(node, signature, name, default) if name in signature else default)
        inplace = always_inplace or ("inplace" in signature and bind(node, signature, "inplace", False) is True)
        return replace(spec, inplace=inplace)
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        spec = ACTIVATION_METHODS[str(node.target)](lambda name, default: default)
        return replace(spec, inplace=node.target.endswith("_"))
    return None


def _is_activation_function(value) -> bool:
    try:
        return value in ACTIVATION_FUNCTIONS
    except TypeError:  # unhashable attribute values
        return False


def hidden_activation_count(module: nn.Module) -> int:
    """Activations inside ``module`` that a trace calling it as one node cannot see.

    Counts activation submodules below it and activation functions stored as
    attributes (``nn.TransformerEncoderLayer.activation = F.relu``); an
    activation module itself hides nothing.
    """
    count = 0
    for name, submodule in module.named_modules():
        if name and isinstance(submodule, ACTIVATION_TYPES):  # a subclass with its own forward hides one too
            count += 1
        count += sum(1 for value in vars(submodule).values() if _is_activation_function(value))
    return count


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """h(p) in bits, with h(0) = h(1) = 0 (the limits, not NaN)."""
    p = p.to(torch.float64)
    q = 1.0 - p
    with torch.no_grad():
        terms = -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), 0.0)) - (
            torch.where(q > 0, q * torch.log2(q.clamp_min(1e-300)), 0.0)
        )
    return terms


def categorical_entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each column of a [regions, neurons] count table."""
    totals = counts.sum(0, keepdim=True).clamp_min(1).to(torch.float64)
    p = counts.to(torch.float64) / totals
    return -(torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), 0.0)).sum(0)


def fit_affine(
    fn: Callable[[torch.Tensor], torch.Tensor],
    low: torch.Tensor,
    high: torch.Tensor,
    points: int = 257,
    allowed_error: float = 0.0,
):
    """Best affine surrogate of a smooth ``fn`` on each neuron's input range [low, high].

    Returns per-neuron (slope, intercept, max_error): the least-squares line
    over a dense grid of the range, and the largest deviation of ``fn`` from it
    on that grid. The exact candidates identity (1, 0) and zero (0, 0) are
    preferred when their error is within ``allowed_error`` (or no worse than
    the fit), so that a GELU whose inputs are far positive becomes an identity
    (removable, and a zero channel stays recognisably dead) rather than a
    0.99999 scale with a 1e-12 shift.
    """
    low = low.to(torch.float64)
    high = high.to(torch.float64)
    t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    grid = low[:, None] + (high - low)[:, None] * t[None, :]
    values = fn(grid)
    mean_x = grid.mean(1, keepdim=True)
    mean_y = values.mean(1, keepdim=True)
    var_x = ((grid - mean_x) ** 2).mean(1)
    cov = ((grid - mean_x) * (values - mean_y)).mean(1)
    slope = torch.where(var_x > 0, cov / var_x.clamp_min(1e-300), torch.zeros_like(var_x))
    intercept = mean_y.squeeze(1) - slope * mean_x.squeeze(1)
    error = (values - (slope[:, None] * grid + intercept[:, None])).abs().amax(1)
    for exact_slope in (1.0, 0.0):
        exact_error = (values - exact_slope * grid).abs().amax(1)
        better = (exact_error <= error) | (exact_error <= allowed_error)
        slope = torch.where(better, torch.full_like(slope, exact_slope), slope)
        intercept = torch.where(better, torch.zeros_like(intercept), intercept)
        error = torch.where(better, exact_error, error)
    return slope, intercept, error


__all__ = [
    "ActivationSpec",
    "activation_spec",
    "binary_entropy",
    "categorical_entropy",
    "fit_affine",
    "hidden_activation_count",
]
