"""The command line, run as a user runs it: a real ``python -m egp_export`` subprocess.

Every failure a user can cause must exit non-zero with one clear
``egp-export: error:`` line naming the problem, print no traceback, and leave
existing files untouched. Each subprocess imports torch (seconds), so the
failure cases run concurrently, the compile options run in-process through
``cli.main``, and the models, checkpoints and data files are made once per
module.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import egp_export
from egp_export.cli import main as cli
from egp_export.cli.main import COMPILE_FILES, DEPTH_PLOT, PADDING_PLAN
from egp_export.errors import CalibrationError, CheckpointError
from egp_export.passes import CHANNEL_ALIGNMENT
from egp_export.report.report import ANALYZE_OUTPUTS

SUBPROCESS_TIMEOUT_S = 300
PARALLEL_RUNS = 4
CALIBRATION_LIMIT = 600  # digits used by the compile runs: enough to calibrate, quick to export
DEMO_SUMMARY_KEYS = (
    "accuracy_dense", "accuracy_pruned", "accuracy_compiled", "sparsity", "activations_linearized",
    "depth_before", "depth_after", "latency_ratio",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# A user's model package, importable through PYTHONPATH as --arch cli_models:...
MODELS_SOURCE = textwrap.dedent(
    """
    import logging
    import sys

    import torch
    from torch import nn


    class SmallCNN(nn.Module):
        def __init__(self, channels: int = 4) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(channels)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(channels, 8, 1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)
            with torch.no_grad():
                self.conv1.bias[0] = -100.0  # channel 0 never fires: a dead channel to remove

        def forward(self, x):
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.conv2(x))
            return self.fc(self.pool(x).flatten(1))


    class TokenNet(nn.Module):
        # Token ids -> embedding -> Linear -> ReLU that never switches off -> mean over tokens -> Linear.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8)
            self.fc = nn.Linear(8, 8)
            self.relu = nn.ReLU()
            self.head = nn.Linear(8, 3)
            with torch.no_grad():
                self.fc.bias.fill_(50.0)

        def forward(self, ids):
            return self.head(self.relu(self.fc(self.embed(ids))).mean(1))


    class Branchy(SmallCNN):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return super().forward(x)
            return super().forward(-x)


    class LinearPair(nn.Module):
        # 3x3 conv -> ReLU that never switches off -> padded 3x3 conv: a chain exact only away from the border.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.relu2 = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(8, 10)
            with torch.no_grad():  # inputs in [0, 1], weights >= 0, bias > 0: relu1 is always on
                self.conv1.weight.abs_()
                self.conv1.bias.fill_(0.1)

        def forward(self, x):
            return self.fc(self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x))))).flatten(1))


    class Narrow(nn.Module):
        # ... -> 1x1 conv to 2 channels -> ReLU that never switches off -> 3x3 conv back to 16 channels: the
        # 1x1 -> 3x3 chain merges exactly, into a 16 -> 16 3x3 conv that costs more than the pair.
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 16, 3, padding=1)
            self.relu = nn.ReLU()
            self.reduce = nn.Conv2d(16, 2, 1)
            self.relu_reduce = nn.ReLU()
            self.expand = nn.Conv2d(2, 16, 3, padding=1)
            self.relu_expand = nn.ReLU()
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(16, 10)
            with torch.no_grad():  # reduce reads a ReLU's output (>= 0): relu_reduce is always on
                self.reduce.weight.abs_()
                self.reduce.bias.fill_(0.1)

        def forward(self, x):
            x = self.relu_reduce(self.reduce(self.relu(self.conv(x))))
            return self.fc(self.pool(self.relu_expand(self.expand(x))).flatten(1))


    def _exporting(x) -> bool:
        # TorchScript traces real tensors; torch.export runs on fake ones or under dynamo.
        return torch.jit.is_tracing() or torch.compiler.is_compiling() or type(x) is not torch.Tensor


    @torch.fx.wrap  # torch.fx records the call without looking inside: compile runs it eagerly
    def eager_only(x):
        if _exporting(x):
            logging.getLogger("torch._guards").error("Error while creating guard: (what dynamo logs, ~150 lines)")
            print("Traceback (most recent call last): (printed by the exporter)", file=sys.stderr)
            raise RuntimeError("this function cannot be exported")
        return x


    class ExportHostile(SmallCNN):
        # Compiles (eagerly) and fails in both exporters, noisily, like a dynamo failure on ConvNeXt.
        def forward(self, x):
            return eager_only(super().forward(x))


    @torch.fx.wrap
    def flatten_batch(x):
        return x.reshape(int(x.shape[0]), -1)  # int(): the batch size becomes a constant when traced


    class BatchBound(SmallCNN):
        # Exports only with a static batch: dynamo fixes the batch, TorchScript bakes it into the graph.
        def forward(self, x):
            return flatten_batch(super().forward(x))
    """
)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class Workspace:
    root: Path
    env: dict[str, str]
    checkpoint: Path  # a training wrapper with DataParallel prefixes
    files: dict[str, Path]

    def run(self, *args: str | os.PathLike) -> Run:
        completed = subprocess.run(
            [sys.executable, "-m", "egp_export", *map(str, args)],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
        return Run(completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("cli")
    models = root / "models"
    models.mkdir()
    (models / "cli_models.py").write_text(MODELS_SOURCE)
    sys.path.insert(0, str(models))
    try:
        import cli_models  # exists only while its folder is on sys.path

        model = cli_models.SmallCNN()
        files = _write_inputs(root, model)
    finally:
        sys.path.remove(str(models))
        sys.modules.pop("cli_models", None)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(models), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # tiny models: extra threads only contend with the concurrent runs
    return Workspace(root=root, env=env, checkpoint=files.pop("checkpoint"), files=files)


def _write_inputs(root: Path, model: torch.nn.Module) -> dict[str, Path]:
    state = model.state_dict()
    files = {name: root / name for name in ("checkpoint.pt", "corrupt.pt", "renamed.pt", "module.pt")}
    # What a DataParallel training script saves: a wrapper with metadata and module. prefixes.
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, files["checkpoint.pt"])
    files["corrupt.pt"].write_bytes(files["checkpoint.pt"].read_bytes()[:200])  # a truncated download
    renamed = {k.replace("conv2.", "pointwise."): v for k, v in state.items()}
    torch.save(renamed, files["renamed.pt"])
    torch.save(model, files["module.pt"])  # a pickled nn.Module, not a state dict
    digits = np.random.default_rng(0).random((64, 1, 8, 8), dtype=np.float32)
    with_nan = digits.copy()
    with_nan[5, 0, 3, 3] = np.nan
    arrays = {
        "nan.npy": with_nan,
        "empty.npy": np.zeros((0, 1, 8, 8), np.float32),
        "rgb.npy": np.random.default_rng(0).random((64, 3, 8, 8), dtype=np.float32),
    }
    for name, array in arrays.items():
        np.save(root / name, array)
        files[name] = root / name
    files["checkpoint"] = files.pop("checkpoint.pt")
    return files


def _model_args(workspace: Workspace, checkpoint: Path | None = None, calibration: str = "builtin:digits") -> list[str]:
    args = ["--arch", "cli_models:SmallCNN", "--calibration", calibration, "--calibration-limit", str(CALIBRATION_LIMIT)]
    return args + ["--checkpoint", str(checkpoint or workspace.checkpoint)]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes."""
    files = sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []
    return {str(path.relative_to(folder)): path.read_bytes() for path in files}


