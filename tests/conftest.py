"""Shared helpers for the analysis and pass tests: tiny models, running one pass, the three checks.

Every pass test asserts structure (module counts, shapes), numerics against the
untouched model on *fresh* random inputs, and validity (``graph.lint()``, ONNX).
The helpers here keep those three checks one line each.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from egp_export.analysis.fx import activation_nodes, propagate_shapes
from egp_export.analysis.numerics import FP32_RTOL, ORT_CPU_RTOL, compare
from egp_export.analysis.ops import named_modules
from egp_export.analysis.plans import plan_site, store_plans
from egp_export.analysis.stats import calibrate
from egp_export.analysis.trace import trace
from egp_export.passes import PassResult, finalize
from egp_export.passes.modules import ChannelAffine
from egp_export.report.messages import describe_refusal, describe_rewrite


@pytest.fixture
def tiny_model_runtime():
    """Seeded RNG and one intra-op thread for the duration of one test.

    Every test draws the same weights and inputs whatever ran before it; the
    models are tiny, so extra threads only add scheduling overhead (20x on a
    loaded 2-core runner). Used by the pass, activation and analysis tests
    only: other suites keep torch's global settings.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield
    torch.set_num_threads(threads)


# Running passes -----------------------------------------------------------


def calibration_batches(shape: tuple[int, ...], batches: int = 2) -> list[torch.Tensor]:
    """Random-normal calibration batches of ``shape`` (batch dim included)."""
    return [torch.randn(shape) for _ in range(batches)]


def prepare(
    model: nn.Module, example: torch.Tensor, *, calibration: list[torch.Tensor] | None = None, tolerance: float = 1e-5
) -> fx.GraphModule:
    """Trace ``model``, propagate shapes and (if ``calibration`` is given) store activation statistics and the plans
    they support at ``tolerance`` (what the compiler's decide stage does, without its filters) on its nodes."""
    gm = trace(model)
    if calibration is not None:
        store_plans(gm, {site.name: plan_site(site, tolerance) for site in calibrate(gm, calibration)})
    propagate_shapes(gm, example[:1])
    return gm


def apply(pass_: Callable[[fx.GraphModule], PassResult], gm: fx.GraphModule, example: torch.Tensor) -> PassResult:
    """Run one pass the way the PassManager does: pass, then DCE + lint + recompile, then shapes."""
    result = pass_(gm)
    assert result.module is gm, "passes rewrite in place"
    finalize(gm)
    propagate_shapes(gm, example[:1])
    return result


def reasons(result: PassResult) -> list[str]:
    """The report's sentences for a pass's refusals (what a person reads; counts use the codes)."""
    return [describe_refusal(refusal) for refusal in result.refusals]


def actions(result: PassResult) -> list[str]:
    """The report's sentences for a pass's rewrites."""
    return [describe_rewrite(rewrite) for rewrite in result.rewrites]


# The three checks -----------------------------------------------------------


def assert_same_function(reference: nn.Module, candidate: nn.Module, fresh: torch.Tensor, rtol: float = FP32_RTOL) -> None:
    """``candidate`` computes ``reference``'s function on ``fresh`` inputs (never the calibration ones)."""
    with torch.no_grad():
        error = compare(reference(fresh), candidate(fresh))
    assert error.max_rel <= rtol, f"max_rel={error.max_rel:.3g} (max_abs={error.max_abs:.3g}) > {rtol:g}"


def assert_onnx_valid(gm: fx.GraphModule, example: torch.Tensor) -> onnx.ModelProto:
    """Lint, export with the TorchScript exporter into memory, check the model and run it in ORT."""
    gm.graph.lint()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter: cheap and enough here
        torch.onnx.export(gm, (example,), buffer, dynamo=False, input_names=["input"])
    model = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(model, full_check=True)
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        error = compare(gm(example), np.asarray(output))
    assert error.max_rel <= ORT_CPU_RTOL, error
    return model


# Structure ------------------------------------------------------------------


def modules_of_type(gm: fx.GraphModule, *types: type) -> list[nn.Module]:
    """Submodules of ``types`` that the graph actually calls."""
    modules = named_modules(gm)
    return [modules[str(n.target)] for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[str(n.target)], types)]


def count_calls(gm: fx.GraphModule, *types: type) -> int:
    return len(modules_of_type(gm, *types))


