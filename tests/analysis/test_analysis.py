"""Tests for egp_export.analysis.stats: per-call-site statistics, EGP entropy, margins, merging, linear maps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.activations import ActivationSpec, activation_spec
from egp_export.analysis.ops import named_modules
from egp_export.analysis.plans import analyze, summarize_sites
from egp_export.analysis.stats import META_KEY, SiteStats, calibrate, site_stats
from egp_export.analysis.trace import trace
from egp_export.errors import CalibrationError
from egp_export.records import Reason, RefusalCode
from tests.conftest import engineer

pytestmark = pytest.mark.usefixtures("tiny_model_runtime")

H_QUARTER = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))  # h(1/4) in bits


def spec_of(act: nn.Module) -> ActivationSpec:
    gm = trace(nn.Sequential(act).eval())
    modules = named_modules(gm)
    return next(s for s in (activation_spec(n, modules) for n in gm.graph.nodes) if s is not None)


def site(act: nn.Module, dim: int = 1) -> SiteStats:
    return SiteStats("site", "module", "act", spec_of(act), dim)


# Hand-made inputs -------------------------------------------------------------------


def _hand_made() -> torch.Tensor:
    """z of shape [batch 2, channels 3, length 2]: channel 0 always ON, 1 ON once in 4, 2 ON half the time."""
    z = torch.empty(2, 3, 2)
    z[:, 0] = torch.tensor([[1.0, 2.0], [3.0, 0.5]])
    z[:, 1] = torch.tensor([[-1.0, 0.0], [4.0, -2.0]])  # z == 0 is OFF: state is 1[z > 0]
    z[:, 2] = torch.tensor([[-0.25, 7.0], [-3.0, 0.75]])
    return z


def test_counts_and_on_fractions_over_batch_and_space():
    stats = site(nn.ReLU())
    stats.observe(_hand_made())

    assert stats.num_neurons == 3
    assert stats.observations == 4  # batch x length
    assert stats.on_counts.tolist() == [4, 1, 2]
    torch.testing.assert_close(stats.on_fraction, torch.tensor([1.0, 0.25, 0.5], dtype=torch.float64))
    # ReLU regions: z <= 0 | z > 0
    assert stats.region_counts.tolist() == [[0, 3, 2], [4, 1, 2]]


def test_egp_entropy_is_the_mean_binary_entropy_in_bits():
    stats = site(nn.ReLU())
    stats.observe(_hand_made())

    torch.testing.assert_close(stats.neuron_entropy, torch.tensor([0.0, H_QUARTER, 1.0], dtype=torch.float64))
    assert stats.entropy == pytest.approx((0.0 + H_QUARTER + 1.0) / 3, abs=1e-12)
    assert stats.constant_fraction == pytest.approx(1 / 3)


def test_margin_is_the_smallest_distance_to_a_boundary():
    relu = site(nn.ReLU())
    relu.observe(_hand_made())
    relu6 = site(nn.ReLU6())
    relu6.observe(_hand_made())

    # Channels 1 and 2 were seen on both sides of 0: they left their region, their margin is 0.
    assert relu.margin.tolist() == [0.5, 0.0, 0.0]
    assert relu6.margin.tolist() == [0.5, 0.0, 0.0]
    # The report quotes the margins of the neurons that stayed in one region only.
    assert relu.to_dict()["min_margin"] == 0.5 and relu.evidence()["min_margin"] == 0.5
    assert relu6.region_counts.tolist() == [[0, 3, 2], [4, 1, 1], [0, 0, 1]]
    torch.testing.assert_close(relu6.low, torch.tensor([0.5, -2.0, -3.0], dtype=torch.float64))
    torch.testing.assert_close(relu6.high, torch.tensor([3.0, 4.0, 7.0], dtype=torch.float64))


def test_boundary_points_belong_to_the_lower_region():
    stats = site(nn.ReLU6())
    stats.observe(torch.tensor([[0.0, 6.0]]))  # [batch 1, neurons 2]

    assert stats.neuron_region.tolist() == [0, 1]


def test_constant_site_has_zero_entropy_and_dead_neurons():
    stats = site(nn.ReLU())
    z = torch.randn(5, 4, 3).abs() + 0.1
    z[:, 1] = -z[:, 1]
    z[:, 3] = -z[:, 3]
    stats.observe(z)

    assert stats.entropy == 0.0
    assert stats.region_entropy == 0.0
    assert stats.dead_neurons().tolist() == [False, True, False, True]
    assert stats.neuron_region.tolist() == [1, 0, 1, 0]


def test_dead_neurons_need_a_zero_region_and_zero_at_zero():
    z = -torch.rand(4, 2) - 5.0  # below -3 and below 0 everywhere
    leaky, hardsigmoid, hardswish = site(nn.LeakyReLU(0.1)), site(nn.Hardsigmoid()), site(nn.Hardswish())
    for stats in (leaky, hardsigmoid, hardswish):
        stats.observe(z)

    assert not leaky.dead_neurons().any()  # slope 0.1, not zero
    assert not hardsigmoid.dead_neurons().any()  # 0 there, but hardsigmoid(0) = 0.5
    assert hardswish.dead_neurons().all()


def test_smooth_sites_have_one_region_and_no_margin():
    stats = site(nn.GELU())
    stats.observe(_hand_made())

    assert stats.region_counts.tolist() == [[4, 4, 4]]
    assert torch.isinf(stats.margin).all()
    assert stats.on_counts.tolist() == [4, 1, 2]
    assert stats.to_dict()["min_margin"] is None


def test_inputs_below_rank_two_are_one_neuron():
    """A vector (e.g. a statistic pooled over the batch) has no batch axis: every element observes one neuron."""
    stats = site(nn.ReLU(), dim=-1)
    stats.observe(torch.tensor([1.0, -2.0, 3.0]))
    stats.observe(torch.tensor(4.0))
    assert (stats.num_neurons, stats.observations) == (1, 4)
    assert stats.on_counts.tolist() == [3]


def test_neuron_axis_beyond_the_rank_is_refused():
    with pytest.raises(CalibrationError, match=r"expected at least \[batch, neurons\]"):
        site(nn.ReLU(), dim=3).observe(torch.randn(5, 2))


def test_neuron_count_change_between_batches_is_refused():
    stats = site(nn.ReLU(), dim=-1)
    stats.observe(torch.randn(2, 3))

    with pytest.raises(CalibrationError, match="saw 4 neurons in one batch and 3"):
        stats.observe(torch.randn(2, 4))


# Call sites, layouts, accumulation ----------------------------------------------------


class SharedReLU(nn.Module):
    """torchvision's BasicBlock pattern: one nn.ReLU module called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU()
        engineer(self.conv1, [50.0] * 4, weight_scale=1.0)  # first call: 50 +- a few, always ON
        with torch.no_grad():  # second call: centred on 0 (mixed) except channel 0, far below (dead)
            centre = self.conv2.weight.sum((1, 2, 3)) * 50.0
            self.conv2.bias.copy_(-centre + torch.tensor([-500.0, 0.0, 0.0, 0.0]))

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_shared_module_called_twice_gives_two_sites():
    gm = trace(SharedReLU().eval())
    sites = calibrate(gm, [torch.randn(8, 3, 4, 4)])

    assert [s.target for s in sites] == ["relu", "relu"]
    assert len({s.name for s in sites}) == 2
    first, second = sites
    assert first.entropy == 0.0 and first.on_counts.tolist() == [128] * 4
    assert second.entropy > 0.0
    assert second.on_counts[0] == 0
    # Each site's stats live on its own node.
    nodes = [n for n in gm.graph.nodes if META_KEY in n.meta]
    assert [site_stats(n) for n in nodes] == sites