def _assert_clean_failure(run: Run, *fragments: str, exit_code: int = 2) -> None:
    assert run.returncode == exit_code, run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("egp-export: error: ")]
    assert errors, run.stderr
    for fragment in fragments:
        assert fragment in run.stderr, f"{fragment!r} not in {run.stderr!r}"


# Success ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo(workspace):
    out = workspace.root / "demo"
    run = workspace.run("demo", "--out", out, "--quick", "--seed", 0)
    assert run.returncode == 0, run.stderr
    return run, out


def test_demo_writes_summary_and_all_outputs(demo):
    run, out = demo
    summary = json.loads((out / "summary.json").read_text())

    for name in (*COMPILE_FILES, "pruned.onnx", "dense.pt", "summary.json", "prune/pruned.pt", "prune/metrics.jsonl"):
        assert (out / name).is_file(), name
    for key in DEMO_SUMMARY_KEYS:
        assert key in summary, key
    assert summary["quick"] is True
    # The compile is exact: ONNX Runtime's predictions on the test split are the pruned model's, to the sample.
    assert summary["accuracy_compiled"] == summary["accuracy_pruned"]
    assert summary["activations_linearized"] >= 1
    assert summary["depth_after"] < summary["depth_before"]
    assert summary["latency_ratio"] > 0  # measured; too noisy on shared runners to assert a speedup
    assert "test accuracy: dense" in run.stdout
    assert "latency (ONNX Runtime CPU, batch 1, median)" in run.stdout
    assert "epoch/s" not in run.stderr  # no progress bars where nobody watches (stderr is not a terminal)
    assert "Traceback" not in run.stderr


def test_demo_report_holds_the_onnx_export(demo):
    _, out = demo
    report = json.loads((out / "report.json").read_text())

    assert report["onnx"]["path"] == str(out / "model.onnx")
    assert report["verification"]["onnxruntime"]["passed"] is True
    assert "## ONNX export" in (out / "report.md").read_text()
    assert (out / DEPTH_PLOT).read_bytes().startswith(PNG_SIGNATURE)


def test_demo_refuses_existing_outputs_before_training(demo, workspace):
    _, out = demo
    before = _snapshot(out)

    run = workspace.run("demo", "--out", out, "--quick", "--quiet")

    _assert_clean_failure(run, "already exists", "--force")
    assert run.stdout == ""
    assert _snapshot(out) == before


@pytest.fixture(scope="module")
def compiled(workspace):
    out = workspace.root / "compiled"
    run = workspace.run("compile", *_model_args(workspace), "--out", out, "--verbose", "--channel-alignment", 1)
    assert run.returncode == 0, run.stderr
    return run, out