def affines(gm: fx.GraphModule) -> list[ChannelAffine]:
    return modules_of_type(gm, ChannelAffine)


def activation_count(gm: fx.GraphModule) -> int:
    return len(activation_nodes(gm))


def zero_channels(layer: nn.Module, channels: list[int]) -> None:
    """What unstructured pruning leaves behind: whole filters (and their biases) at zero."""
    with torch.no_grad():
        layer.weight[channels] = 0
        if layer.bias is not None:
            layer.bias[channels] = 0


def engineer(layer: nn.Module, bias: list[float] | torch.Tensor, weight_scale: float = 0.01) -> None:
    """Shrink ``layer``'s weights and set its bias so each output channel sits at a chosen pre-activation.

    With ``weight_scale=0.01`` and unit-normal inputs the pre-activation stays
    within about ±1 of the bias, so biases ±50 are far inside one region for
    every input a test draws.
    """
    with torch.no_grad():
        layer.weight.mul_(weight_scale / layer.weight.abs().max())
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype))


def randomize_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)


class Slot(nn.Module):
    """Wraps a callable so a test model can hold a functional activation (``F.relu``, ``x.relu()``)."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def install_affine(gm: fx.GraphModule, target: str, scale, shift, dim: int, example: torch.Tensor) -> None:
    """Replace the ``nn.Identity`` at ``target`` by a ChannelAffine (what BN folding / linearization leave)."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    shift = torch.as_tensor(shift, dtype=torch.float32)
    gm.add_submodule(target, ChannelAffine(scale, shift, dim))
    gm.recompile()
    propagate_shapes(gm, example[:1])


# Activation forms -------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """One way of writing an activation, and what the registry must say about it."""

    id: str
    make: Callable[[int], nn.Module | Callable]  # channels -> module or function of x
    kind: str
    inplace: bool
    boundaries: tuple[float, ...]
    reference: Callable[[torch.Tensor], torch.Tensor]  # the activation, for checking spec.fn

    def build(self, channels: int) -> nn.Module:
        made = self.make(channels)
        return made if isinstance(made, nn.Module) else Slot(made)


def _prelu_with_slopes(channels: int, count: int) -> nn.PReLU:
    prelu = nn.PReLU(count)
    with torch.no_grad():
        prelu.weight.copy_(torch.linspace(0.1, 0.4, count))
    return prelu


FORMS: list[Form] = [
    Form("nn.ReLU", lambda c: nn.ReLU(), "relu", False, (0.0,), F.relu),
    Form("nn.ReLU(inplace)", lambda c: nn.ReLU(inplace=True), "relu", True, (0.0,), F.relu),
    Form("F.relu", lambda c: F.relu, "relu", False, (0.0,), F.relu),
    Form("F.relu(inplace)", lambda c: (lambda x: F.relu(x, inplace=True)), "relu", True, (0.0,), F.relu),
    Form("F.relu_", lambda c: F.relu_, "relu", True, (0.0,), F.relu),
    Form("torch.relu", lambda c: torch.relu, "relu", False, (0.0,), F.relu),
    Form("torch.relu_", lambda c: torch.relu_, "relu", True, (0.0,), F.relu),
    Form("x.relu()", lambda c: (lambda x: x.relu()), "relu", False, (0.0,), F.relu),
    Form("x.relu_()", lambda c: (lambda x: x.relu_()), "relu", True, (0.0,), F.relu),
    Form("nn.ReLU6", lambda c: nn.ReLU6(), "relu6", False, (0.0, 6.0), F.relu6),
    Form("F.relu6", lambda c: F.relu6, "relu6", False, (0.0, 6.0), F.relu6),
    Form("nn.Hardtanh", lambda c: nn.Hardtanh(-2.0, 3.0), "hardtanh", False, (-2.0, 3.0), lambda z: F.hardtanh(z, -2.0, 3.0)),
    Form(
        "F.hardtanh", lambda c: (lambda x: F.hardtanh(x, -2.0, 3.0)), "hardtanh", False, (-2.0, 3.0),
        lambda z: F.hardtanh(z, -2.0, 3.0),
    ),
    Form("nn.LeakyReLU", lambda c: nn.LeakyReLU(0.2), "leaky_relu", False, (0.0,), lambda z: F.leaky_relu(z, 0.2)),
    Form(
        "F.leaky_relu", lambda c: (lambda x: F.leaky_relu(x, 0.2)), "leaky_relu", False, (0.0,),
        lambda z: F.leaky_relu(z, 0.2),
    ),
    Form("nn.PReLU(1)", lambda c: _prelu_with_slopes(c, 1), "prelu", False, (0.0,), lambda z: F.prelu(z, torch.tensor([0.1]))),
    Form(
        "nn.PReLU(C)", lambda c: _prelu_with_slopes(c, c), "prelu", False, (0.0,),
        lambda z: F.prelu(z, torch.linspace(0.1, 0.4, z.shape[1])),
    ),
    Form("nn.Hardswish", lambda c: nn.Hardswish(), "hardswish", False, (-3.0, 3.0), F.hardswish),
    Form("F.hardswish", lambda c: F.hardswish, "hardswish", False, (-3.0, 3.0), F.hardswish),
    Form("nn.Hardsigmoid", lambda c: nn.Hardsigmoid(), "hardsigmoid", False, (-3.0, 3.0), F.hardsigmoid),
    Form("F.hardsigmoid", lambda c: F.hardsigmoid, "hardsigmoid", False, (-3.0, 3.0), F.hardsigmoid),
    Form("nn.GELU", lambda c: nn.GELU(), "gelu", False, (), F.gelu),
    Form("nn.GELU(tanh)", lambda c: nn.GELU("tanh"), "gelu", False, (), lambda z: F.gelu(z, approximate="tanh")),
    Form("F.gelu", lambda c: F.gelu, "gelu", False, (), F.gelu),
    Form("nn.SiLU", lambda c: nn.SiLU(), "silu", False, (), F.silu),
    Form("F.silu", lambda c: F.silu, "silu", False, (), F.silu),
]
FORM_IDS = [form.id for form in FORMS]


