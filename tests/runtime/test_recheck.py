"""``egp-export recheck``: a compile's guarantee re-measured on new data (exit 0 holds, 3 drifted, 2 usage errors).

One compile (module fixture, through the command line, on the first 600 digits: enough observations for both
sites to be rewritten) serves every test; the rechecks run in-process through ``cli.main`` but one pair of real
subprocesses (slow), which shows the exit codes a CI job sees.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from egp_export.analysis.numerics import ORT_CPU_RTOL
from egp_export.analysis.regions import model_digest
from egp_export.cli.main import main
from egp_export.compiler import compile as compile_model
from egp_export.export.onnx import export_onnx
from egp_export.io.datasets import load_calibration
from egp_export.report.report import to_json, with_export
from egp_export.runtime.inputs import onnx_input_spec
from egp_export.runtime.recheck import EXIT_DRIFTED, EXIT_HOLDS, load_compiled, recheck
from tests.runtime.recheck_models import DriftNet, SmoothNet

ARCH = "tests.runtime.recheck_models:DriftNet"
COMPILED_SAMPLES = 600  # 360 decide samples x 64 positions: far above min_observations (500) at both sites
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The compile's --out folder, its checkpoint, another checkpoint and three data files of unseen digits."""
    root = tmp_path_factory.mktemp("recheck")
    torch.save(DriftNet().state_dict(), root / "checkpoint.pt")
    torch.save(DriftNet(seed=1).state_dict(), root / "other.pt")
    digits = load_calibration("builtin:digits").numpy()
    fresh = digits[COMPILED_SAMPLES : 2 * COMPILED_SAMPLES]  # never seen by the compile (--calibration-limit)
    data = {"fresh": fresh, "negated": -fresh, "scaled": 10 * fresh, "rgb": np.repeat(fresh, 3, axis=1)}
    for name, array in data.items():
        np.save(root / f"{name}.npy", array)
    code = main(["compile", "--arch", ARCH, "--checkpoint", str(root / "checkpoint.pt"), "--calibration",
                 "builtin:digits", "--calibration-limit", str(COMPILED_SAMPLES), "--out", str(root / "out"), "--quiet"])
    assert code == 0
    return root