def test_compile_writes_model_and_reports(compiled):
    run, out = compiled
    report = json.loads((out / "report.json").read_text())

    assert sorted(p.name for p in out.iterdir()) == sorted(COMPILE_FILES)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert (out / DEPTH_PLOT).read_bytes().startswith(PNG_SIGNATURE)
    assert report["calibration"]["samples"] + report["calibration"]["holdout_samples"] == CALIBRATION_LIMIT
    assert report["verification"]["pytorch"]["passed"] is True
    assert report["verification"]["onnxruntime"]["passed"] is True
    assert report["onnx"]["op_counts"]
    # conv1's channel 0 never fires: it is masked and, with --channel-alignment 1, removed.
    assert any(r["pass"] == "eliminate_dead_channels" for r in report["rewrites"]), report["rewrites"]
    assert report["after"]["params"] < report["before"]["params"]
    # Every node of model.onnx names its source modules; the convs that lost the channel say so.
    provenance = report["onnx"]["provenance"]
    assert provenance and all(row["source_modules"] for row in provenance), provenance
    assert any("channels_removed" in row["rewrites"] for row in provenance), provenance
    assert "depth 3 -> 3" in run.stdout
    assert f"wrote {out / 'model.onnx'}" in run.stdout
    assert "switched it to eval mode" in run.stdout  # --verbose says so; SmallCNN is built in training mode
    assert "Traceback" not in run.stderr


def test_compiled_onnx_matches_the_checkpoint_model(compiled, workspace):
    from egp_export.export.onnx import ort_session, run_onnx
    from egp_export.io.datasets import load_calibration

    _, out = compiled
    sys.path.insert(0, str(workspace.root / "models"))
    try:
        import cli_models

        model = cli_models.SmallCNN().eval()
    finally:
        sys.path.pop(0)
        sys.modules.pop("cli_models", None)
    state = torch.load(workspace.checkpoint, weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    inputs = load_calibration("builtin:digits")[-100:]  # never seen by the compile (limit 600)

    (onnx_output,) = run_onnx(ort_session(out / "model.onnx"), inputs)
    with torch.no_grad():
        expected = model(inputs).numpy()

    np.testing.assert_allclose(onnx_output, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))


def test_compile_refuses_existing_outputs_then_force_overwrites(compiled, workspace):
    _, out = compiled
    before = _snapshot(out)

    refused = workspace.run("compile", *_model_args(workspace), "--out", out, "--quiet")
    _assert_clean_failure(refused, "already exists", "--force")
    assert _snapshot(out) == before

    forced = workspace.run("compile", *_model_args(workspace), "--out", out, "--force", "--quiet")
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout == ""  # --quiet
    assert sorted(p.name for p in out.iterdir()) == sorted(COMPILE_FILES)
    report = json.loads((out / "report.json").read_text())
    assert report["verification"]["onnxruntime"]["passed"] is True
    # The default channel alignment keeps conv1's 4 channels, dead one included (3 would be off the fast path).
    assert not any(r["pass"] == "eliminate_dead_channels" for r in report["rewrites"])
    assert any(f"kept to stay a multiple of {CHANNEL_ALIGNMENT}" in r["reason"] for r in report["refusals"])


def test_analyze_writes_reports_only(workspace):
    out = workspace.root / "analyzed"
    run = workspace.run("analyze", *_model_args(workspace), "--out", out)

    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(ANALYZE_OUTPUTS)
    report = json.loads((out / "report.json").read_text())
    assert [site["name"] for site in report["analysis"]["sites"]] == ["relu1", "relu2"]
    assert report["analysis"]["sites"][0]["dead_neurons"] >= 1
    assert "# egp-export activation analysis" in (out / "report.md").read_text()
    assert "2 activation sites" in run.stdout


def test_pickled_module_loads_with_unsafe_pickle_and_a_warning(workspace):
    out = workspace.root / "unsafe"
    run = workspace.run("analyze", *_model_args(workspace, workspace.files["module.pt"]), "--unsafe-pickle", "--out", out)

    assert run.returncode == 0, run.stderr
    assert "egp-export: warning:" in run.stderr
    assert "arbitrary code" in run.stderr
    assert "Traceback" not in run.stderr


