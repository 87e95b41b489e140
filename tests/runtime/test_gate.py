"""The latency gate on real ONNX models (ONNX Runtime CPU): exit codes, numeric failure, JUnit and Markdown."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from torch import nn

from egp_export.cli.perf import main
from egp_export.errors import OutputError
from egp_export.runtime.backends import BackendError
from egp_export.runtime.gate import (
    EXIT_FAILED,
    EXIT_PASSED,
    check_numerics,
    evaluate,
    gate,
    to_junit_xml,
    to_markdown,
    write_junit,
    write_summary,
)
from egp_export.runtime.profiler import Comparison
from tests.perf_models import CHANNELS, SAMPLE_SHAPE, conv_stack, export_model

# Few, short rounds: the models differ by >5x, so the interval is far from the thresholds used here.
FAST = ["--rounds", "5", "--iterations", "8", "--warmup", "3"]
FAST_KW = {"rounds": 5, "iterations": 8, "warmup": 3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {name: export_model(name, folder) for name in ("shallow", "deep", "perturbed")}


def fake_comparison(speedup: float, ci: tuple[float, float]) -> Comparison:
    rounds = np.full((4, 3), 1.0)
    return Comparison(
        backend={"backend": "ort-cpu", "threads": 1},
        clock="perf_counter_ns",
        batch_size=1,
        input_shape=(1, 3, 16, 16),
        baseline_rounds=rounds * speedup,
        candidate_rounds=rounds,
        orders=[("baseline", "candidate"), ("candidate", "baseline")] * 2,
        speedup=speedup,
        ci=ci,
        confidence=0.95,
        resamples=2000,
        seed=0,
        baseline="baseline.onnx",
        candidate="candidate.onnx",
    )


# The decision -------------------------------------------------------------------------------


def test_the_lower_bound_decides_not_the_point_estimate():
    assert evaluate(fake_comparison(1.5, (1.21, 1.8)), min_speedup=1.2).passed
    lucky = evaluate(fake_comparison(1.5, (1.19, 1.8)), min_speedup=1.2)
    assert not lucky.passed and lucky.exit_code == EXIT_FAILED
    assert "starts at 1.190x, below the required 1.200x" in lucky.reasons[0]


# Library on real models -----------------------------------------------------------------------


def test_clearly_faster_candidate_passes(models):
    result = gate(models["deep"], models["shallow"], min_speedup=2.0, max_rel_error=1e-5, **FAST_KW)
    assert result.passed and result.exit_code == EXIT_PASSED
    assert result.comparison.ci[0] >= 2.0
    assert result.numeric.error.max_rel == 0.0  # identity convolutions are exact
    assert result.comparison.baseline_rounds.shape == (5, 8)
    assert result.verdict().startswith("egp-export gate: PASS: speedup ")


def test_clearly_slower_candidate_fails(models):
    result = gate(models["shallow"], models["deep"], min_speedup=1.0, **FAST_KW)
    assert not result.passed
    assert result.comparison.speedup < 0.5 and result.comparison.ci[1] < 1.0
    assert result.numeric is None
    assert "FAIL" in result.verdict()


def test_perturbed_model_fails_on_numerics_alone(models):
    result = gate(models["deep"], models["perturbed"], min_speedup=0.5, max_rel_error=1e-5, **FAST_KW)
    assert result.latency_passed  # same architecture: about 1x, far above 0.5x
    assert not result.numeric.passed and result.numeric.error.max_rel > 1e-3
    assert not result.passed
    assert len(result.reasons) == 1 and "outputs differ" in result.reasons[0]
    assert "max rel error" in result.verdict() and "> 1e-05" in result.verdict()


# Writers ------------------------------------------------------------------------------------------


def test_junit_has_a_failure_element_when_failing(models, tmp_path):
    result = gate(models["deep"], models["perturbed"], min_speedup=0.5, max_rel_error=1e-5, **FAST_KW)
    path = write_junit(result, tmp_path / "gate.xml")
    root = ET.parse(path).getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1"
    cases = {case.get("classname"): case for case in root.iter("testcase")}
    assert set(cases) == {"egp_export.gate.latency", "egp_export.gate.numerics"}
    assert cases["egp_export.gate.latency"].find("failure") is None
    failure = cases["egp_export.gate.numerics"].find("failure")
    assert failure is not None and "outputs differ" in failure.get("message")
    properties = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert float(properties["ci_low"]) <= float(properties["speedup"]) <= float(properties["ci_high"])


def test_junit_and_markdown_of_a_pass():
    result = evaluate(fake_comparison(2.0, (1.9, 2.1)), min_speedup=1.5)
    root = ET.fromstring(to_junit_xml(result))
    assert root.get("failures") == "0" and not list(root.iter("failure"))
    markdown = to_markdown(result)
    assert "✅ PASS" in markdown and "| baseline | `baseline.onnx` |" in markdown
    assert "Why it failed" not in markdown


def test_markdown_of_a_failure_says_why(tmp_path):
    result = evaluate(fake_comparison(1.1, (1.0, 1.2)), min_speedup=1.5)
    path = write_summary(result, tmp_path / "summary.md")
    text = path.read_text(encoding="utf-8")
    assert "❌ FAIL" in text and "**Why it failed:**" in text and "below the required 1.500x" in text


def test_writers_do_not_overwrite_without_force(tmp_path):
    result = evaluate(fake_comparison(2.0, (1.9, 2.1)), min_speedup=1.5)
    for writer, name in ((write_junit, "gate.xml"), (write_summary, "gate.md")):
        path = tmp_path / name
        path.write_text("keep me", encoding="utf-8")
        with pytest.raises(OutputError, match="already exists"):
            writer(result, path)
        assert path.read_text(encoding="utf-8") == "keep me"
        writer(result, path, force=True)
        assert path.read_text(encoding="utf-8") != "keep me"


# Command line --------------------------------------------------------------------------------------


def test_cli_exit_codes_and_verdict_last(models, tmp_path, capsys):
    junit, summary = tmp_path / "pass.xml", tmp_path / "pass.md"
    code = main(["gate", str(models["deep"]), str(models["shallow"]), "--min-speedup", "2", "--max-rel-error", "1e-5",
                 "--junit", str(junit), "--summary", str(summary), *FAST])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert lines[-1].startswith("egp-export gate: PASS")
    assert ET.parse(junit).getroot().get("failures") == "0"
    assert "✅ PASS" in summary.read_text(encoding="utf-8")

    code = main(["gate", str(models["shallow"]), str(models["deep"]), "--min-speedup", "1", *FAST])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1].startswith("egp-export gate: FAIL")


def test_cli_refuses_to_overwrite_before_timing(models, tmp_path, capsys):
    existing = tmp_path / "gate.xml"
    existing.write_text("keep me", encoding="utf-8")
    code = main(["gate", str(models["deep"]), str(models["shallow"]), "--min-speedup", "2", "--junit", str(existing), *FAST])
    captured = capsys.readouterr()
    assert code == OutputError.exit_code
    assert "egp-export: error:" in captured.err and "--force" in captured.err
    assert "gate:" not in captured.out  # nothing was timed
    assert existing.read_text(encoding="utf-8") == "keep me"
    code = main(["gate", str(models["deep"]), str(models["shallow"]), "--min-speedup", "2", "--junit", str(existing),
                 "--force", *FAST])  # fmt: skip
    assert code == 0 and ET.parse(existing).getroot().tag == "testsuites"


def test_cli_missing_model_is_an_error_not_a_traceback(tmp_path, capsys):
    code = main(["gate", str(tmp_path / "a.onnx"), str(tmp_path / "b.onnx"), "--min-speedup", "1", *FAST])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("egp-export: error:") and "does not exist" in captured.err
    assert "Traceback" not in captured.err


def test_cli_in_a_subprocess_fails_with_exit_code_1(models):
    """The real process exit code a CI system sees, and the verdict as the last line of stdout."""
    command = [
        sys.executable,
        "-c",
        "import sys; from egp_export.cli.perf import main; sys.exit(main())",
        "gate",
        str(models["deep"]),
        str(models["perturbed"]),
        "--min-speedup",
        "0.5",
        "--max-rel-error",
        "1e-5",
        *FAST,
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.strip().splitlines()[-1].startswith("egp-export gate: FAIL")
    assert "Traceback" not in completed.stderr


# Inputs that differ ---------------------------------------------------------------------------------


def _cast_model(path, input_dtype: int, output_dtype: int, shape=(3, 16, 16)):
    """A one-node ONNX model: Cast from ``input_dtype`` to ``output_dtype`` (dynamic batch)."""
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["output"], to=output_dtype)],
        "cast",
        [helper.make_tensor_value_info("input", input_dtype, ["batch", *shape])],
        [helper.make_tensor_value_info("output", output_dtype, ["batch", *shape])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_input_shape_mismatch_is_a_clear_error_not_a_failed_gate(models, tmp_path, capsys):
    """Regression: ONNX Runtime raised from inside the numeric check, a traceback and exit 1 (a FAIL to CI)."""
    small = export_model("small", tmp_path)
    expected = r"different inputs: baseline 'input' \[B, 3, 16, 16\].*candidate 'input' \[B, 3, 8, 8\]"
    with pytest.raises(BackendError, match=expected):
        gate(models["deep"], small, min_speedup=1.0, max_rel_error=1e-5, **FAST_KW)
    with pytest.raises(BackendError, match="different inputs"):
        gate(models["deep"], small, min_speedup=1.0, **FAST_KW)  # no numeric check: refused before timing too
    code = main(["gate", str(models["deep"]), str(small), "--min-speedup", "1", "--max-rel-error", "1e-5", *FAST])
    captured = capsys.readouterr()
    assert code == BackendError.exit_code == 2
    assert captured.err.startswith("egp-export: error:") and "different inputs" in captured.err
    assert "Traceback" not in captured.err and "gate:" not in captured.out


def test_dtype_differences_are_reported(tmp_path):
    from onnx import TensorProto

    baseline = _cast_model(tmp_path / "baseline.onnx", TensorProto.FLOAT, TensorProto.FLOAT)
    half_input = _cast_model(tmp_path / "half_input.onnx", TensorProto.FLOAT16, TensorProto.FLOAT)
    half_output = _cast_model(tmp_path / "half_output.onnx", TensorProto.FLOAT, TensorProto.FLOAT16)

    result = gate(baseline, half_input, min_speedup=0.01, max_rel_error=1e-2, **FAST_KW)
    assert result.notes == ["input dtype differs: baseline float32, candidate float16"]
    assert "input dtype differs" in result.verdict() and "input dtype differs" in to_markdown(result)

    result = gate(baseline, half_output, min_speedup=0.01, max_rel_error=1e-2, **FAST_KW)
    assert result.notes == ["output 0 dtype differs: baseline float32, candidate float16"]
    assert result.to_dict()["numeric"]["notes"] == result.notes


# Non-finite outputs --------------------------------------------------------------------------------


class _Overflow(nn.Module):
    """The conv stack with its output scaled past float32's range at channel 0: +inf there for positive values."""

    def __init__(self, overflow: bool) -> None:
        super().__init__()
        self.body = conv_stack(0)
        scale = torch.ones(1, CHANNELS, 1, 1)
        scale[0, 0] = 1e38 if overflow else 1.0
        self.register_buffer("scale", scale)

    def forward(self, x):
        return self.body(x) * self.scale * self.scale


