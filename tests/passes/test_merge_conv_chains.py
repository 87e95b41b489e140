"""merge_conv_chains: structure, numerics against the untouched model, validity; every refusal reason fires."""

from __future__ import annotations

import io

import onnx
import pytest
import torch
import torch.nn as nn

from egp_export.algebra.costmodel import AnalyticCost
from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.numerics import compare
from egp_export.analysis.trace import trace
from egp_export.passes import MergeConvChains, finalize
from egp_export.passes.modules import ConstantAdd
from egp_export.records import RefusalCode, RewriteKind


def _run(model: nn.Module, shape, **options):
    model.eval()
    gm = trace(model)
    propagate_shapes(gm, torch.randn(1, *shape))
    result = MergeConvChains(**options)(gm)
    finalize(gm)
    return gm, result


def _convs(gm) -> list[nn.Module]:
    return [m for m in gm.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]


def _check_numerics(model, gm, shape, rtol=1e-5):
    fresh = torch.randn(4, *shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        error = compare(model(fresh), gm(fresh))
    assert error.max_rel <= rtol, error


def _check_onnx(gm, shape):
    buffer = io.BytesIO()
    torch.onnx.export(gm, (torch.randn(1, *shape),), buffer, dynamo=False)
    onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()), full_check=True)


class _Free(AnalyticCost):
    """A cost model under which every merge pays: isolates the algebra from the plan."""

    def conv_seconds(self, layer, input_size):
        return 1.0

    def add_seconds(self, elements):
        return 0.0


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dilation", [1, 2])
def test_kxk_then_pointwise_is_exact(rank, bias, stride, dilation):
    conv = nn.Conv1d if rank == 1 else nn.Conv2d
    model = nn.Sequential(conv(3, 8, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias), conv(8, 4, 1, bias=bias))
    shape = (3,) + (12,) * rank
    gm, result = _run(model, shape, cost=_Free())
    assert len(_convs(gm)) == 1
    assert result.rewrites and result.rewrites[0].kind is RewriteKind.MERGED_EXACT
    gm.graph.lint()
    _check_numerics(model, gm, shape)
    _check_onnx(gm, shape)


@pytest.mark.parametrize("groups", ["depthwise", 2])
def test_grouped_chains_merge_exactly(groups):
    first_groups = 6 if groups == "depthwise" else 2
    model = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=first_groups), nn.Conv2d(6, 6, 3, groups=first_groups))
    gm, result = _run(model, (6, 10, 10), cost=_Free())
    (merged,) = _convs(gm)
    assert merged.kernel_size == (5, 5)
    assert merged.groups == (6 if groups == "depthwise" else 1)  # depthwise∘depthwise stays depthwise
    _check_numerics(model, gm, (6, 10, 10))


def test_pointwise_then_padded_conv_gets_a_bias_map():
    model = nn.Sequential(nn.Conv2d(4, 16, 1), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 4, 1))
    gm, result = _run(model, (4, 8, 8), cost=_Free())
    assert len(_convs(gm)) == 1
    assert sum(isinstance(m, ConstantAdd) for m in gm.modules()) == 1
    assert result.rewrites[0].kind is RewriteKind.MERGED_BIAS_MAP
    _check_numerics(model, gm, (4, 8, 8))
    _check_onnx(gm, (4, 8, 8))


def test_padded_then_padded_is_refused_as_border_approximate():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1))
    gm, result = _run(model, (4, 8, 8), cost=_Free())
    assert len(_convs(gm)) == 2 and not result.modified
    assert any(r.code is RefusalCode.BORDER_NOT_EXACT for r in result.refusals)


def test_border_approximate_merge_when_allowed_differs_only_on_the_ring():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    gm, result = _run(model, (4, 8, 8), cost=_Free(), approximate=True)
    assert len(_convs(gm)) == 1 and result.rewrites[0].kind is RewriteKind.MERGED_BORDER_APPROXIMATE
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        diff = (model(x) - gm(x)).abs()
    assert float(diff[..., 1:-1, 1:-1].max()) < 1e-5
    assert float(diff.max()) > 1e-3


def test_merge_refused_when_predicted_latency_grows():
    # 3x3 -> 3x3 unpadded: exact, but a 5x5 dense kernel costs 25/18 of the two 3x3 layers.
    model = nn.Sequential(nn.Conv2d(32, 32, 3), nn.Conv2d(32, 32, 3))
    gm, result = _run(model, (32, 16, 16))
    assert len(_convs(gm)) == 2
    assert any(r.code is RefusalCode.COST_GROWS for r in result.refusals)


def test_plan_all_merges_whatever_it_costs():
    model = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1))
    gm, result = _run(model, (32, 16, 16), plan="all")
    assert len(_convs(gm)) == 1


def test_dynamic_programming_picks_the_cheapest_split():
    """Three layers where merging all is worse than merging the last two (MACs decide)."""
    model = nn.Sequential(
        nn.Conv2d(16, 16, 3, padding=1),  # merging this one in would grow the kernel to 3x3 over 64 channels
        nn.Conv2d(16, 64, 1),
        nn.Conv2d(64, 16, 1),
    )
    gm, result = _run(model, (16, 16, 16))
    kernels = sorted(c.kernel_size for c in _convs(gm))
    assert len(kernels) <= 2
    _check_numerics(model, gm, (16, 16, 16))


def test_shared_conv_is_not_part_of_a_chain():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 1)
            self.b = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.b(self.a(self.a(x)))

    model = Shared()
    gm, result = _run(model, (4, 6, 6), cost=_Free())
    assert not result.modified
    _check_numerics(model, gm, (4, 6, 6))


def test_reflect_padding_is_left_alone():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 1))
    gm, result = _run(model, (4, 6, 6), cost=_Free())
    assert not result.modified and len(_convs(gm)) == 2


def test_identity_modules_between_convs_are_skipped():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Dropout(0.5), nn.Identity(), nn.Conv2d(8, 4, 1))
    gm, result = _run(model, (4, 8, 8), cost=_Free())
    assert len(_convs(gm)) == 1
    assert not any(isinstance(m, nn.Dropout) for m in gm.modules())
    _check_numerics(model, gm, (4, 8, 8))
