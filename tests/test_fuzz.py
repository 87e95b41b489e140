"""Differential fuzzing: random small networks, compiled and exported, against the untouched model on FRESH inputs.

Hypothesis draws a network plan: a stem conv, then blocks (conv / BatchNorm /
activation, residual blocks, two-branch concatenations, a conv+activation
module called twice), a pooled head with a hidden layer. Some sites are
*engineered* linear: channels of the layer before an activation get a bias far
into one region (always ON, or dead), so every pass has something to do. The
model is compiled (default settings: back-off on, evidence threshold on),
exported to ONNX and run in ONNX Runtime, and both are compared with the
original model on fresh inputs from the calibration distribution.

Allowed outcomes: the outputs match within the compile's reported tolerance
(plus ONNX Runtime's), or compile raises an error a user could cause
(EgpExportError) for a documented reason; ``VerificationError`` is not one of
them: with nothing approximate enabled, the compile must back off rather than
exit 3. Anything else is a crash or a silent wrong output, and Hypothesis
prints the plan and seed that reproduce it.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import egp_export
from egp_export.analysis.numerics import ORT_CPU_RTOL, compare
from egp_export.export.onnx import export_onnx

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# About a minute on a shared 2-core machine; FUZZ_EXAMPLES raises it for a longer hunt.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
SIZE = 6
CALIBRATION_SAMPLES = 96
FRESH_SAMPLES = 64

ACTIVATIONS = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "hardswish": nn.Hardswish,
    "hardtanh": lambda: nn.Hardtanh(-1.0, 1.0),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
# Bias that puts a neuron far into one region of every activation above (ON / OFF, for Hardtanh the flat ends).
FAR = 60.0

block_kinds = st.sampled_from(["conv_bn_act", "conv_act", "residual", "concat", "shared"])
plans = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "channels": st.sampled_from([4, 8]),
        "blocks": st.lists(
            st.tuples(block_kinds, st.sampled_from(sorted(ACTIVATIONS)), st.sampled_from([1, 3]),
                      st.sampled_from(["none", "on", "dead", "mixed"])),
            min_size=1,
            max_size=4,
        ),
        "head_activation": st.sampled_from(sorted(ACTIVATIONS)),
    }
)


def _engineer(bias: torch.Tensor, how: str, generator: torch.Generator) -> None:
    """Push some channels of ``bias`` far into one region: all ON, some dead, or a mix of both."""
    with torch.no_grad():
        if how == "on":
            bias.fill_(FAR)
        elif how == "dead":
            bias[: max(1, len(bias) // 4)] = -FAR
        elif how == "mixed":
            choice = torch.randint(0, 3, bias.shape, generator=generator)
            bias.copy_(torch.where(choice == 0, -FAR, torch.where(choice == 1, FAR, bias)))


class Block(nn.Module):
    """One drawn block; the forward is plain Python over fixed choices, so torch.fx unrolls it."""

    def __init__(self, kind: str, activation: str, kernel: int, engineer: str, channels: int, generator) -> None:
        super().__init__()
        self.kind = kind
        padding = kernel // 2
        self.conv = nn.Conv2d(channels, channels, kernel, padding=padding)
        self.bn = nn.BatchNorm2d(channels) if kind in ("conv_bn_act", "residual") else None
        self.act = ACTIVATIONS[activation]()
        if kind == "concat":
            self.other = nn.Conv2d(channels, channels, kernel, padding=padding)
            self.merge = nn.Conv2d(2 * channels, channels, 1)
        if self.bn is not None:
            with torch.no_grad():
                self.bn.running_mean.normal_(0.0, 0.1, generator=generator)
                self.bn.running_var.uniform_(0.5, 2.0, generator=generator)
                self.bn.weight.uniform_(0.5, 1.5, generator=generator)
            _engineer(self.bn.bias, engineer, generator)
        else:
            _engineer(self.conv.bias, engineer, generator)

    def forward(self, x):
        if self.kind == "concat":
            return self.merge(torch.cat([self.act(self.conv(x)), self.other(x)], 1))
        if self.kind == "shared":
            # The same conv and activation modules at two call sites: statistics are per call site.
            return self.act(self.conv(self.act(self.conv(x))))
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        y = self.act(y)
        return x + y if self.kind == "residual" else y


class FuzzNet(nn.Module):
    def __init__(self, plan: dict) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(plan["seed"])
        torch.manual_seed(plan["seed"])
        channels = plan["channels"]
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.blocks = nn.ModuleList(Block(*spec, channels, generator) for spec in plan["blocks"])
        self.hidden = nn.Linear(channels, 16)
        self.head_act = ACTIVATIONS[plan["head_activation"]]()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.fc(self.head_act(self.hidden(F.adaptive_avg_pool2d(x, 1).flatten(1))))


def _ort(path, inputs: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    return torch.from_numpy(np.asarray(output))


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same plans on every run: CI failures reproduce
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(plan=plans)
def test_compiled_and_exported_models_match_the_original_on_fresh_inputs(plan, tmp_path_factory):
    model = FuzzNet(plan).eval()
    data_seed = plan["seed"] + 1
    calibration = torch.randn(CALIBRATION_SAMPLES, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(data_seed))
    fresh = torch.randn(FRESH_SAMPLES, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(data_seed + 1))

    result = egp_export.compile(model, calibration)

    rtol = result.report["verification"]["pytorch"]["rtol"]
    with torch.no_grad():
        expected = model(fresh)
        error = compare(expected, result.module(fresh))
    assert error.within(rtol), f"silent wrong output on fresh inputs: {error} > {rtol} (plan {plan})"
    path = tmp_path_factory.mktemp("fuzz") / "model.onnx"
    export_onnx(result.module, calibration[:1], path, verify_inputs=[calibration[-16:]], rtol=max(rtol, ORT_CPU_RTOL))
    exported = compare(expected, _ort(path, fresh))
    assert exported.within(rtol + ORT_CPU_RTOL), f"ONNX differs on fresh inputs: {exported} (plan {plan})"