# Layer variants -----------------------------------------------------------------

IN_CHANNELS = 4
OUT_CHANNELS = 8


@dataclass(frozen=True)
class ConvVariant:
    """One conv configuration; every variant maps IN_CHANNELS to OUT_CHANNELS channels."""

    id: str
    cls: type
    kwargs: dict

    def make(self, in_channels: int = IN_CHANNELS, out_channels: int = OUT_CHANNELS) -> nn.Module:
        return self.cls(in_channels, out_channels, **self.kwargs)

    def input(self, batch: int = 4, channels: int = IN_CHANNELS) -> torch.Tensor:
        spatial = (9,) if self.cls is nn.Conv1d else (7, 7)
        return torch.randn(batch, channels, *spatial)

    @property
    def batchnorm(self) -> type:
        return nn.BatchNorm1d if self.cls is nn.Conv1d else nn.BatchNorm2d

    @property
    def padded(self) -> bool:
        padding = self.kwargs.get("padding", 0)
        return padding == "same" or (padding != "valid" and padding != 0)


CONV_VARIANTS: list[ConvVariant] = [
    ConvVariant("conv2d", nn.Conv2d, {"kernel_size": 3}),
    ConvVariant("conv2d-nobias", nn.Conv2d, {"kernel_size": 3, "bias": False}),
    ConvVariant("conv2d-groups2", nn.Conv2d, {"kernel_size": 3, "groups": 2}),
    ConvVariant("conv2d-depthwise", nn.Conv2d, {"kernel_size": 3, "groups": IN_CHANNELS}),
    ConvVariant("conv2d-stride2-pad1", nn.Conv2d, {"kernel_size": 3, "stride": 2, "padding": 1}),
    ConvVariant("conv2d-dilation2-pad2", nn.Conv2d, {"kernel_size": 3, "dilation": 2, "padding": 2}),
    ConvVariant("conv2d-same", nn.Conv2d, {"kernel_size": 3, "padding": "same"}),
    ConvVariant("conv2d-reflect", nn.Conv2d, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"}),
    ConvVariant("conv2d-1x1", nn.Conv2d, {"kernel_size": 1}),
    ConvVariant("conv1d", nn.Conv1d, {"kernel_size": 3}),
    ConvVariant("conv1d-nobias-groups2", nn.Conv1d, {"kernel_size": 3, "groups": 2, "bias": False}),
    ConvVariant("conv1d-stride2-dilation2-pad1", nn.Conv1d, {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 1}),
]
CONV_IDS = [v.id for v in CONV_VARIANTS]