def _recheck(capsys, workspace: Path, data: str, *extra, compiled: Path | None = None, checkpoint: str = "checkpoint.pt"):
    code = main(["recheck", str(compiled or workspace / "out"), "--arch", ARCH, "--checkpoint", str(workspace / checkpoint),
                 "--inputs", str(workspace / f"{data}.npy"), *map(str, extra)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_compile_records_the_regions_of_its_rewritten_neurons(workspace):
    report = json.loads((workspace / "out" / "report.json").read_text())
    sites = {record["site"]: record for record in report["regions"]["sites"]}

    assert {name: record["rewrite"] for name, record in sites.items()} == {"relu1": "linearized", "relu2": "dead_masked"}
    relu1, relu2 = sites["relu1"], sites["relu2"]
    assert relu1["rewritten"] == list(range(8)) and relu1["region"] == [1] * 8 and relu1["slope"] == [1.0] * 8
    assert relu1["min_margin"] == pytest.approx(1.0)  # conv1's bias on all-zero patches
    assert {0, 1} <= set(relu2["rewritten"]) and relu2["region"] == [0] * len(relu2["rewritten"])
    assert relu2["slope"] == relu2["intercept"] == [0.0] * len(relu2["rewritten"])
    assert report["regions"]["model_digest"] == model_digest(DriftNet())


def test_fresh_samples_of_the_calibration_distribution_hold(workspace, capsys):
    code, out, err = _recheck(capsys, workspace, "fresh")

    assert code == EXIT_HOLDS, err
    assert out.splitlines()[-1].startswith("egp-export recheck: HOLDS on 600 samples")
    assert "top-1 agreement 100.00%" in out
    assert "relu1" in out and "relu2" in out  # the table lists every rewritten site


def test_negated_inputs_switch_the_linearized_relu_off(workspace, capsys, tmp_path):
    code, out, err = _recheck(capsys, workspace, "negated", "--json", tmp_path / "result.json")

    assert code == EXIT_DRIFTED, err
    assert "no longer holds: relu1 (relu, linearized): 8 of 8 neurons left their region: 0, 1, 2, 3, 4, 5, 6, 7" in out
    assert out.splitlines()[-1].startswith("egp-export recheck: DRIFTED on 600 samples: sites relu1 (8 neurons)")
    result = json.loads((tmp_path / "result.json").read_text())
    relu1 = next(site for site in result["sites"] if site["site"] == "relu1")
    assert relu1["left_neurons"] == list(range(8)) and relu1["min_margin"] < 0 < relu1["compile_margin"]
    assert relu1["outside_fraction"] > relu1["compile_bound"] > 0  # far above the rule-of-three bound
    assert not result["outputs"]["passed"]  # the compiled file computes relu1 as the identity: outputs differ


def test_scaled_inputs_fire_the_masked_dead_neurons(workspace, capsys):
    code, out, err = _recheck(capsys, workspace, "scaled", "--json", "-")

    assert code == EXIT_DRIFTED, err
    result = json.loads(out)  # stdout holds the JSON alone
    sites = {site["site"]: site for site in result["sites"]}
    assert sites["relu2"]["left_neurons"] == [0, 1] and not sites["relu2"]["holds"]
    assert sites["relu1"]["holds"]  # inputs >= 0 keep conv1's outputs above its bias
    assert result["reasons"][0].startswith("relu2 (relu, dead_masked): 2 of")
    assert "dead neurons fired: 0, 1" in result["reasons"][0]


def test_the_python_api_gives_what_the_command_line_prints(workspace, capsys):
    code, out, _ = _recheck(capsys, workspace, "negated", "--json", "-")
    report, onnx_path = load_compiled(workspace / "out")
    model = DriftNet()
    model.load_state_dict(torch.load(workspace / "checkpoint.pt"))

    result = recheck(model.eval(), report, onnx_path, torch.from_numpy(np.load(workspace / "negated.npy")))

    assert result.exit_code == code == EXIT_DRIFTED
    assert json.loads(to_json(result.to_dict())) == json.loads(out)


def test_plot_and_json_files_are_written_once(workspace, capsys, tmp_path):
    plot, document = tmp_path / "drift.png", tmp_path / "drift.json"
    code, _, err = _recheck(capsys, workspace, "scaled", "--plot", plot, "--json", document)
    assert code == EXIT_DRIFTED, err
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert json.loads(document.read_text())["holds"] is False

    code, _, err = _recheck(capsys, workspace, "fresh", "--json", document)
    assert code == 2 and "drift.json" in err and "--force" in err
    assert json.loads(document.read_text())["holds"] is False  # untouched


def _edited(workspace: Path, tmp_path: Path, edit) -> Path:
    """A copy of the compile's folder whose report.json ``edit`` changed (or whose files it removed)."""
    folder = tmp_path / "edited"
    shutil.copytree(workspace / "out", folder)
    edit(folder)
    return folder


def _edit_report(change):
    def edit(folder: Path) -> None:
        report = json.loads((folder / "report.json").read_text())
        change(report)
        (folder / "report.json").write_text(json.dumps(report))

    return edit


def _rename_site(report: dict) -> None:
    report["regions"]["sites"][0]["site"] = "relu9"


ERRORS = {
    "no regions (an older compile)": (_edit_report(lambda r: r.pop("regions")), ("no 'regions' section",)),
    "regions of another format": (_edit_report(lambda r: r["regions"].update(format=99)), ("format 99",)),
    "a site the model lacks": (_edit_report(_rename_site), ("another model", "'relu9'", "no such activation site")),
    "no guarantee": (_edit_report(lambda r: r.pop("guarantee")), ("guarantee['allowed']",)),
    "a site record without its regions": (
        _edit_report(lambda r: r["regions"]["sites"][0].pop("region")), ("site 'relu1' lacks region",)
    ),
    "null sections": (_edit_report(lambda r: r.update(guarantee=None, trace=None)), ("guarantee['allowed']",)),
    "report not JSON": (lambda folder: (folder / "report.json").write_text("{"), ("not readable JSON",)),
    "model.onnx missing": (lambda folder: (folder / "model.onnx").unlink(), ("model.onnx does not exist",)),
    "report.json missing": (lambda folder: (folder / "report.json").unlink(), ("report.json does not exist",)),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_a_bad_compile_folder_is_one_error_line(workspace, capsys, tmp_path, case):
    edit, fragments = ERRORS[case]
    code, _, err = _recheck(capsys, workspace, "fresh", compiled=_edited(workspace, tmp_path, edit))

    _assert_one_error_line(code, err, fragments)


@pytest.mark.parametrize(("case", "data", "checkpoint", "fragments"), [
    ("another checkpoint", "fresh", "other.pt", ("another model", "model digest", "--checkpoint")),
    ("data of another shape", "rgb", "checkpoint.pt", ("[3, 8, 8]", "compiled for [1, 8, 8]")),
])
def test_another_model_or_other_data_is_one_error_line(workspace, capsys, case, data, checkpoint, fragments):
    code, _, err = _recheck(capsys, workspace, data, checkpoint=checkpoint)

    _assert_one_error_line(code, err, fragments)


def _other_file(name: str):
    """An edit putting another model's ONNX file in place of model.onnx: 4 class scores, 3 input channels, 2 inputs."""
    models = {
        "four classes": (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4)), (1, 1, 8, 8)),
        "three channels": (torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()), (1, 3, 8, 8)),
    }

    def edit(folder: Path) -> None:
        (folder / "model.onnx").unlink()
        if name == "two inputs":
            with pytest.warns(DeprecationWarning):  # the TorchScript exporter
                torch.onnx.export(TwoInputs().eval(), (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)),
                                  folder / "model.onnx", dynamo=False)
            return
        model, shape = models[name]
        export_onnx(model.eval(), torch.rand(shape), folder / "model.onnx", exporter="torchscript")

    return edit


