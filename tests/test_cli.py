"""The command line, run as a user runs it: a real ``python -m egp_export`` subprocess.

Every failure a user can cause must exit non-zero with one clear
``egp-export: error:`` line naming the problem, print no traceback, and leave
existing files untouched. Each subprocess imports torch (seconds), so the
failure cases run concurrently and the models, checkpoints and data files are
made once per module.
"""

from __future__ import annotations

import json
import os
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

import egp_export
from egp_export import cli
from egp_export.errors import CheckpointError
from egp_export.report import ANALYZE_OUTPUTS, COMPILE_OUTPUTS

SUBPROCESS_TIMEOUT_S = 300
PARALLEL_RUNS = 4
DEMO_EPOCHS = 3
CALIBRATION_LIMIT = 600  # digits used by the compile runs: enough to calibrate, quick to export

# A user's model package, importable through PYTHONPATH as --arch cli_models:...
MODELS_SOURCE = textwrap.dedent(
    """
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


    class Branchy(SmallCNN):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace this
                return super().forward(x)
            return super().forward(-x)
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
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())} if folder.exists() else {}


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
    run = workspace.run("demo", "--out", out, "--epochs", DEMO_EPOCHS, "--seed", 0)
    assert run.returncode == 0, run.stderr
    return run, out


def test_demo_writes_summary_and_all_outputs(demo):
    run, out = demo
    summary = json.loads((out / "summary.json").read_text())

    for name in (*COMPILE_OUTPUTS, "checkpoint.pt", "summary.json"):
        assert (out / name).is_file(), name
    for key in (
        "accuracy_dense",
        "accuracy_compiled",
        "activations_linearized",
        "depth_before",
        "depth_after",
        "params_before",
        "params_after",
        "macs_before",
        "macs_after",
    ):
        assert key in summary, key
    assert summary["epochs"] == DEMO_EPOCHS
    assert summary["accuracy_dense"] > 0.8
    # The compile is exact, so ONNX Runtime's predictions on the test split are the dense model's.
    assert abs(summary["accuracy_compiled"] - summary["accuracy_dense"]) <= 1e-9
    assert summary["depth_after"] <= summary["depth_before"]
    assert summary["params_after"] < summary["params_before"]  # BatchNorm folded at least
    assert summary["macs_after"] <= summary["macs_before"]
    assert "test accuracy (ONNX Runtime, compiled)" in run.stdout
    assert "Traceback" not in run.stderr


def test_demo_report_holds_the_onnx_export(demo):
    _, out = demo
    report = json.loads((out / "report.json").read_text())

    assert report["onnx"]["path"] == str(out / "model.onnx")
    assert report["verification"]["onnxruntime"]["passed"] is True
    assert "## ONNX export" in (out / "report.md").read_text()


def test_demo_refuses_existing_outputs_before_training(demo, workspace):
    _, out = demo
    before = _snapshot(out)

    run = workspace.run("demo", "--out", out, "--epochs", 1)

    _assert_clean_failure(run, "already exists", "--force")
    assert "training" not in run.stdout
    assert _snapshot(out) == before


@pytest.fixture(scope="module")
def compiled(workspace):
    out = workspace.root / "compiled"
    run = workspace.run("compile", *_model_args(workspace), "--out", out, "--verbose")
    assert run.returncode == 0, run.stderr
    return run, out


def test_compile_writes_model_and_reports(compiled):
    run, out = compiled
    report = json.loads((out / "report.json").read_text())

    assert sorted(p.name for p in out.iterdir()) == sorted(COMPILE_OUTPUTS)
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)
    assert report["calibration"]["samples"] + report["calibration"]["holdout_samples"] == CALIBRATION_LIMIT
    assert report["verification"]["pytorch"]["passed"] is True
    assert report["verification"]["onnxruntime"]["passed"] is True
    assert report["onnx"]["op_counts"]
    # conv1's channel 0 never fires: it is masked and removed.
    assert any(r["pass"] == "eliminate_dead_channels" for r in report["rewrites"]), report["rewrites"]
    assert report["after"]["params"] < report["before"]["params"]
    assert "depth 3 -> 3" in run.stdout
    assert f"wrote {out / 'model.onnx'}" in run.stdout
    assert "switched it to eval mode" in run.stdout  # --verbose says so; SmallCNN is built in training mode
    assert "Traceback" not in run.stderr


def test_compiled_onnx_matches_the_checkpoint_model(compiled, workspace):
    from egp_export.datasets import load_calibration
    from egp_export.onnx_export import ort_session, run_onnx

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
    assert sorted(p.name for p in out.iterdir()) == sorted(COMPILE_OUTPUTS)
    assert json.loads((out / "report.json").read_text())["verification"]["onnxruntime"]["passed"] is True


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
    for command in ("analyze", "compile", "demo"):
        help_run = workspace.run(command, "--help")
        assert help_run.returncode == 0
        assert "--out" in help_run.stdout


# Failures ----------------------------------------------------------------------

SENTINELS = {name: f"existing {name}\n".encode() for name in COMPILE_OUTPUTS}


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
    # Calibration samples all zero, held-out samples all one: neurons that looked constant flip.
    np.save(shift, np.concatenate([np.zeros((40, 1, 8, 8), np.float32), np.ones((10, 1, 8, 8), np.float32)]))
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
            ("--arch", "cli_models:SmallCNN", "--calibration", str(shift)), ("held-out", "relu1"), exit_code=3
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
