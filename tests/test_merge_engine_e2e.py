"""The merge engine on torchvision blocks with engineered linear activations.

- MobileNetV2 inverted residuals whose two ReLU6 are linear collapse to ONE dense
  3x3 conv each (expand 1x1 -> depthwise 3x3 -> project 1x1, exact with a bias
  map), with the residual add folded into it.
- EfficientNetV2 FusedMBConv whose SiLU is linear: 3x3 -> 1x1 merges exactly and
  the residual folds.
- ResNet BasicBlocks whose inner ReLU is linear: 3x3 -> 3x3 is border-approximate,
  refused by default; with approximate=True the plan still refuses it because a
  5x5 kernel costs more (25/18 of the MACs).
Structure, numerics in PyTorch and ONNX Runtime, validity.
"""

from __future__ import annotations

import onnx
import pytest
import torch
import torch.nn as nn
import torchvision

import egp_export
from egp_export.analysis.numerics import NOISE_FACTOR, ORT_CPU_RTOL, compare, fp32_noise
from egp_export.export.onnx import export_onnx
from egp_export.testing import recalibrate_batchnorm
from egp_export.testing import set_parameter as _set


def _convs(module: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in module.modules())


def _check(model, result, shape, tmp_path):
    fresh = torch.randn(4, *shape, generator=torch.Generator().manual_seed(5))
    rtol = max(1e-5, NOISE_FACTOR * fp32_noise(model, [fresh]))
    with torch.no_grad():
        assert compare(model(fresh), result.module(fresh)).max_rel <= rtol
    exported = export_onnx(result.module, fresh[:2], tmp_path / "m.onnx", verify_inputs=fresh, rtol=max(ORT_CPU_RTOL, rtol))
    onnx.checker.check_model(onnx.load(str(exported.path)), full_check=True)
    result.module.graph.lint()


def test_mobilenet_v2_linear_inverted_residuals_collapse_to_one_conv(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10)
    blocks = [2, 3, 4]  # 3 has a residual; 2 and 4 change shape
    for index in blocks:
        for layer in model.features[index].conv:
            if isinstance(layer, torchvision.ops.Conv2dNormActivation):
                _set(layer[1].weight, 0.3)
                _set(layer[1].bias, 3.0)
    shape = (3, 32, 32)
    model = recalibrate_batchnorm(model, shape, seed=1)
    # Random-weight MobileNetV2 is ill-conditioned (own fp32 noise ~5e-5): exact rewrites move it by ~2e-4, above the
    # 1e-4 cap of the noise floor, so the tolerance is stated.
    result = egp_export.compile(model, torch.randn(64, *shape, generator=torch.Generator().manual_seed(2)), 1e-3)

    merges = [r for r in result.report["rewrites"] if r["pass"] == "merge_conv_chains"]
    folded = [r for r in result.report["rewrites"] if r["pass"] == "fold_residuals"]
    # Block 1 has no residual and feeds block 2's chain: its projection joins that merge.
    assert len(merges) == len(blocks)
    assert all("merged into one 3x3 conv (exact" in m["action"] for m in merges)
    assert any("features.3" in f["action"] for f in folded)
    assert _convs(result.module) == _convs(model) - 2 * len(blocks) - 1
    assert result.report["after"]["depth"] < result.report["before"]["depth"]
    _check(model, result, shape, tmp_path)


def test_efficientnet_v2_fused_mbconv_merges_and_folds_its_residual(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_v2_s(num_classes=10)
    block = model.features[2][1]  # FusedMBConv 48 -> 192 (3x3) -> 48 (1x1), stride 1, residual
    _set(block.block[0][1].bias, 30.0)  # SiLU input > 24: identity within 1e-9
    shape = (3, 32, 32)
    model = recalibrate_batchnorm(model, shape, seed=1)
    result = egp_export.compile(model, torch.randn(48, *shape, generator=torch.Generator().manual_seed(2)))
    merges = [r for r in result.report["rewrites"] if r["pass"] == "merge_conv_chains"]
    assert any("features_2_1_block_0_0 -> features_2_1_block_1_0" in m["action"] and "(exact;" in m["action"] for m in merges)
    assert any(r["pass"] == "fold_residuals" and "features.2.1" in r["action"] for r in result.report["rewrites"])
    assert _convs(result.module) == _convs(model) - 1
    _check(model, result, shape, tmp_path)


@pytest.mark.parametrize("approximate", [False, True])
def test_resnet_basic_block_merge_is_refused_with_the_reason(approximate, tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _set(model.layer1[0].bn1.bias, 10.0)  # inner ReLU of the first block always ON
    shape = (3, 32, 32)
    model = recalibrate_batchnorm(model, shape, seed=1)
    result = egp_export.compile(
        model, torch.randn(48, *shape, generator=torch.Generator().manual_seed(2)), approximate=approximate
    )
    assert _convs(result.module) == _convs(model)
    reasons = [r["reason"] for r in result.report["refusals"] if "layer1_0_conv1 -> layer1_0_conv2" in r["reason"]]
    expected = "predicted latency grows" if approximate else "border not exact"
    assert reasons and expected in reasons[0]
    _check(model, result, shape, tmp_path)
