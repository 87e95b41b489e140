"""bind_functional_layers: F.conv2d / F.linear / F.batch_norm with constant parameters become foldable modules."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.ops import is_batch_norm, named_modules
from egp_export.passes import BindFunctionalLayers, FoldBatchNorm, FoldResiduals, PassManager, default_steps
from egp_export.records import RewriteKind
from tests.conftest import apply, assert_onnx_valid, assert_same_function, calibration_batches, count_calls, prepare


class StdConvBnAct(nn.Module):
    """timm's StdConv2d + BatchNormAct2d, as they trace: functional calls on parameters (weight standardised)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.bias = nn.Parameter(torch.randn(8))
        self.bn_weight = nn.Parameter(torch.rand(8) + 0.5)
        self.bn_bias = nn.Parameter(torch.randn(8))
        self.register_buffer("running_mean", torch.randn(8))
        self.register_buffer("running_var", torch.rand(8) + 0.5)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, 8, -1), None, None, training=True, momentum=0.0, eps=1e-6)
        x = F.conv2d(x, weight.reshape_as(self.weight), self.bias, 1, 1)
        x = F.batch_norm(x, self.running_mean, self.running_var, self.bn_weight, self.bn_bias, False, 0.1, 1e-5)
        return self.head(torch.relu(x))


def test_functional_conv_and_batchnorm_become_modules_and_the_batchnorm_folds():
    model = StdConvBnAct().eval()
    example = torch.randn(2, 3, 8, 8)
    gm = prepare(model, example)

    bound = apply(BindFunctionalLayers(), gm, example)
    assert [r.kind for r in bound.rewrites] == [RewriteKind.FUNCTIONAL_LAYER_BOUND] * 2
    assert count_calls(gm, nn.Conv2d) == 2 and count_calls(gm, nn.BatchNorm2d) == 1
    assert_same_function(model, gm, torch.randn(4, 3, 8, 8))

    folded = apply(FoldBatchNorm(), gm, example)
    assert [r.kind for r in folded.rewrites] == [RewriteKind.BN_FOLDED]
    modules = named_modules(gm)
    assert not any(is_batch_norm(n, modules) for n in gm.graph.nodes)
    assert_same_function(model, gm, torch.randn(4, 3, 8, 8))
    assert_onnx_valid(gm, torch.randn(2, 3, 8, 8))


def test_functional_batchnorm_in_training_mode_stays_functional():
    class TrainingBn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return F.batch_norm(self.conv(x), None, None, training=True)

    model = TrainingBn().eval()
    example = torch.randn(2, 3, 4, 4)
    gm = prepare(model, example)
    result = apply(BindFunctionalLayers(), gm, example)
    assert not result.modified


def test_layer_whose_weight_depends_on_the_input_is_left_alone():
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.weight * x.mean())

    model = Dynamic().eval()
    example = torch.randn(4, 4)
    gm = prepare(model, example)
    result = apply(BindFunctionalLayers(), gm, example)
    assert not result.modified
    assert_same_function(model, gm, torch.randn(4, 4))


def test_a_tied_functional_weight_is_copied_so_folding_one_use_leaves_the_other():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 6))
            self.bn = nn.BatchNorm1d(6).eval()
            with torch.no_grad():
                self.bn.running_mean.normal_()
                self.bn.weight.uniform_(0.5, 2.0)

        def forward(self, x):
            return self.bn(F.linear(x, self.weight)) + F.linear(x, self.weight)

    model = Tied().eval()
    example = torch.randn(4, 6)
    gm = prepare(model, example)
    PassManager([BindFunctionalLayers(), FoldBatchNorm()], example_input=example[:1]).run(gm)
    assert count_calls(gm, nn.BatchNorm1d) == 0
    linears = [m for m in gm.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 and not torch.equal(linears[0].weight, linears[1].weight)  # one folded, one as it was
    assert_same_function(model, gm, torch.randn(5, 6))


def test_a_method_add_residual_folds():
    class MethodResidual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 3, padding=1)

        def forward(self, x):
            return x.add(self.conv(x))

    model = MethodResidual().eval()
    example = torch.randn(2, 6, 5, 5)
    gm = prepare(model, example)
    result = apply(FoldResiduals(), gm, example)
    assert [r.kind for r in result.rewrites] == [RewriteKind.RESIDUAL_FOLDED]
    assert [n for n in gm.graph.nodes if n.op == "call_method"] == []
    assert_same_function(model, gm, torch.randn(3, 6, 5, 5))
    assert_onnx_valid(gm, torch.randn(2, 6, 5, 5))


def test_the_default_pipeline_compiles_a_functional_network_to_plain_convs():
    model = StdConvBnAct().eval()
    calibration = calibration_batches((8, 3, 8, 8))
    gm = prepare(model, calibration[0], calibration=calibration)
    PassManager(default_steps(), example_input=calibration[0][:1]).run(gm)
    modules = named_modules(gm)
    assert not any(is_batch_norm(n, modules) for n in gm.graph.nodes)
    assert_same_function(model, gm, torch.randn(4, 3, 8, 8))


def test_torch_batch_norm_binds_by_its_own_operand_order_and_folds():
    """torch.batch_norm(input, weight, bias, running_mean, running_var, ...): not F.batch_norm's order."""

    class TorchSpelling(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.rand(8) + 0.5)
            self.beta = nn.Parameter(torch.randn(8) - 3.0)  # negative: taken for the variance it gives NaN
            self.register_buffer("mean", torch.randn(8))
            self.register_buffer("var", torch.rand(8) + 0.5)

        def forward(self, x):
            x = torch.batch_norm(self.conv(x), self.gamma, self.beta, self.mean, self.var, False, 0.1, 1e-5, False)
            return torch.ops.aten.batch_norm.default(
                x, weight=self.gamma, bias=None, running_mean=self.mean, running_var=self.var,
                training=False, momentum=0.1, eps=1e-3, cudnn_enabled=False,
            )

    model = TorchSpelling().eval()
    example = torch.randn(2, 3, 8, 8)
    gm = prepare(model, example)
    PassManager([BindFunctionalLayers(), FoldBatchNorm()], example_input=example[:1]).run(gm)
    modules = named_modules(gm)
    assert not any(is_batch_norm(n, modules) for n in gm.graph.nodes)
    assert_same_function(model, gm, torch.randn(4, 3, 8, 8))


def test_a_withheld_functional_layer_stays_functional():
    """The compiler's exact back-off withholds every node as its last resort: the functional batch norm stays too."""
    model = StdConvBnAct().eval()
    example = torch.randn(2, 3, 8, 8)
    gm = prepare(model, example)
    batch_norms = [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target is F.batch_norm]
    bn = batch_norms[-1]  # the one on the activations (the first standardises the weight)
    result = PassManager([BindFunctionalLayers()], example_input=example[:1], withheld=frozenset({bn})).run(gm)
    assert [r.nodes for r in result.rewrites if r.nodes == (bn,)] == [] and len(result.rewrites) == 1  # the conv bound
    assert count_calls(gm, nn.BatchNorm2d) == 0 and count_calls(gm, nn.Conv2d) == 2
    assert_same_function(model, gm, torch.randn(4, 3, 8, 8))
