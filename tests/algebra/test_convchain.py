"""Property tests of conv-chain composition: what the algebra calls exact is exact.

Random chains (kernel, stride, padding, dilation, groups, bias; Conv1d and
Conv2d) on random inputs of random sizes. EXACT and EXACT_BIAS_MAP merges
must match the unmerged chain to fp64 rounding everywhere; BORDER_APPROXIMATE
merges must match in the interior, and differ only on the outer ring.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from egp_export.algebra.convchain import ChainClass, ConvLayer, chain_class, compose, merge_chain, run_chain


@st.composite
def conv_layers(draw, rank: int, in_channels: int, depthwise_ok: bool = True, pointwise: bool = False):
    kernel = 1 if pointwise else draw(st.sampled_from([1, 1, 2, 3, 5]))
    stride = draw(st.sampled_from([1, 1, 1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2])) if kernel > 1 else 1
    padding = 0 if pointwise else draw(st.integers(0, (kernel - 1) * dilation // 2 + 1))
    groups_choice = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"])) if depthwise_ok else "dense"
    if groups_choice == "depthwise":
        groups, out_channels = in_channels, in_channels
    elif groups_choice == "grouped" and in_channels % 2 == 0:
        groups, out_channels = 2, 2 * draw(st.integers(1, 3))
    else:
        groups, out_channels = 1, draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, in_channels // groups, *([kernel] * rank), generator=generator, dtype=torch.float64)
    bias = (
        torch.randn(out_channels, generator=generator, dtype=torch.float64)
        if draw(st.booleans())
        else torch.zeros(out_channels, dtype=torch.float64)
    )
    return ConvLayer(weight, bias, (stride,) * rank, (padding,) * rank, (dilation,) * rank, groups)


@st.composite
def chains(draw):
    rank = draw(st.sampled_from([1, 2]))
    channels = draw(st.integers(1, 4))
    layers = []
    # Chains that open with 1x1 convs are the ones whose padded merges stay exact (bias map).
    leading_pointwise = draw(st.integers(0, 2))
    for index in range(draw(st.integers(2, 3))):
        layer = draw(conv_layers(rank, channels, pointwise=index < leading_pointwise))
        layers.append(layer)
        channels = layer.out_channels
    size = draw(st.integers(6, 14))
    return rank, layers, size


def _input(rank: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, channels, *([size] * rank), generator=generator, dtype=torch.float64)


def _fits(layers, size: int) -> bool:
    spatial = (size,) * layers[0].rank
    for layer in layers:
        spatial = layer.output_size(spatial)
        if min(spatial) < 1:
            return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chains())
def test_merge_matches_chain_as_classified(case):
    rank, layers, size = case
    assume(_fits(layers, size))
    spatial = (size,) * rank
    try:
        merged = merge_chain(layers, spatial)
    except ValueError as error:
        assert "align" in str(error)  # the only refusal: strides that do not line up
        event("refused: strides do not align")
        return
    event(merged.chain_class.value)
    x = _input(rank, layers[0].in_channels, size)
    expected = run_chain(layers, x)
    actual = merged.conv.apply(x)
    if merged.bias_map is not None:
        actual = actual + merged.bias_map
    assert actual.shape == expected.shape
    scale = max(1.0, float(expected.abs().max()))
    if merged.chain_class in (ChainClass.EXACT, ChainClass.EXACT_BIAS_MAP):
        assert float((actual - expected).abs().max()) <= 1e-9 * scale
        return
    # Border-approximate: exact away from the ring the later paddings touch.
    ring = _ring_width(layers)
    interior = (slice(None), slice(None)) + tuple(slice(ring, n - ring) for n in expected.shape[2:])
    if all(n - 2 * ring > 0 for n in expected.shape[2:]):
        assert float((actual[interior] - expected[interior]).abs().max()) <= 1e-9 * scale


def _ring_width(layers) -> int:
    """Output positions within this distance of an edge may read a padded intermediate."""
    width, stride_after = 0, 1
    for layer in reversed(layers[1:]):
        if layer.padded:
            width = max(width, math.ceil(max(layer.padding) / stride_after))
        stride_after *= max(layer.stride)
    # Dilated/strided later taps can reach further inward; be generous but bounded.
    return width + sum(max(layer.dilation) * max(layer.kernel) for layer in layers[1:])


@pytest.mark.parametrize("rank", [1, 2])
def test_pointwise_then_padded_needs_and_gets_a_bias_map(rank):
    generator = torch.Generator().manual_seed(0)
    a = ConvLayer(
        torch.randn(6, 3, *([1] * rank), generator=generator, dtype=torch.float64),
        torch.randn(6, generator=generator, dtype=torch.float64),
        (1,) * rank,
        (0,) * rank,
        (1,) * rank,
        1,
    )
    b = ConvLayer(
        torch.randn(4, 6, *([3] * rank), generator=generator, dtype=torch.float64),
        torch.randn(4, generator=generator, dtype=torch.float64),
        (1,) * rank,
        (1,) * rank,
        (1,) * rank,
        1,
    )
    assert chain_class([a, b]) is ChainClass.EXACT_BIAS_MAP
    merged = merge_chain([a, b], (7,) * rank)
    assert merged.bias_map is not None and merged.bias_map.shape == (4,) + (7,) * rank
    # Interior of the bias map is the constant interior bias; the border differs.
    interior = merged.bias_map[(slice(None),) + (slice(1, -1),) * rank]
    assert torch.allclose(interior, compose(a, b).bias.reshape(4, *([1] * rank)).expand_as(interior))
    assert not torch.allclose(merged.bias_map, interior.flatten(1)[:, :1].reshape(4, *([1] * rank)).expand_as(merged.bias_map))


def test_three_by_three_twice_is_border_approximate_with_a_five_by_five_kernel():
    generator = torch.Generator().manual_seed(1)
    layers = [
        ConvLayer(
            torch.randn(4, 4, 3, 3, generator=generator, dtype=torch.float64),
            torch.zeros(4, dtype=torch.float64),
            (1, 1),
            (1, 1),
            (1, 1),
            1,
        )
        for _ in range(2)
    ]
    merged = merge_chain(layers, (8, 8))
    assert merged.chain_class is ChainClass.BORDER_APPROXIMATE
    assert merged.conv.kernel == (5, 5) and merged.conv.padding == (2, 2)
    x = _input(2, 4, 8)
    diff = (merged.conv.apply(x) - run_chain(layers, x)).abs()
    assert float(diff[..., 1:-1, 1:-1].max()) < 1e-9  # interior exact
    assert float(diff.max()) > 1e-3  # the ring is not


def test_depthwise_then_depthwise_stays_depthwise():
    generator = torch.Generator().manual_seed(2)
    a = ConvLayer(
        torch.randn(5, 1, 3, 3, generator=generator, dtype=torch.float64),
        torch.randn(5, generator=generator, dtype=torch.float64),
        (1, 1),
        (1, 1),
        (1, 1),
        5,
    )
    b = ConvLayer(
        torch.randn(5, 1, 3, 3, generator=generator, dtype=torch.float64),
        torch.randn(5, generator=generator, dtype=torch.float64),
        (2, 2),
        (0, 0),
        (1, 1),
        5,
    )
    merged = compose(a, b)
    assert merged.groups == 5 and merged.weight.shape == (5, 1, 5, 5)
    x = _input(2, 5, 9)
    assert torch.allclose(merged.apply(x), run_chain([a, b], x), atol=1e-10)