class TwoInputs(torch.nn.Module):
    def forward(self, x, y):
        return (x + y).flatten(1)


@pytest.mark.parametrize(("case", "fragments"), [
    ("four classes", ("does not compute the model's outputs", "output shape differs")),
    ("three channels", ("ONNX Runtime cannot run", "model.onnx this compile wrote")),
    ("two inputs", ("takes 2 inputs", "the data gives 1")),
])
def test_another_models_onnx_file_is_one_error_line(workspace, capsys, tmp_path, case, fragments):
    code, _, err = _recheck(capsys, workspace, "fresh", compiled=_edited(workspace, tmp_path, _other_file(case)))

    _assert_one_error_line(code, err, fragments)


def test_a_missing_folder_is_one_error_line(workspace, capsys, tmp_path):
    code, _, err = _recheck(capsys, workspace, "fresh", compiled=tmp_path / "nowhere")

    _assert_one_error_line(code, err, ("nowhere does not exist", "--out folder"))


def _assert_one_error_line(code: int, err: str, fragments) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("egp-export: error: ")]
    assert len(errors) == 1, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.slow  # two processes importing torch: ~50 s on a loaded 2-core runner; cli.main gives the same codes
def test_the_exit_codes_of_a_real_process(workspace):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def run(data: str, compiled: Path):
        command = [sys.executable, "-m", "egp_export", "recheck", str(compiled), "--arch", ARCH, "--checkpoint",
                   str(workspace / "checkpoint.pt"), "--inputs", str(workspace / f"{data}.npy"), "--quiet"]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    with ThreadPoolExecutor(2) as pool:
        drifted, missing = pool.map(run, ("negated", "fresh"), (workspace / "out", workspace / "nowhere"))

    assert drifted.returncode == EXIT_DRIFTED, drifted.stderr
    assert drifted.stdout.splitlines() == [line for line in drifted.stdout.splitlines() if "DRIFTED" in line]  # --quiet
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("egp-export: error: ")