def test_channels_last_linear_puts_neurons_on_the_last_axis():
    fc = nn.Linear(3, 5)
    model = nn.Sequential(fc, nn.ReLU()).eval()
    x = torch.randn(2, 4, 6, 3)  # Swin-style [B, H, W, C]
    (stats,) = calibrate(trace(model), [x])

    assert stats.dim == -1
    assert stats.num_neurons == 5
    assert stats.observations == 2 * 4 * 6
    with torch.no_grad():
        z = fc(x)
    assert stats.on_counts.tolist() == (z > 0).reshape(-1, 5).sum(0).tolist()


def test_conv_layout_puts_neurons_on_axis_one():
    model = nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU()).eval()
    (stats,) = calibrate(trace(model), [torch.randn(4, 2, 7)])

    assert stats.dim == 1
    assert stats.num_neurons == 3
    assert stats.observations == 4 * 7


def _fields(stats: SiteStats) -> dict:
    return {
        "observations": stats.observations,
        "region_counts": stats.region_counts.tolist(),
        "on_counts": stats.on_counts.tolist(),
        "low": stats.low.tolist(),
        "high": stats.high.tolist(),
        "margin": stats.margin.tolist(),
    }


def _conv_relu6() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU6()).eval()


def test_accumulating_batches_equals_one_big_batch():
    model = _conv_relu6()
    batches = [torch.randn(3, 2, 5, 5) * 3 for _ in range(3)]
    (pieces,) = calibrate(trace(model), batches)
    (whole,) = calibrate(trace(model), [torch.cat(batches)])

    assert _fields(pieces) == _fields(whole)
    assert pieces.entropy == whole.entropy


