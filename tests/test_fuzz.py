"""Differential fuzzing: random small networks, compiled and exported, against the untouched model on FRESH inputs.

Hypothesis draws a network plan: a stem conv, then blocks (conv / BatchNorm /
activation, residual blocks, two-branch concatenations, a conv+activation
module called twice), a pooled head with a hidden layer. Some sites are
*engineered* linear: channels of the layer before an activation get a bias far
into one region (always ON, or dead), so every pass has something to do. The
model is compiled (default settings: back-off on, evidence threshold on),
exported to ONNX and run in ONNX Runtime, and both are compared with the
original model on fresh inputs from the calibration distribution.

The plan also draws what a real user's model and data look like: several
outputs on very different scales (scores near 1, boxes in the thousands) as a
tuple, a list or a dict; a forward that normalises its input in place; and a
calibration set made of a few distinct samples repeated. Every output leaf is
checked on its own scale, and the caller's calibration tensor must be left
bit-identical.

Allowed outcomes: every output matches within the compile's reported
tolerance (plus ONNX Runtime's), or compile/export raises an error a user
could cause (EgpExportError) for a documented reason; ``VerificationError`` is
not one of them: with nothing approximate enabled, the compile must back off
rather than exit 3. Anything else is a crash or a silent wrong output, and
Hypothesis prints the plan and seed that reproduce it.

A second property prunes such networks with a learning rate drawn up to 1e30:
it either stops with an EgpExportError or returns (and writes) a model whose
weights are all finite.
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
from egp_export.analysis.numerics import ORT_CPU_RTOL
from egp_export.errors import EgpExportError, VerificationError
from egp_export.export.onnx import export_onnx
from egp_export.prune import prune

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# About a minute on a shared 2-core machine; FUZZ_EXAMPLES raises it for a longer hunt.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "12"))
SIZE = 6
# Shrinking a failing network takes minutes per step here; the failing plan is printed whole instead.
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
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
        # "pair"/"list"/"dict": a second head whose outputs are ~1000x the first's.
        "outputs": st.sampled_from(["single", "pair", "list", "dict"]),
        "inplace_input": st.booleans(),
        # None: every calibration sample distinct; k: k distinct samples repeated.
        "distinct": st.sampled_from([None, None, 1, 4, 24]),
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
        self.outputs, self.inplace_input = plan["outputs"], plan["inplace_input"]
        self.boxes = nn.Linear(16, 4) if self.outputs != "single" else None

    def forward(self, x):
        if self.inplace_input:
            x.sub_(0.25)  # writes into the caller's tensor, as input normalisation often does
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        hidden = self.head_act(self.hidden(F.adaptive_avg_pool2d(x, 1).flatten(1)))
        scores = self.fc(hidden)
        if self.boxes is None:
            return scores
        boxes = 1000.0 * self.boxes(hidden) + 2000.0
        if self.outputs == "pair":
            return scores, boxes
        if self.outputs == "list":
            return [scores, boxes]
        return {"scores": scores, "boxes": boxes}


def _leaves(output) -> list[tuple[str, torch.Tensor]]:
    """(path, tensor) of every tensor in a nested output, dict keys in insertion order."""
    if isinstance(output, torch.Tensor):
        return [("", output)]
    items = output.items() if isinstance(output, dict) else enumerate(output)
    return [(f"[{key!r}]{path}", leaf) for key, item in items for path, leaf in _leaves(item)]


def _worst_leaf_error(expected, actual) -> tuple[float, str]:
    """The largest per-leaf relative error, each leaf on its own scale: max|a - e| / max|e| (inf when not finite)."""
    worst, where = 0.0, ""
    expected_leaves, actual_leaves = _leaves(expected), [leaf for _, leaf in _leaves(actual)]
    assert len(expected_leaves) == len(actual_leaves), "the compiled model returns a different number of outputs"
    for (path, e), a in zip(expected_leaves, actual_leaves):
        e, a = e.detach().double(), torch.as_tensor(a).detach().double()
        assert e.shape == a.shape, f"output {path} has shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        difference = (a - e).abs().max().item()
        scale = e.abs().max().item()
        error = difference / scale if scale > 0 else (0.0 if difference == 0 else float("inf"))
        if not error == error:  # NaN
            error = float("inf")
        if error >= worst:
            worst, where = error, path or "output"
    return worst, where


def _calibration(plan: dict, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    distinct = plan["distinct"] or CALIBRATION_SAMPLES
    samples = torch.randn(distinct, 2, SIZE, SIZE, generator=generator)
    return samples.repeat(-(-CALIBRATION_SAMPLES // distinct), 1, 1, 1)[:CALIBRATION_SAMPLES].contiguous()


def _ort(path, inputs: torch.Tensor) -> list[torch.Tensor]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: inputs.numpy()})
    return [torch.from_numpy(np.asarray(output)) for output in outputs]


@pytest.mark.slow
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same plans on every run: CI failures reproduce
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(plan=plans)
def test_compiled_and_exported_models_match_the_original_on_fresh_inputs(plan, tmp_path_factory):
    model = FuzzNet(plan).eval()
    data_seed = plan["seed"] + 1
    calibration = _calibration(plan, data_seed)
    untouched = calibration.clone()
    fresh = torch.randn(FRESH_SAMPLES, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(data_seed + 1))

    try:
        result = egp_export.compile(model, calibration)
    except VerificationError as error:
        pytest.fail(f"compile exited 3 instead of backing off: {error} (plan {plan})")
    except EgpExportError:
        assert torch.equal(calibration, untouched), f"a refused compile wrote into the calibration data (plan {plan})"
        return
    assert torch.equal(calibration, untouched), f"compile wrote into the caller's calibration data (plan {plan})"

    rtol = result.report["verification"]["pytorch"]["rtol"]
    with torch.no_grad():
        expected = model(fresh.clone())
        error, where = _worst_leaf_error(expected, result.module(fresh.clone()))
    assert error <= rtol, f"silent wrong output {where} on fresh inputs: {error:.3g} > {rtol} (plan {plan})"
    path = tmp_path_factory.mktemp("fuzz") / "model.onnx"
    try:
        export_onnx(result.module, calibration[:1], path, verify_inputs=[calibration[-16:]], rtol=max(rtol, ORT_CPU_RTOL))
    except VerificationError as error:
        pytest.fail(f"the export of a verified module failed its ONNX Runtime check: {error} (plan {plan})")
    except EgpExportError:
        assert plan["outputs"] == "dict", f"export refused a tensor/tuple/list output (plan {plan})"
        return
    assert torch.equal(calibration, untouched), f"export wrote into the caller's calibration data (plan {plan})"
    exported, where = _worst_leaf_error(expected, _ort(path, fresh.clone()))
    assert exported <= rtol + ORT_CPU_RTOL, f"ONNX output {where} differs on fresh inputs: {exported:.3g} (plan {plan})"


prune_plans = st.fixed_dictionaries(
    {
        "network": plans,
        "method": st.sampled_from(["egp", "nepenthe", "easier"]),
        "lr": st.sampled_from([0.05, 1e3, 1e30]),
    }
)


@pytest.mark.slow
@settings(
    max_examples=max(4, EXAMPLES // 3),
    deadline=None,
    derandomize=True,
    phases=NO_SHRINK,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(plan=prune_plans)
def test_pruning_stops_on_divergence_or_returns_finite_weights(plan, tmp_path_factory):
    network = {**plan["network"], "outputs": "single", "inplace_input": False}
    model = FuzzNet(network).eval()
    generator = torch.Generator().manual_seed(network["seed"])
    inputs = torch.randn(64, 2, SIZE, SIZE, generator=generator)
    targets = torch.randint(0, 3, (64,), generator=generator)
    out = tmp_path_factory.mktemp("prune")
    try:
        result = prune(
            model, (inputs[:48], targets[:48]), (inputs[48:], targets[48:]), plan["method"], iterations=2,
            epochs_per_iteration=1, lr=plan["lr"], batch_size=16, out_dir=out, force=True, progress=False,
        )
    except VerificationError as error:
        pytest.fail(f"pruning raised a verification error: {error} (plan {plan})")
    except EgpExportError:
        pruned = sorted(out.rglob("pruned.pt"))
        assert not pruned, f"a stopped pruning run left {pruned} (plan {plan})"
        return
    state = result.model.state_dict()
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    assert not bad, f"pruning returned non-finite tensors {bad} without an error (plan {plan})"
    for path in out.rglob("*.pt"):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        tensors = saved.values() if isinstance(saved, dict) else []
        for value in tensors:
            if isinstance(value, dict):
                for tensor in value.values():
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                        assert torch.isfinite(tensor).all(), f"{path} holds non-finite weights (plan {plan})"