def _export(module: nn.Module, path) -> str:
    torch.onnx.export(module.eval(), (torch.randn(2, *SAMPLE_SHAPE),), str(path), dynamo=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    return str(path)


def test_a_baseline_with_inf_outputs_fails_the_numeric_check(tmp_path):
    # Old compare: |inf - x| became 1.8e308 and was divided by an infinite scale: "max rel error 0.00e+00", passed.
    baseline = _export(_Overflow(overflow=True), tmp_path / "inf.onnx")
    candidate = _export(_Overflow(overflow=False), tmp_path / "finite.onnx")

    check = check_numerics(baseline, candidate, max_rel_error=1e-5)
    assert not check.passed and check.error.nonfinite_mismatches > 0 and check.error.max_rel == float("inf")
    result = evaluate(fake_comparison(2.0, (1.9, 2.1)), min_speedup=1.5, numeric=check)
    assert not result.passed and "inf/NaN in the baseline or the candidate" in result.reasons[0]
    # The same inf at the same places in both is equal output, not an error.
    assert check_numerics(baseline, baseline, max_rel_error=1e-5).passed


# Inputs the runtimes cannot feed --------------------------------------------------------------------


def _unfeedable_models(folder):
    """One-input ONNX models whose input is not a numeric tensor: (input type as the error names it, path)."""
    import onnx
    from onnx import TensorProto, helper

    float_tensor = helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", 4])
    types = {
        "sequence": helper.make_sequence_type_proto(float_tensor),
        "optional": helper.make_optional_type_proto(float_tensor),
        "map": helper.make_map_type_proto(TensorProto.INT64, float_tensor),
        "sparse": helper.make_sparse_tensor_type_proto(TensorProto.FLOAT, ["batch", 4]),
        "string": helper.make_tensor_type_proto(TensorProto.STRING, ["batch", 4]),
    }
    paths = {}
    for kind, type_proto in types.items():
        graph = helper.make_graph(
            [helper.make_node("Identity", ["input"], ["output"])],
            kind,
            [helper.make_value_info("input", type_proto)],
            [helper.make_value_info("output", type_proto)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        paths[kind] = folder / f"{kind}.onnx"
        onnx.save(model, str(paths[kind]))
    return paths


def test_inputs_that_cannot_be_fed_are_named_with_their_type(models, tmp_path, capsys):
    """Regression: a tensor-sequence input raised AttributeError/TypeError from inside the gate (a traceback)."""
    from egp_export.runtime.inputs import onnx_input_spec

    expected = {"sequence": "sequence of tensor(float)", "optional": "optional tensor(float)",
                "map": "map(int64, tensor(float))", "sparse": "sparse tensor(float)", "string": "tensor(string)"}
    for kind, path in _unfeedable_models(tmp_path).items():
        with pytest.raises(BackendError, match=rf"input 'input' has type {re.escape(expected[kind])}; .*numeric tensor"):
            onnx_input_spec(path)
        for argv in (
            ["gate", str(models["deep"]), str(path), "--min-speedup", "1", *FAST],
            ["gate", str(path), str(models["deep"]), "--min-speedup", "1", "--max-rel-error", "1e-5", *FAST],
            ["profile", str(path), "--iterations", "2", "--warmup", "0", "--quiet"],
        ):
            code = main(argv)
            captured = capsys.readouterr()
            assert code == 2, (kind, argv, captured.err)
            assert captured.err.startswith("egp-export: error:") and "'input'" in captured.err, captured.err
            assert expected[kind] in captured.err and "Traceback" not in captured.err, captured.err
            assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_profile_html_without_out_is_refused_not_ignored(models, capsys):
    """Regression: --html without --out was accepted and wrote nothing."""
    code = main(["profile", str(models["shallow"]), "--html", "--iterations", "2", "--warmup", "0"])
    captured = capsys.readouterr()
    assert code == OutputError.exit_code == 2
    assert captured.err.startswith("egp-export: error: --html writes profile.html into the --out folder")
    assert captured.out == "" and "Traceback" not in captured.err