def test_a_smooth_surrogate_off_the_tolerance_on_a_wider_range(tmp_path):
    """GELU replaced by an affine surrogate fitted near 5; inputs far below move it off. Two outputs, one of them
    class scores: top-1 agreement is given for that one only."""
    model = SmoothNet().eval()
    generator = torch.Generator().manual_seed(0)
    calibration = torch.rand(400, 4, generator=generator)
    compiled = compile_model(model, calibration, min_observations=100)
    exported = export_onnx(compiled.module, calibration[:1].clone(), tmp_path / "model.onnx",
                           verify_inputs=[calibration[:50]])
    report = with_export(compiled.report, exported)
    assert report["regions"]["sites"][0]["site"] == "act" and report["regions"]["sites"][0]["allowed_error"] > 0

    fresh = recheck(model, report, tmp_path / "model.onnx", torch.rand(300, 4, generator=generator))
    shifted = recheck(model, report, tmp_path / "model.onnx", -300 * torch.rand(300, 4, generator=generator))

    assert fresh.exit_code == EXIT_HOLDS and fresh.sites[0].surrogate_error <= fresh.sites[0].allowed_error
    assert list(fresh.top1_agreement) == ["output[0]"] and fresh.top1_agreement["output[0]"] == 1.0
    assert [output.output for output in fresh.error.outputs] == ["output[0]", "output[1]"]
    assert shifted.exit_code == EXIT_DRIFTED
    assert shifted.sites[0].left and shifted.sites[0].surrogate_error > shifted.sites[0].allowed_error
    assert shifted.reasons()[0].startswith("act (gelu): surrogate off by")
    # Without the ONNX Runtime check in the report its allowance is ORT's fp32 floor, and the result says so.
    bare = recheck(model, compiled.report, tmp_path / "model.onnx", torch.rand(30, 4, generator=generator))
    assert bare.allowed == compiled.report["guarantee"]["allowed"] + ORT_CPU_RTOL and "no ONNX Runtime check" in bare.notes[0]
    # A file exported with its batch fixed to 1 runs a sample at a time.
    with pytest.warns(DeprecationWarning):  # the TorchScript exporter: no dynamic axes unless asked for
        torch.onnx.export(compiled.module, (calibration[:1],), tmp_path / "static.onnx", dynamo=False)
    assert onnx_input_spec(tmp_path / "static.onnx").fixed_batch == 1
    static = recheck(model, report, tmp_path / "static.onnx", torch.rand(30, 4, generator=generator))
    assert static.exit_code == EXIT_HOLDS and static.samples == 30


class WritesIntoItsInput(DriftNet):
    def forward(self, x):
        x.mul_(2.0)
        return super().forward(x)


def test_a_model_that_writes_into_its_input_leaves_the_data_alone(tmp_path):
    model = WritesIntoItsInput().eval()
    digits = load_calibration("builtin:digits")
    compiled = compile_model(model, digits[:COMPILED_SAMPLES])
    exported = export_onnx(compiled.module, digits[:1].clone(), tmp_path / "model.onnx", exporter="torchscript",
                           verify_inputs=[digits[:8]])
    data = digits[COMPILED_SAMPLES : COMPILED_SAMPLES + 200]
    before = data.clone()

    result = recheck(model, with_export(compiled.report, exported), tmp_path / "model.onnx", data)

    assert result.exit_code == EXIT_HOLDS, result.reasons()
    assert torch.equal(data, before)


def test_the_model_digest_names_the_weights_in_float32():
    model = DriftNet()

    assert model_digest(model.half()) == model_digest(model.half().float())  # the compile digests its fp32 copy
    assert model_digest(DriftNet()) != model_digest(DriftNet(seed=1))