def test_merge_of_two_shards_equals_the_union():
    model = _conv_relu6()
    shard_a, shard_b = torch.randn(3, 2, 5, 5) * 3, torch.randn(5, 2, 5, 5) * 3
    (a,) = calibrate(trace(model), [shard_a])
    (b,) = calibrate(trace(model), [shard_b])
    (union,) = calibrate(trace(model), [shard_a, shard_b])
    a.merge(b)

    assert _fields(a) == _fields(union)


def test_merge_into_an_empty_site_copies_and_does_not_alias():
    (b,) = calibrate(trace(_conv_relu6()), [torch.randn(3, 2, 5, 5)])
    empty = SiteStats(b.name, b.form, b.target, b.spec, b.dim)
    empty.merge(b)
    empty.merge(SiteStats(b.name, b.form, b.target, b.spec, b.dim))  # an empty shard changes nothing

    assert _fields(empty) == _fields(b)
    empty.on_counts += 1
    assert not torch.equal(empty.on_counts, b.on_counts)


def test_calibration_with_the_wrong_input_shape_says_so():
    with pytest.raises(CalibrationError, match=r"rejects calibration samples of shape \(5, 5, 5\)"):
        calibrate(trace(_conv_relu6()), [torch.randn(2, 5, 5, 5)])


# Reports and linear maps ------------------------------------------------------------