def test_version_and_help_are_quick_and_clean(workspace):
    version = workspace.run("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"egp-export {egp_export.__version__}"
    helps = {}
    for command in ("analyze", "compile", "demo"):
        help_run = workspace.run(command, "--help")
        assert help_run.returncode == 0
        assert "--out" in help_run.stdout
        helps[command] = " ".join(help_run.stdout.split())  # argparse wraps lines
    for option in ("--approximate", "--cost-model {analytic,measured}", "--merge-plan {cost,all}", "--debug"):
        assert option in helps["compile"], option
    assert f"(default egp_export.passes.CHANNEL_ALIGNMENT, {CHANNEL_ALIGNMENT})" in helps["compile"]
    assert "--padding-plan" in helps["compile"] and "fine-tune" in helps["compile"]
    for option in ("--quick", "--seed", "--force", "--quiet"):
        assert option in helps["demo"], option


# Compile options, in-process through cli.main (cheap models) -----------------------


@pytest.fixture
def cli_main(workspace, monkeypatch, capsys):
    """``egp-export ARGS`` in this process, with the workspace's models importable and a private latency cache."""
    monkeypatch.syspath_prepend(str(workspace.root / "models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(workspace.root / "cache"))

    def run(*args: str | os.PathLike) -> Run:
        code = cli.main([str(arg) for arg in args])
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    yield run
    sys.modules.pop("cli_models", None)


def _compile_args(arch: str, out: Path, *extra) -> list:
    return ["compile", "--arch", arch, "--calibration", "builtin:digits", "--calibration-limit", CALIBRATION_LIMIT,
            "--out", out, *extra]


def _merges(report: dict) -> list[str]:
    return [r["action"] for r in report["rewrites"] if r["pass"] == "merge_conv_chains"]


def test_padding_plan_and_debug(cli_main, workspace):
    from egp_export.padding import apply_padding_plan, load_plan

    out = workspace.root / "padding-plan"
    run = cli_main(*_compile_args("cli_models:LinearPair", out, "--padding-plan", "--debug"))
    import cli_models  # importable now: cli.main imported it for --arch

    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted((*COMPILE_FILES, PADDING_PLAN))
    report = json.loads((out / "report.json").read_text())
    # Without --approximate the border-approximate chain is refused; the plan says how to make it exact.
    assert _merges(report) == []
    assert any("border not exact" in r["reason"] for r in report["refusals"])
    plan = json.loads((out / PADDING_PLAN).read_text())
    assert plan == [{"convs": ["conv1", "conv2"], "before": [[1, 1], [1, 1]], "after": [[2, 2], [0, 0]]}]
    assert "padding plan: 1 conv chain(s)" in run.stdout
    moved = apply_padding_plan(cli_models.LinearPair(), load_plan((out / PADDING_PLAN).read_text()), torch.rand(2, 1, 8, 8))
    assert moved.conv1.padding == (2, 2) and moved.conv2.padding == (0, 0)
    # --debug measures the model's fp32 noise up front to check every pass against.
    assert report["verification"]["fp32_noise"] is not None


def test_approximate_merges_border_chains_only_within_the_tolerance(cli_main, workspace):
    refused = workspace.root / "approximate-refused"
    run = cli_main(*_compile_args("cli_models:LinearPair", refused, "--approximate"))

    assert run.returncode == 3
    assert "egp-export: error: the compiled model differs" in run.stderr
    assert "1 border-approximate conv merges were made" in run.stderr
    assert not (refused / "model.onnx").exists()

    out = workspace.root / "approximate"
    run = cli_main(*_compile_args("cli_models:LinearPair", out, "--approximate", "--tolerance", 1))

    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [action for action in _merges(report) if "border-approximate" in action], report["rewrites"]
    assert report["after"]["depth"] < report["before"]["depth"]
    assert 0 < report["verification"]["pytorch"]["max_rel"] <= 1


def test_merge_plan_all_merges_what_the_cost_model_refuses(cli_main, workspace):
    costed, whole = workspace.root / "plan-cost", workspace.root / "plan-all"
    assert cli_main(*_compile_args("cli_models:Narrow", costed)).returncode == 0
    run = cli_main(*_compile_args("cli_models:Narrow", whole, "--merge-plan", "all"))

    assert run.returncode == 0, run.stderr
    by_cost = json.loads((costed / "report.json").read_text())
    merged = json.loads((whole / "report.json").read_text())
    assert _merges(by_cost) == []
    assert any("predicted latency grows" in r["reason"] for r in by_cost["refusals"])
    assert len(_merges(merged)) == 1 and "exact-bias-map" in _merges(merged)[0]
    assert merged["after"]["macs"] > by_cost["after"]["macs"]  # what the cost model predicted


@pytest.fixture(scope="module")
def resnet_checkpoint(workspace) -> Path:
    """A digits_resnet state dict whose first block's inner ReLU never switches off (what EGP leaves, in miniature)."""
    from egp_export.demo.digits import digits_resnet

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = digits_resnet()
    with torch.no_grad():
        model.block1_1.conv1.bias.add_(10.0)
    path = workspace.root / "digits_resnet.pt"
    torch.save(model.state_dict(), path)
    return path


def test_measured_cost_model_on_the_demo_architecture(cli_main, workspace, resnet_checkpoint):
    out = workspace.root / "measured"
    args = _compile_args(
        "egp_export.demo.digits:digits_resnet", out, "--checkpoint", resnet_checkpoint, "--cost-model", "measured"
    )
    run = cli_main(*args)

    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["predicted_conv_latency_us"]["cost_model"].startswith("measured:")
    assert list((workspace.root / "cache" / "egp-export").glob("latency-*.json"))  # the timings are cached
    # block1_1's 3x3 and 1x1 merge exactly and its residual folds in: one layer less on the longest path.
    assert any("block1_1_conv1 -> block1_1_conv2" in action for action in _merges(report))
    assert any(r["pass"] == "fold_residuals" for r in report["rewrites"])
    assert report["after"]["depth"] == report["before"]["depth"] - 1


# Failures ----------------------------------------------------------------------

SENTINELS = {name: f"existing {name}\n".encode() for name in COMPILE_FILES}


@dataclass(frozen=True)
class Failure:
    """A bad input; the run uses --force into a folder of existing outputs, which must survive."""

    args: tuple[str, ...]
    message: tuple[str, ...]
    exit_code: int = 2
    command: str = "compile"


def _failures(workspace: Workspace) -> dict[str, Failure]:
    files = workspace.files
    missing = workspace.root / "no-such-checkpoint.pt"
    shift = workspace.root / "shift.npy"
    # Decide samples near zero (distinct: repeated samples are no evidence), held-out samples all one: neurons that
    # looked constant flip. The held-out positions are the compile's own (seeded split, --strict: no validation part).
    from egp_export.analysis.batches import as_batches, split_holdout

    shifted = np.random.default_rng(0).normal(0.0, 1e-3, (50, 1, 8, 8)).astype(np.float32)
    shifted[split_holdout(as_batches(torch.from_numpy(shifted)), 0.2).holdout.indices.numpy()] = 1.0
    np.save(shift, shifted)
    return {
        "missing checkpoint": Failure(tuple(_model_args(workspace, missing)), (str(missing), "does not exist")),
        "corrupt checkpoint": Failure(
            tuple(_model_args(workspace, files["corrupt.pt"])), ("corrupt.pt", "not a readable PyTorch file")
        ),
        "key mismatch": Failure(
            tuple(_model_args(workspace, files["renamed.pt"])),
            ("does not fit the model", "missing keys", "conv2.weight", "unexpected keys", "pointwise.weight"),
        ),
        "shape mismatch": Failure(
            (*_model_args(workspace), "--arch-kwargs", "channels=6"),
            ("shape mismatches", "conv1.weight", "(4, 1, 3, 3)", "(6, 1, 3, 3)"),
        ),
        "pickled module without --unsafe-pickle": Failure(
            tuple(_model_args(workspace, files["module.pt"])), ("module.pt", "pickled Python objects", "--unsafe-pickle")
        ),
        "NaN calibration": Failure(tuple(_model_args(workspace, calibration=str(files["nan.npy"]))), ("nan.npy", "1 NaN")),
        "empty calibration": Failure(
            tuple(_model_args(workspace, calibration=str(files["empty.npy"]))), ("empty.npy", "empty", "0 samples")
        ),
        "3-channel calibration for a 1-channel model": Failure(
            tuple(_model_args(workspace, calibration=str(files["rgb.npy"]))), ("rejects calibration samples", "(3, 8, 8)")
        ),
        "untraceable model": Failure(
            ("--arch", "cli_models:Branchy", "--calibration", "builtin:digits"), ("torch.fx cannot trace", "control flow")
        ),
        "unknown factory": Failure(
            ("--arch", "cli_models:SmallCnn", "--calibration", "builtin:digits"), ("has no attribute 'SmallCnn'", "SmallCNN")
        ),
        "activations leave their region on held-out data": Failure(
            ("--arch", "cli_models:SmallCNN", "--calibration", str(shift), "--strict"), ("held-out", "relu1"), exit_code=3
        ),
        "analyze with a corrupt checkpoint": Failure(
            tuple(_model_args(workspace, files["corrupt.pt"])), ("not a readable PyTorch file",), command="analyze"
        ),
    }


@pytest.fixture(scope="module")
def failure_cases(workspace) -> dict[str, Failure]:
    return _failures(workspace)


@pytest.fixture(scope="module")
def failures(workspace, failure_cases) -> dict[str, tuple[Run, Path]]:
    """Run every failure case at once (each in its own folder of existing outputs)."""
    cases = failure_cases
    folders = {}
    for index, name in enumerate(cases):
        folder = workspace.root / f"failure-{index}"
        folder.mkdir()
        for file, content in SENTINELS.items():
            (folder / file).write_bytes(content)
        folders[name] = folder

    def run(name: str) -> Run:
        case = cases[name]
        return workspace.run(case.command, *case.args, "--out", folders[name], "--force", "--quiet")

    with ThreadPoolExecutor(max_workers=PARALLEL_RUNS) as pool:
        runs = dict(zip(cases, pool.map(run, cases)))
    return {name: (runs[name], folders[name]) for name in cases}


FAILURE_NAMES = [
    "missing checkpoint",
    "corrupt checkpoint",
    "key mismatch",
    "shape mismatch",
    "pickled module without --unsafe-pickle",
    "NaN calibration",
    "empty calibration",
    "3-channel calibration for a 1-channel model",
    "untraceable model",
    "unknown factory",
    "activations leave their region on held-out data",
    "analyze with a corrupt checkpoint",
]


def test_failure_list_is_complete(failure_cases):
    assert sorted(FAILURE_NAMES) == sorted(failure_cases)


@pytest.mark.parametrize("name", FAILURE_NAMES)
def test_bad_input_fails_cleanly_and_keeps_existing_files(name, failures, failure_cases):
    run, folder = failures[name]
    case = failure_cases[name]

    _assert_clean_failure(run, *case.message, exit_code=case.exit_code)
    assert _snapshot(folder) == SENTINELS  # nothing overwritten, no temporary files left


def test_output_folder_that_is_a_file(workspace):
    blocker = workspace.root / "a-file"
    blocker.write_text("not a folder")

    run = workspace.run("compile", *_model_args(workspace), "--out", blocker / "out")

    _assert_clean_failure(run, str(blocker), "choose another output location")
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into read-only folders")
def test_output_folder_that_is_read_only(workspace):
    locked = workspace.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        run = workspace.run("analyze", *_model_args(workspace), "--out", locked / "out")
    finally:
        locked.chmod(0o755)

    _assert_clean_failure(run, str(locked), "choose another output location")
    assert list(locked.iterdir()) == []


# In-process: the exit-code contract of main() ------------------------------------


def test_main_turns_project_errors_into_their_exit_code(monkeypatch, tmp_path, capsys):
    def broken(args):
        raise CheckpointError("checkpoint x is broken; re-save it.")

    monkeypatch.setattr(cli, "_run_demo", broken)

    assert cli.main(["demo", "--out", str(tmp_path)]) == CheckpointError.exit_code
    assert capsys.readouterr().err == "egp-export: error: checkpoint x is broken; re-save it.\n"


def test_main_exits_130_on_keyboard_interrupt(monkeypatch, tmp_path, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_demo", interrupted)

    assert cli.main(["demo", "--out", str(tmp_path)]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_measure_latency_records_measured_beside_predicted(cli_main, workspace):
    out = workspace.root / "measure-latency"
    run = cli_main(*_compile_args("cli_models:LinearPair", out, "--measure-latency"))

    assert run.returncode == 0, run.stderr
    assert (out / "original.onnx").exists()
    measured = json.loads((out / "report.json").read_text())["measured_latency"]
    assert measured["original_ms"] > 0 and measured["compiled_ms"] > 0
    low, high = measured["ci"]
    assert low <= measured["speedup"] <= high
    assert measured["predicted_speedup"] > 0
    assert "measured on ort-cpu" in run.stdout
    assert "**Speedup:** measured" in (out / "report.md").read_text()


# Export options, all-or-nothing outputs, progress -------------------------------------


def test_cli_constants_match_the_library():
    from egp_export.export import onnx as onnx_export

    assert cli.EXPORTER_CHOICES == onnx_export.EXPORTER_CHOICES and cli.EXPORT_LOG == onnx_export.EXPORT_LOG


def test_failed_export_prints_one_line_and_keeps_the_log(workspace):
    out = workspace.root / "hostile"
    run = workspace.run(*_compile_args("cli_models:ExportHostile", out))

    _assert_clean_failure(run, "no export attempt succeeded", "dynamo (dynamic batch)", "torchscript (dynamic batch)",
                          "cannot be exported", "--static-batch", str(out / "export.log"))
    assert len(run.stderr.splitlines()) < 5, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["export.log"]  # no outputs, no staging folder
    log = (out / "export.log").read_text()
    assert "Error while creating guard" in log and "printed by the exporter" in log

    verbose = workspace.run(*_compile_args("cli_models:ExportHostile", out, "--verbose", "--force"))
    assert verbose.returncode == 2
    assert "Error while creating guard" in verbose.stderr  # --verbose shows torch's logs


def test_a_failed_export_never_replaces_an_existing_log_without_force(cli_main, workspace):
    """Regression: a failed export overwrote --out/export.log without --force. It is checked with the other outputs,
    before any work; with --force the new log replaces it."""
    out = workspace.root / "old-log"
    out.mkdir()
    (out / "export.log").write_text("the log of an earlier run\n")
    refused = cli_main(*_compile_args("cli_models:ExportHostile", out))
    _assert_clean_failure(refused, f"{out / 'export.log'} already exists", "--force")
    assert "stage" not in refused.stderr and "calibrat" not in refused.stderr.lower()  # refused before any work
    assert _snapshot(out) == {"export.log": b"the log of an earlier run\n"}

    forced = cli_main(*_compile_args("cli_models:ExportHostile", out, "--force"))
    _assert_clean_failure(forced, "no export attempt succeeded", str(out / "export.log"))
    assert "Error while creating guard" in (out / "export.log").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["export.log"]


def test_an_opset_is_honoured_or_refused(cli_main, workspace):
    """Regression: --opset 13 (also 7, 99) with the dynamo exporter wrote opset 18 and said nothing."""
    out = workspace.root / "opset"
    run = cli_main(*_compile_args("cli_models:SmallCNN", out, "--opset", "13", "--checkpoint", workspace.checkpoint))
    assert run.returncode == 0, run.stderr
    assert onnx.load(out / "model.onnx").opset_import[0].version == 13
    onnx_report = json.loads((out / "report.json").read_text())["onnx"]
    assert onnx_report["opset"] == onnx_report["opset_requested"] == 13
    assert "opset 13 as requested" in run.stdout and "not the requested 13" in run.stdout  # the route: dynamo could not

    dynamo = cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "opset-dynamo", "--opset", "13",
                                     "--exporter", "dynamo", "--checkpoint", workspace.checkpoint))  # fmt: skip
    _assert_clean_failure(dynamo, "dynamo exporter wrote opset 18, not the requested 13", "--exporter torchscript")
    for opset in ("6", "99"):
        refused = cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "opset-range", "--opset", opset))
        _assert_clean_failure(refused, f"opset {opset} cannot be written here", "from 7 to")
        assert not (workspace.root / "opset-range").exists()


def test_input_size_for_a_source_other_than_a_folder_is_refused_not_ignored(cli_main, workspace):
    """Regression: --input-size was accepted and silently ignored for builtin:digits and .npy calibration (.pt too)."""
    for command in ("compile", "analyze"):
        for source in ("builtin:digits", workspace.files["rgb.npy"]):
            out = workspace.root / f"input-size-{command}"
            run = cli_main(command, *_model_args(workspace, calibration=str(source)), "--input-size", "4", "4",
                           "--out", out)  # fmt: skip
            _assert_clean_failure(run, "--input-size resizes the images of a folder", f"{source} is not a folder")
            assert not out.exists()


def test_export_options_reach_the_exporter(cli_main, workspace):
    out = workspace.root / "export-options"
    run = cli_main(*_compile_args("cli_models:SmallCNN", out, "--exporter", "torchscript", "--opset", "17",
                                  "--no-simplify", "--checkpoint", workspace.checkpoint))

    assert run.returncode == 0, run.stderr
    onnx_report = json.loads((out / "report.json").read_text())["onnx"]
    assert onnx_report["exporter"] == "torchscript" and onnx_report["exporter_requested"] == "torchscript"
    assert onnx_report["opset"] == 17 and not onnx_report["simplified"]
    assert onnx_report["path"] == str(out / "model.onnx")  # where it is, not where it was staged
    assert "ONNX export: torchscript exporter, dynamic batch (requested); opset 17 as requested" in run.stdout
    assert "why this exporter: torchscript exporter" in (out / "report.md").read_text()


def test_static_batch_only_when_allowed(cli_main, workspace):
    out = workspace.root / "static-batch"
    refused = cli_main(*_compile_args("cli_models:BatchBound", out))
    assert refused.returncode == 3 and "--static-batch" in refused.stderr and "fixed the batch size" in refused.stderr
    assert not (out / "model.onnx").exists()

    run = cli_main(*_compile_args("cli_models:BatchBound", out, "--static-batch", "--force"))
    assert run.returncode == 0, run.stderr
    onnx_report = json.loads((out / "report.json").read_text())["onnx"]
    assert not onnx_report["dynamic_batch"] and onnx_report["traced_batch"] == 1
    assert [a["exporter"] for a in onnx_report["failed_attempts"]] == ["dynamo", "torchscript"]
    dims = onnx.load(out / "model.onnx").graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1
    assert "Export attempts that failed before the one used" in (out / "report.md").read_text()


def test_interrupted_compile_leaves_nothing_and_a_rerun_needs_no_force(cli_main, workspace, monkeypatch):
    from egp_export.report import plots

    out = workspace.root / "interrupted"
    real_plot_depth = plots.plot_depth

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C near the end: model.onnx and the reports are already written

    monkeypatch.setattr(plots, "plot_depth", interrupted)
    run = cli_main(*_compile_args("cli_models:SmallCNN", out, "--checkpoint", workspace.checkpoint))
    assert run.returncode == 130
    assert not out.exists()

    monkeypatch.setattr(plots, "plot_depth", real_plot_depth)
    rerun = cli_main(*_compile_args("cli_models:SmallCNN", out, "--checkpoint", workspace.checkpoint))
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(COMPILE_FILES)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_follow_the_umask(cli_main, workspace, umask):
    out = workspace.root / f"umask-{umask:03o}"
    previous = os.umask(umask)
    try:
        run = cli_main("analyze", *_model_args(workspace), "--out", out)
    finally:
        os.umask(previous)
    assert run.returncode == 0, run.stderr
    assert {name: stat.S_IMODE((out / name).stat().st_mode) for name in ANALYZE_OUTPUTS} == {
        name: 0o666 & ~umask for name in ANALYZE_OUTPUTS
    }


COMPILE_STAGES = ("prepare", "capture", "calibrate", "decide", "rewrite", "verify", "back-off", "report")


def _stage_lines(text: str) -> list[str]:
    names = ("compile", "export", "ORT check", "report", *COMPILE_STAGES)
    return [line for line in text.splitlines() if line.strip().split(":")[0].removesuffix(" ...") in names]


def test_stages_report_progress_on_a_terminal_only(cli_main, workspace, monkeypatch):
    args = ("--checkpoint", workspace.checkpoint)
    piped = cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "stages-piped", *args))
    assert piped.returncode == 0 and _stage_lines(piped.stderr) == []

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    quiet = cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "stages-quiet", *args, "--quiet"))
    assert quiet.returncode == 0 and _stage_lines(quiet.stderr) == []

    shown = cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "stages-tty", *args))
    assert shown.returncode == 0, shown.stderr
    lines = _stage_lines(shown.stderr)
    assert lines[0].startswith("compile: trace, calibrate") and lines[0].endswith("...")
    # Each compile stage says when it starts and what it did, in order, before the compile's own summary line.
    inner = [line.strip() for line in lines if line.startswith("  ")]
    stages = ("prepare", "capture", "calibrate", "decide", "rewrite", "verify", "report")
    assert [line.split(":")[0].removesuffix(" ...") for line in inner] == [
        stage for name in stages for stage in (name, name)
    ]
    assert inner[5].startswith("calibrate: samples ") and ", sites " in inner[5] and inner[5].endswith(" s")
    assert inner[11].startswith("verify: samples ") and "max rel" in inner[11] and "allowed" in inner[11]
    assert any(line.startswith("compile: ") and "activations linearized" in line and line.endswith(" s") for line in lines)
    assert any(line.startswith("export: dynamo exporter, dynamic batch") and line.endswith(" s") for line in lines)
    assert any(line.startswith("ORT check: max_rel") for line in lines)
    assert lines[-1].startswith("report: ") and lines[-1].endswith(" s")


