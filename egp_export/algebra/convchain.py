"""Algebra of composing convolutions: one conv from a chain, and when that is exact.

Along each spatial axis, conv A (kernel k1, stride s1, padding p1, dilation d1)
followed by conv B (k2, s2, p2, d2) reads

    y[o] = sum_j W2[j] x1[o s2 - p2 + j d2],   x1[m] = sum_i W1[i] x[m s1 - p1 + i d1] + b1
         = sum_{i,j} W2[j] W1[i] x[o s1 s2 - (p1 + p2 s1) + j d2 s1 + i d1] + ...

so the merged conv has stride S = s1 s2, padding P = p1 + p2 s1 and a kernel
whose taps sit at offsets j d2 s1 + i d1: dilation D = gcd(d1, d2 s1) (the
taps of a 1-wide kernel do not count), size K = ((k1-1) d1 + (k2-1) d2 s1)/D + 1,
and weights W[o, c, t] = sum_m sum_{i,j: j d2 s1 + i d1 = t D} W2[o, m, j] W1[m, c, i].
Channel mixing is a matrix product, so grouped convs are made dense first;
depthwise∘depthwise stays depthwise.

Exactness (``ChainClass``):
- EXACT: no conv after the first pads. B reads only x1 values A computed.
- EXACT_BIAS_MAP: every conv before the first padded-or-wide conv is 1x1 and
  unpadded, and no conv after it pads. Then the padded ring of every
  intermediate holds only what the leading 1x1 convs make of zeros, i.e. bias:
  the weights are exact, and the bias becomes a position-dependent constant
  map (for a static input size), computed by running the chain on zeros.
- BORDER_APPROXIMATE: otherwise. Interior outputs are exact; an outer ring as
  wide as the later convs' padding differs (the chain pads intermediates with
  zeros, the merged conv sees computed values there).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from itertools import product

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV_BY_RANK = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
FUNCTIONAL_BY_RANK = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class ChainClass(str, enum.Enum):
    EXACT = "exact"
    EXACT_BIAS_MAP = "exact-bias-map"
    BORDER_APPROXIMATE = "border-approximate"


@dataclass(frozen=True)
class ConvLayer:
    """A convolution as plain data (float64), independent of nn.Module."""

    weight: torch.Tensor  # [out, in / groups, *kernel]
    bias: torch.Tensor  # [out]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def rank(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def pointwise(self) -> bool:
        """1x1 and unpadded (any stride): maps each position on its own."""
        return all(k == 1 for k in self.kernel) and all(p == 0 for p in self.padding)

    @property
    def padded(self) -> bool:
        return any(p != 0 for p in self.padding)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels

    @classmethod
    def from_module(cls, conv: nn.Module) -> ConvLayer:
        rank = conv.weight.dim() - 2
        weight = conv.weight.detach().to(torch.float64).clone()
        bias = (
            conv.bias.detach().to(torch.float64).clone()
            if conv.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64)
        )
        return cls(weight, bias, _tuple(conv.stride, rank), explicit_padding(conv), _tuple(conv.dilation, rank), conv.groups)

    @classmethod
    def shape_of_module(cls, conv: nn.Module) -> ConvLayer:
        """The conv's geometry with weights on the meta device: for costs and sizes, no copying."""
        rank = conv.weight.dim() - 2
        weight = torch.empty(conv.weight.shape, device="meta")
        bias = torch.empty(conv.weight.shape[0], device="meta")
        return cls(weight, bias, _tuple(conv.stride, rank), explicit_padding(conv), _tuple(conv.dilation, rank), conv.groups)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent groups=1 weight [out, in, *kernel] (zero outside the groups)."""
        if self.groups == 1:
            return self.weight
        out_per, in_per = self.out_channels // self.groups, self.in_channels // self.groups
        dense = torch.zeros(self.out_channels, self.in_channels, *self.kernel, dtype=self.weight.dtype)
        for g in range(self.groups):
            dense[g * out_per : (g + 1) * out_per, g * in_per : (g + 1) * in_per] = self.weight[g * out_per : (g + 1) * out_per]
        return dense

    def to_module(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        conv = CONV_BY_RANK[self.rank](
            self.in_channels,
            self.out_channels,
            self.kernel,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=True,
            dtype=dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight.to(dtype))
            conv.bias.copy_(self.bias.to(dtype))
        return conv.eval()

    def apply(self, x: torch.Tensor, *, bias: bool = True) -> torch.Tensor:
        fn = FUNCTIONAL_BY_RANK[self.rank]
        return fn(
            x,
            self.weight.to(x.dtype),
            self.bias.to(x.dtype) if bias else None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def output_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip(size, self.padding, self.dilation, self.kernel, self.stride)
        )

    def macs(self, input_size: tuple[int, ...]) -> int:
        """Multiply-accumulates per sample on an input of spatial ``input_size``."""
        positions = math.prod(self.output_size(input_size))
        return positions * self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)


def _tuple(value, rank: int) -> tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (tuple, list)) else (int(value),) * rank


def explicit_padding(conv: nn.Module) -> tuple[int, ...]:
    """Symmetric per-axis padding of a zero-padded conv; ValueError for what has none."""
    rank = conv.weight.dim() - 2
    if conv.padding_mode != "zeros":
        raise ValueError(f"padding_mode '{conv.padding_mode}' is not zero padding")
    padding = conv.padding
    if padding == "valid":
        return (0,) * rank
    if padding == "same":
        total = [d * (k - 1) for d, k in zip(_tuple(conv.dilation, rank), conv.kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError("padding='same' with an even receptive field pads asymmetrically")
        return tuple(t // 2 for t in total)
    return _tuple(padding, rank)


def compose(a: ConvLayer, b: ConvLayer) -> ConvLayer:
    """The single conv equal to ``b(a(x))`` in the interior (see the module docstring).

    The bias is the interior one: b2 + sum over b's taps of W2 b1.
    """
    if a.rank != b.rank:
        raise ValueError("convs of different rank")
    if b.in_channels != a.out_channels:
        raise ValueError(f"channel mismatch: {a.out_channels} out vs {b.in_channels} in")
    rank = a.rank
    w1, w2 = a.dense_weight(), b.dense_weight()
    span1 = tuple((k - 1) * d + 1 for k, d in zip(a.kernel, a.dilation))
    grid = tuple(
        (k1 - 1) * d1 + (k2 - 1) * d2 * s1 + 1 for k1, d1, k2, d2, s1 in zip(a.kernel, a.dilation, b.kernel, b.dilation, a.stride)
    )
    w1_grid = torch.zeros(*w1.shape[:2], *span1, dtype=torch.float64)
    w1_grid[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in a.dilation)] = w1
    merged = torch.zeros(w2.shape[0], w1.shape[1], *grid, dtype=torch.float64)
    for tap in product(*(range(k) for k in b.kernel)):
        start = tuple(j * d2 * s1 for j, d2, s1 in zip(tap, b.dilation, a.stride))
        window = (slice(None), slice(None)) + tuple(slice(s, s + n) for s, n in zip(start, span1))
        merged[window] += torch.einsum("om,mc...->oc...", w2[(slice(None), slice(None)) + tap], w1_grid)
    # The taps of a 1-wide kernel sit at offset 0 only: they do not constrain the dilation.
    dilation = tuple(
        (d2 * s1 if k1 == 1 else (d1 if k2 == 1 else math.gcd(d1, d2 * s1))) if (k1 > 1 or k2 > 1) else 1
        for k1, d1, k2, d2, s1 in zip(a.kernel, a.dilation, b.kernel, b.dilation, a.stride)
    )
    merged = merged[(slice(None), slice(None)) + tuple(slice(None, None, d) for d in dilation)]
    bias = b.bias + w2.sum(dim=tuple(range(2, 2 + rank))) @ a.bias
    stride = tuple(s1 * s2 for s1, s2 in zip(a.stride, b.stride))
    padding = tuple(p1 + p2 * s1 for p1, p2, s1 in zip(a.padding, b.padding, a.stride))
    if a.depthwise and b.depthwise and a.out_channels == b.in_channels:
        diagonal = torch.arange(merged.shape[0])
        return ConvLayer(merged[diagonal, diagonal].unsqueeze(1).clone(), bias, stride, padding, dilation, a.groups)
    return ConvLayer(merged, bias, stride, padding, dilation, 1)


def chain_class(layers: list[ConvLayer]) -> ChainClass:
    """How exactly one conv can replace the chain (see the module docstring)."""
    later_pads = any(layer.padded for layer in layers[1:])
    if not later_pads:
        return ChainClass.EXACT
    first_wide = next(i for i, layer in enumerate(layers) if not layer.pointwise)
    if not any(layer.padded for layer in layers[first_wide + 1 :]):
        return ChainClass.EXACT_BIAS_MAP
    return ChainClass.BORDER_APPROXIMATE


def run_chain(layers: list[ConvLayer], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer.apply(x)
    return x


@dataclass(frozen=True)
class MergedChain:
    conv: ConvLayer
    bias_map: torch.Tensor | None  # [out, *spatial] added after the conv (EXACT_BIAS_MAP)
    chain_class: ChainClass


def merge_chain(layers: list[ConvLayer], input_size: tuple[int, ...] | None) -> MergedChain:
    """One conv (plus a constant bias map where needed) for a chain; ValueError where impossible.

    ``input_size`` (spatial, static) is needed for the bias map and to check
    that the merged conv produces the chain's output size.
    """
    merged = layers[0]
    for layer in layers[1:]:
        merged = compose(merged, layer)
    kind = chain_class(layers)
    if input_size is not None:
        size = input_size
        for layer in layers:
            size = layer.output_size(size)
        if merged.output_size(input_size) != size:
            raise ValueError(f"strides do not align: merged output {merged.output_size(input_size)} vs chain {size}")
    if kind is not ChainClass.EXACT_BIAS_MAP:
        return MergedChain(merged, None, kind)
    if input_size is None:
        raise ValueError("a position-dependent bias needs a static input size")
    zeros = torch.zeros(1, layers[0].in_channels, *input_size, dtype=torch.float64)
    bias_map = run_chain(layers, zeros)[0]
    flat = bias_map.flatten(1)
    if bool((flat == flat[:, :1]).all()):
        return MergedChain(replace(merged, bias=flat[:, 0].clone()), None, ChainClass.EXACT)
    return MergedChain(replace(merged, bias=torch.zeros_like(merged.bias)), bias_map, kind)