class Mixed(nn.Module):
    """Two sites: a ReLU ON/OFF per neuron (linear) and a function-form GELU on unit-normal inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(4, 2)
        engineer(self.fc1, [50.0, 50.0, -50.0, 50.0])

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))), F.gelu(x)


def test_analyze_reports_one_row_per_site():
    report = analyze(Mixed().eval(), torch.randn(16, 3))

    assert report["num_sites"] == 2
    assert report["num_linear_sites"] == 1
    assert report["zero_entropy_sites"] == 1
    relu, gelu = report["sites"]
    assert (relu["form"], relu["target"], relu["activation"]) == ("module", "act", "relu")
    assert (gelu["form"], gelu["target"], gelu["activation"]) == ("function", "gelu", "gelu")
    assert relu["neurons"] == 4 and relu["observations"] == 16 and relu["neuron_dim"] == -1
    assert relu["entropy"] == 0.0 and relu["linear"] and relu["why_not_linear"] is None
    assert relu["dead_neurons"] == 1
    assert relu["constant_fraction"] == 1.0
    assert relu["region_fractions"] == [0.25, 0.75]
    assert relu["min_margin"] > 45.0
    assert not gelu["linear"] and gelu["why_not_linear"]["code"] == RefusalCode.SURROGATE_ERROR.value
    assert gelu["surrogate_error"] > 1e-5
    assert report["mean_entropy"] == pytest.approx((relu["entropy"] + gelu["entropy"]) / 2)


def test_summarize_sites_without_sites():
    assert summarize_sites([], {}) == {
        "sites": [], "num_sites": 0, "num_linear_sites": 0, "mean_entropy": 0.0, "zero_entropy_sites": 0
    }


def _smooth_site(act: nn.Module, bias: float) -> SiteStats:
    layer = nn.Linear(3, 4)
    engineer(layer, [bias] * 4)
    (stats,) = calibrate(trace(nn.Sequential(layer, act).eval()), [torch.randn(32, 3)])
    return stats


def test_smooth_site_far_positive_is_an_exact_identity():
    linear = _smooth_site(nn.GELU(), 30.0).linear_map(1e-5)

    assert linear.ok
    assert linear.scale.tolist() == [1.0] * 4 and linear.shift.tolist() == [0.0] * 4
    assert linear.max_error == 0.0


def test_smooth_site_in_the_nonlinear_range_depends_on_the_tolerance():
    stats = _smooth_site(nn.SiLU(), 0.0)
    strict, loose = stats.linear_map(1e-5), stats.linear_map(5e-2)
    # The tolerance is relative to the site's own output scale (max |SiLU(z)| on the range, here ~0.02).
    allowed = 5e-2 * stats.output_scale()

    assert not strict.ok and strict.scale is None
    assert strict.refusal.code is RefusalCode.SURROGATE_ERROR
    assert loose.ok and 0.0 < loose.max_error <= allowed
    # Whatever map was chosen (the fit, or exact zero/identity where those are within the tolerance),
    # it stays within the tolerance of SiLU on every neuron's calibrated range.
    grid = stats.low[:, None] + (stats.high - stats.low)[:, None] * torch.linspace(0, 1, 101, dtype=torch.float64)
    deviation = (torch.nn.functional.silu(grid) - (loose.scale[:, None] * grid + loose.shift[:, None])).abs()
    assert float(deviation.max()) <= allowed


def test_smooth_site_with_tiny_inputs_is_held_to_its_own_scale():
    # SiLU inputs of +-1e-4: the zero map is off by ~5e-5, within 1e-5 x max(1, |f|) (the old rule, which
    # zeroed whole layers) but far outside 1e-5 x the site's own scale.
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight.mul_(1e-4)
        layer.bias.zero_()
    (stats,) = calibrate(trace(nn.Sequential(layer, nn.SiLU()).eval()), [torch.randn(64, 3)])

    assert stats.output_scale() < 1e-3
    assert not stats.linear_map(1e-5).ok


@pytest.mark.parametrize(
    ("act", "bias", "scale", "shift"),
    [
        (nn.ReLU(), [50.0, -50.0], [1.0, 0.0], [0.0, 0.0]),
        (nn.ReLU6(), [3.0, 100.0], [1.0, 0.0], [0.0, 6.0]),
        (nn.Hardtanh(-2.0, 3.0), [-50.0, 0.5], [0.0, 1.0], [-2.0, 0.0]),
        (nn.LeakyReLU(0.2), [-50.0, 50.0], [0.2, 1.0], [0.0, 0.0]),
        (nn.Hardsigmoid(), [0.0, 50.0], [1 / 6, 0.0], [0.5, 1.0]),
        (nn.Hardswish(), [-50.0, 50.0], [0.0, 1.0], [0.0, 0.0]),
    ],
    ids=["relu", "relu6", "hardtanh", "leaky_relu", "hardsigmoid", "hardswish"],
)
def test_piecewise_linear_site_map(act, bias, scale, shift):
    layer = nn.Linear(3, 2)
    engineer(layer, bias)
    (stats,) = calibrate(trace(nn.Sequential(layer, act).eval()), [torch.randn(32, 3)])
    linear = stats.linear_map(0.0)

    assert linear.ok and linear.max_error == 0.0
    torch.testing.assert_close(linear.scale, torch.tensor(scale, dtype=torch.float64))
    torch.testing.assert_close(linear.shift, torch.tensor(shift, dtype=torch.float64))


def test_prelu_site_map_uses_per_neuron_slopes():
    layer, prelu = nn.Linear(3, 3), nn.PReLU(3)
    engineer(layer, [-50.0, 50.0, -50.0])
    with torch.no_grad():
        prelu.weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
    (stats,) = calibrate(trace(nn.Sequential(layer, prelu).eval()), [torch.randn(8, 3)])
    linear = stats.linear_map(0.0)

    torch.testing.assert_close(linear.scale, torch.tensor([0.1, 1.0, 0.3], dtype=torch.float64))


def test_piecewise_site_refusals():
    crossing = site(nn.ReLU())
    crossing.observe(torch.tensor([[-1.0, 1.0], [1.0, 2.0]]))
    middle = site(nn.Hardswish())
    middle.observe(torch.tensor([[0.5, 10.0], [-0.5, 11.0]]))

    assert crossing.linear_map(1.0).refusal == Reason(RefusalCode.NEURONS_CROSS_BOUNDARY, {"crossing": 1, "neurons": 2})
    assert middle.linear_map(1.0).refusal == Reason(RefusalCode.NONAFFINE_REGION, {"count": 1, "activation": "hardswish"})
    assert site(nn.ReLU()).linear_map(1.0).refusal.code is RefusalCode.NO_CALIBRATION_DATA


class ActivationByKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(input=self.fc(x))  # fx records kwargs={'input': ...} and empty args


def test_activation_module_called_with_a_keyword_argument_is_a_site():
    (stats,) = calibrate(trace(ActivationByKeyword().eval()), [torch.randn(6, 3)])

    assert stats.num_neurons == 4 and stats.observations == 6


def test_neuron_axis_follows_permutes_both_ways():
    """ConvNeXt-style: conv (channels-first) -> permute to channels-last -> Linear -> permute back -> activation."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 6, 1)
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            y = self.conv(x).permute(0, 2, 3, 1)
            a = torch.relu(y)  # channels-last after the first permute: neurons on the last axis (6)
            z = self.fc(a).permute(0, 3, 1, 2)
            b = torch.relu(z.transpose(2, 3))  # back to channels-first, then a spatial transpose: axis 1 (5)
            return b

    sites = {s.name: s for s in calibrate(trace(Block().eval()), [torch.randn(2, 3, 4, 4)])}
    assert (sites["relu"].dim, sites["relu"].num_neurons) == (-1, 6)
    assert (sites["relu_1"].dim, sites["relu_1"].num_neurons) == (1, 5)