class _Cancelling(torch.nn.Module):
    """fp32 loses the low bits of x in (x + 1e4) - 1e4: own noise ~1e-4 relative, far above 1e-5."""

    def forward(self, x):
        return (x + 1e4) - 1e4


def test_the_ort_check_allows_the_compiled_modules_own_noise_floor_but_no_more():
    from egp_export.cli.main import _ort_rtol

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert _ort_rtol(None, _Cancelling(), x) == pytest.approx(1e-4)  # raised to the (capped) floor
    assert _ort_rtol(None, torch.nn.Identity(), x) == 1e-5  # a clean module: fp32's 1e-5
    assert _ort_rtol(5e-6, torch.nn.Identity(), x) == pytest.approx(4e-5)  # the original's noise floor, 8x its noise
    assert _ort_rtol(1.0, _Cancelling(), x) == pytest.approx(1e-4)  # never above the cap; --tolerance plays no part


def test_integer_files_keep_their_dtype_or_become_floats_when_the_model_takes_floats(cli_main, workspace):
    import numpy as np

    ids = workspace.root / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(0, 50, size=(300, 6), dtype=np.int64))
    tokens = cli_main("compile", "--arch", "cli_models:TokenNet", "--calibration", ids, "--min-observations", "100",
                      "--out", workspace.root / "tokens")
    assert tokens.returncode == 0, tokens.stderr
    assert "converted to float32" not in tokens.stdout
    report = json.loads((workspace.root / "tokens" / "report.json").read_text())
    assert report["activations_linearized"] == 1 and report["verification"]["onnxruntime"]["max_rel"] <= 1e-5

    images = workspace.root / "uint8.npy"
    np.save(images, np.random.default_rng(1).integers(0, 2, size=(300, 1, 8, 8), dtype=np.uint8))
    pixels = cli_main("compile", "--arch", "cli_models:SmallCNN", "--calibration", images, "--out", workspace.root / "u8")
    assert pixels.returncode == 0, pixels.stderr
    assert "holds uint8 data and the model takes floats: converted to float32" in pixels.stdout


