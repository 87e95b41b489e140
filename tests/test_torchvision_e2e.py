"""End to end over real torchvision architectures with activations engineered to be linear.

Each case takes a torchvision model, sets some BatchNorm / Linear biases far
into one region of the activation that follows (so that site is linear on any
input), recalibrates every BatchNorm's running statistics on random data (so
the network is well scaled, as a trained one would be), and compiles it. The
test asserts that exactly the engineered sites are linearized, that the
compiled module matches the original in PyTorch and in ONNX Runtime on fresh
inputs, and that the ONNX file loses the expected activation (and, where a
Linear∘Linear merge happens, MatMul/Gemm) ops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx
import pytest
import torch
import torch.nn as nn
import torchvision
from torchvision.models import VisionTransformer
from torchvision.models.swin_transformer import SwinTransformer

import egp_export
from egp_export.analysis.numerics import NOISE_FACTOR, ORT_CPU_RTOL, compare, fp32_noise
from egp_export.analysis.summary import summarize
from egp_export.export.onnx import count_ops, export_onnx, ort_session, run_onnx
from egp_export.testing import recalibrate_batchnorm
from egp_export.testing import set_parameter as _set

# One ONNX op per activation call, whichever exporter wrote the file.
ACTIVATION_OPS = ("Relu", "Clip", "HardSwish", "HardSigmoid", "Gelu", "Sigmoid", "LeakyRelu", "PRelu", "Erf")
LAYER_OPS = ("Conv", "Gemm", "MatMul")






@dataclass
class Case:
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    engineer: Callable[[nn.Module], None]
    linear_sites: set[str]
    merges: int = 0  # layer merges (Linear∘Linear, conv chains) the engineering alone causes
    calibration: int = 96
    marks: list = field(default_factory=list)
    # Stated where the model is ill-conditioned: exact rewrites then move it by more than the capped noise floor (1e-4).
    tolerance: float = 1e-5


def _resnet18(m):
    _set(m.layer1[0].bn1.bias, 10.0)  # ReLU always ON: identity
    bias = torch.full((128,), 10.0)
    bias[:64] = -10.0  # half the channels always OFF: dead, removed
    _set(m.layer2[0].bn1.bias, bias)


def _mobilenet_v2(m):
    for bn in (m.features[2].conv[0][1], m.features[2].conv[1][1]):
        _set(bn.weight, 0.3)
        _set(bn.bias, 3.0)  # ReLU6 input in (0, 6): identity


def _mobilenet_v3_small(m):
    _set(m.features[0][1].bias, 30.0)  # Hardswish input > 3: identity


def _efficientnet_b0(m):
    _set(m.features[0][1].bias, 30.0)  # SiLU(z) = z within 1e-11 for z > 24


def _vit(m):
    _set(m.encoder.layers[0].mlp[0].bias, 30.0)  # GELU identity: fc2∘fc1 merge
    # torchvision zero-initialises the head: outputs would all be 0 and every comparison trivially exact.
    nn.init.normal_(m.heads.head.weight, std=0.5)


def _swin(m):
    _set(m.features[1][0].mlp[0].bias, 30.0)


def _convnext(m):
    _set(m.features[1][0].block[3].bias, 30.0)


CASES = {
    "resnet18": Case(
        lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32), _resnet18, {"layer1_0_relu", "layer2_0_relu"}
    ),
    "mobilenet_v2": Case(
        lambda: torchvision.models.mobilenet_v2(num_classes=10),
        (3, 32, 32),
        _mobilenet_v2,
        {"features_2_conv_0_2", "features_2_conv_1_2"},
        merges=1,  # features.1's projection + features.2's expand, depthwise and projection: one 3x3 conv
        # Random-weight MobileNetV2's own fp32 noise is ~5e-5 (vs fp64); BN folding alone moves it by ~2e-4.
        tolerance=1e-3,
    ),
    "mobilenet_v3_small": Case(
        lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
        (3, 32, 32),
        _mobilenet_v3_small,
        {"features_0_2"},
        merges=1,  # features.1 ends in a 1x1 projection that feeds features.2's 1x1 expansion: a linear chain
        calibration=256,  # squeeze-excitation sites see one value per sample: some are linear on random data
    ),
    "efficientnet_b0": Case(
        lambda: torchvision.models.efficientnet_b0(num_classes=10), (3, 32, 32), _efficientnet_b0, {"features_0_2"}
    ),
    "vit": Case(
        lambda: VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
        ),
        (3, 32, 32),
        _vit,
        {"encoder_layers_encoder_layer_0_mlp_1"},
        merges=1,
    ),
    "swin": Case(
        lambda: SwinTransformer(
            patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4], num_classes=10
        ),
        (3, 32, 32),
        _swin,
        {"features_1_0_mlp_1"},
        merges=1,
    ),
    "convnext_tiny": Case(
        lambda: torchvision.models.convnext_tiny(num_classes=10),
        (3, 32, 32),
        _convnext,
        {"features_1_0_block_4"},
        merges=1,
        marks=[pytest.mark.slow],
    ),
}


def assert_single_region(model: nn.Module, row: dict, calibration: torch.Tensor) -> None:
    """Every neuron's input stayed between two neighbouring boundaries of the activation (hooked, not traced)."""
    assert row["form"] == "module", f"cannot hook {row['name']} independently"
    module = model.get_submodule(row["target"])
    boundaries = {"relu": (0.0,), "relu6": (0.0, 6.0), "hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0)}
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(calibration)
    handle.remove()
    z = torch.cat(seen).movedim(row["neuron_dim"], -1).reshape(-1, row["neurons"])
    region = torch.bucketize(z, torch.tensor(boundaries[row["activation"]]))
    assert bool((region == region[0]).all()), f"{row['name']} is not linear on the calibration data"


def _ops(model_path) -> dict[str, int]:
    return count_ops(onnx.load(str(model_path)))


def _total(ops: dict[str, int], names) -> int:
    return sum(ops.get(name, 0) for name in names)


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_engineered_sites_are_linearized_and_outputs_match(name, tmp_path):
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build()
    case.engineer(model)
    model = recalibrate_batchnorm(model, case.shape, seed=1)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    calibration = torch.randn(case.calibration, *case.shape, generator=torch.Generator().manual_seed(2))

    result = egp_export.compile(model, calibration, case.tolerance)

    # The user's model is untouched.
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    # The engineered sites became affine; any other site that did is checked
    # independently (module hooks on the original model) to be linear on the data.
    rows = {row["name"]: row for row in result.report["analysis"]["sites"]}
    linearized = {name for name, row in rows.items() if "-> affine" in row["action"]}
    assert case.linear_sites <= linearized
    for name in linearized - case.linear_sites:
        assert_single_region(model, rows[name], calibration[: result.report["calibration"]["samples"]])
    assert result.report["activations_linearized"] == len(linearized)
    before, after = result.report["before"], result.report["after"]
    assert after["activations"] == before["activations"] - len(linearized)
    # Engineered merges happen; sites that are linear on the data anyway may merge more (checked above).
    merges = [r for r in result.report["rewrites"] if r["pass"] in ("merge_linear_chains", "merge_conv_chains")]
    assert len(merges) >= case.merges
    removed_layers = before["layers"] - after["layers"]
    assert removed_layers >= len(merges)
    assert after["depth"] <= before["depth"] - (1 if case.merges else 0)
    result.module.graph.lint()

    # Numerics on fresh inputs against the untouched model (PyTorch).
    fresh = torch.randn(8, *case.shape, generator=torch.Generator().manual_seed(3))
    noise = fp32_noise(model, [fresh])
    rtol = max(1e-5, NOISE_FACTOR * noise)
    with torch.no_grad():
        error = compare(model(fresh), result.module(fresh))
    assert error.max_rel <= rtol, error

    # ONNX: the compiled file is valid, matches ONNX Runtime, and has fewer activation/layer ops.
    ort_rtol = max(ORT_CPU_RTOL, rtol)
    original_onnx = export_onnx(model, fresh[:2], tmp_path / "original.onnx", verify_inputs=fresh, rtol=ort_rtol)
    compiled_onnx = export_onnx(result.module, fresh[:2], tmp_path / "compiled.onnx", verify_inputs=fresh, rtol=ort_rtol)
    onnx.checker.check_model(onnx.load(str(compiled_onnx.path)), full_check=True)
    session = ort_session(compiled_onnx.path)
    with torch.no_grad():
        ort_error = compare(model(fresh), run_onnx(session, fresh)[0])
    assert ort_error.max_rel <= 2 * ort_rtol, ort_error
    ops_before, ops_after = _ops(original_onnx.path), _ops(compiled_onnx.path)
    assert _total(ops_after, ACTIVATION_OPS) == _total(ops_before, ACTIVATION_OPS) - len(linearized)
    assert _total(ops_after, LAYER_OPS) == _total(ops_before, LAYER_OPS) - removed_layers


def test_network_without_linear_sites_keeps_every_activation():
    """Nothing engineered: same activations, same layers, outputs equal to fp32 rounding."""
    torch.manual_seed(0)
    model = recalibrate_batchnorm(torchvision.models.resnet18(num_classes=10), (3, 32, 32), seed=1)
    calibration = torch.randn(96, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    result = egp_export.compile(model, calibration)
    assert result.report["activations_linearized"] == 0
    assert result.report["after"]["activations"] == result.report["before"]["activations"]
    assert result.report["after"]["layers"] == result.report["before"]["layers"]
    fresh = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert compare(model(fresh), result.module(fresh)).max_rel <= 1e-5


def test_compiled_summary_matches_report():
    """The report's 'after' numbers are those of the module it returns."""
    torch.manual_seed(0)
    model = CASES["vit"].build()
    _vit(model)
    model.eval()
    result = egp_export.compile(model, torch.randn(32, 3, 32, 32))
    from egp_export.analysis.fx import propagate_shapes

    propagate_shapes(result.module, torch.randn(1, 3, 32, 32))
    assert summarize(result.module) == result.report["after"]