def test_crossing_radius_reaches_the_guarantee_and_bad_values_are_one_error_line(cli_main, workspace):
    out = workspace.root / "crossing-radius"
    run = cli_main(*_compile_args("cli_models:LinearPair", out, "--crossing-radius", "0.05"))
    assert run.returncode == 0, run.stderr
    searched = json.loads((out / "report.json").read_text())["guarantee"]["perturbation_search"]
    assert searched["radius"] == 0.05
    for bad in ("-1", "nan", "inf"):  # every numeric option refuses non-finite values at parse time
        with pytest.raises(SystemExit) as refused:  # argparse's own refusal
            cli_main(*_compile_args("cli_models:LinearPair", workspace.root / f"radius{bad}", "--crossing-radius", bad))
        assert refused.value.code == 2
    with pytest.raises(CalibrationError, match="crossing_radius must be a finite number"):  # the API's own check
        egp_export.compile(nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval(), torch.randn(40, 4), crossing_radius=float("inf"))


def test_quiet_and_verbose_exclude_each_other(capsys):
    """Regression: --quiet --verbose was accepted, and --quiet silently dropped --verbose's notes."""
    for command in ("compile", "analyze"):
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--calibration", "builtin:digits", "--out", "unused", "--quiet", "--verbose"])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "argument --verbose: not allowed with argument --quiet" in err and "Traceback" not in err


def test_frontend_option_reaches_the_compile_and_the_report(cli_main, workspace):
    out = workspace.root / "frontend-export"
    run = cli_main(*_compile_args("cli_models:SmallCNN", out, "--frontend", "export"))
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["trace"]["frontend"] == "export" and report["trace"]["frontend_reason"] == "requested"
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal
        cli_main(*_compile_args("cli_models:SmallCNN", workspace.root / "frontend-bad", "--frontend", "dynamo"))
    assert refused.value.code == 2


def test_compile_summary_and_report_lead_with_top1_agreement(compiled):
    run, out = compiled
    report = json.loads((out / "report.json").read_text())
    pytorch, onnxruntime = report["verification"]["pytorch"], report["verification"]["onnxruntime"]
    held = report["calibration"]["holdout_samples"]

    assert pytorch["samples"] == held and onnxruntime["samples"] == held
    assert pytorch["top1_agreement"] == 1.0 and onnxruntime["top1_agreement"] == 1.0
    assert pytorch["cosine_min"] > 0.99999 and pytorch["outputs"][0]["top5_agreement"] == 1.0
    summary = run.stdout.index(f"top-1 agreement 100.00% on {held} held-out samples, top-5 100.00%")
    assert summary < run.stdout.index("max relative error:")  # before any exponent
    markdown = (out / "report.md").read_text()
    assert "| top-1 agreement |" in markdown and "100.00%" in markdown
    assert report["calibration"]["preprocessing"] == {"scale": "pixels / 255", "mean": None, "std": None,
                                                      "source": "default"}
