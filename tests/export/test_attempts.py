"""export_onnx's attempts: batch-1 examples, exporter and static-batch fallbacks, the measured tolerance,
non-finite outputs, and torch's logs kept off the console."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from egp_export.analysis.numerics import NOISE_FACTOR, ORT_CPU_RTOL, compare, fp32_noise
from egp_export.errors import ExportError, OutputError, VerificationError
from egp_export.export import onnx as onnx_export
from egp_export.export.onnx import ORT_NOISE_CAP, export_onnx, measured_rtol, ort_session, run_onnx
from egp_export.report.report import to_markdown, with_export


class CircularConv(nn.Module):
    """Circular padding: torch.export specializes a batch of 1 here ("Invalid ranges [2:1]", torch 2.14)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular")

    def forward(self, x):
        return self.conv(x).relu()


class BatchAsInt(nn.Module):
    """Specializes the batch size: int() makes it a Python constant while tracing."""

    def forward(self, x):
        batch = int(x.shape[0])
        return x.reshape(batch, -1).mean(1)


class Cancellation(nn.Module):
    """y = (w.x) - (w.x + 0.1) = -0.1: fp32 rounds w.x + 0.1 to the ulp of w.x, and the difference keeps that error.

    Its own fp32 noise (vs fp64) is a few 1e-6, like timm's fused BatchNorm models: 8x that exceeds 1e-5.
    """

    def __init__(self, scale: float = 5.0):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, 2)
        with torch.no_grad():
            w = torch.randn(16) * scale / 4
            self.fc.weight.copy_(torch.stack([w, w]))
            self.fc.bias.copy_(torch.tensor([0.0, 0.1]))
        self.diff = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.diff.weight.copy_(torch.tensor([[1.0, -1.0]]))

    def forward(self, x):
        return self.diff(self.fc(x))


class Infinite(nn.Module):
    def forward(self, x):
        return x.flatten(1) * float("inf")


def _fresh_error(model, path, batch_size):
    fresh = torch.randn(batch_size, 3, 8, 8)
    with torch.no_grad():
        expected = model(fresh)
    return compare(reference=expected, candidate=run_onnx(ort_session(path), fresh))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_batch_one_example_gives_a_dynamic_batch(tmp_path, exporter):
    model = CircularConv().eval()
    result = export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx", exporter=exporter)
    assert result.exporter == exporter and result.dynamic_batch and result.traced_batch == 2
    batch_dim = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.WhichOneof("value") == "dim_param"
    for batch_size in (1, 2, 5):
        assert _fresh_error(model, result.path, batch_size).within(ORT_CPU_RTOL)


def test_verification_covers_batch_one_and_another_batch():
    example = torch.randn(1, 3, 4, 4)
    traced, batches = onnx_export._plan(example, [("the example input", example)], dynamic=True)
    assert traced.shape[0] == 2 and torch.equal(traced[0], example[0]) and torch.equal(traced[1], example[0])
    assert sorted(batch.shape[0] for _, batch in batches) == [1, 3]
    given = [("verify input 0", torch.randn(5, 3, 4, 4))]
    traced, batches = onnx_export._plan(torch.randn(2, 3, 4, 4), given, dynamic=True)
    # 5 is another batch than the traced 2; each of the 5 samples is also checked alone.
    assert sorted(batch.shape[0] for _, batch in batches) == [1, 1, 1, 1, 1, 5]


def test_static_plan_verifies_in_batches_of_the_examples_size():
    example = torch.randn(2, 3, 4, 4)
    given = [("verify input 0", torch.randn(5, 3, 4, 4)), ("verify input 1", torch.randn(2, 3, 4, 4))]
    traced, batches = onnx_export._plan(example, given, dynamic=False)
    assert traced is example
    # 7 samples: the last batch is filled up with the first sample, so every sample is checked.
    assert [batch.shape[0] for _, batch in batches] == [2, 2, 2, 2]
    assert torch.equal(torch.cat([batch for _, batch in batches])[:7], torch.cat([batch for _, batch in given]))


def test_static_plan_without_a_full_batch_verifies_on_the_example():
    example = torch.randn(4, 3, 4, 4)
    traced, batches = onnx_export._plan(example, [("verify input 0", torch.randn(3, 3, 4, 4))], dynamic=False)
    assert traced is example and len(batches) == 1 and batches[0][1] is example


def _failing_dynamo(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    real_export = torch.onnx.export

    def export(*args, **kwargs):
        calls.append(kwargs["dynamo"])
        if kwargs["dynamo"]:
            raise RuntimeError("dynamo cannot capture this module")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)
    return calls


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    calls = _failing_dynamo(monkeypatch)
    model = CircularConv().eval()
    result = export_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert calls == [True, False]
    assert result.exporter == "torchscript" and result.exporter_requested == "auto" and result.dynamic_batch
    (attempt,) = result.failed_attempts
    assert attempt.exporter == "dynamo" and attempt.dynamic_batch and "dynamo cannot capture" in attempt.failure
    assert "torchscript exporter, dynamic batch, after: dynamo (dynamic batch)" in result.why()
    assert _fresh_error(model, result.path, 3).within(ORT_CPU_RTOL)
    report = with_export({"verification": {}}, result)
    assert report["onnx"]["failed_attempts"][0]["exporter"] == "dynamo"
    assert "dynamo cannot capture" in to_markdown(report)


def test_a_named_exporter_has_no_fallback(tmp_path, monkeypatch):
    calls = _failing_dynamo(monkeypatch)
    with pytest.raises(ExportError, match=r"dynamo cannot capture.*no file was written.*--exporter torchscript or auto"):
        export_onnx(CircularConv().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", exporter="dynamo")
    assert calls == [True]
    assert not any(tmp_path.iterdir())


def test_static_batch_is_the_last_resort_and_only_when_allowed(tmp_path):
    model, example = BatchAsInt().eval(), torch.randn(2, 3, 4, 4)
    with pytest.raises(VerificationError) as refused:  # TorchScript's file ran, wrongly, at batch 3
        export_onnx(model, example, tmp_path / "m.onnx")
    message = str(refused.value)
    assert "dynamo (dynamic batch): " in message and "torchscript (dynamic batch): " in message
    assert "--static-batch (static_batch=True)" in message
    assert not any(tmp_path.iterdir())

    result = export_onnx(model, example, tmp_path / "m.onnx", static_batch=True)
    assert result.exporter == "dynamo" and not result.dynamic_batch and result.traced_batch == 2
    assert [(a.exporter, a.dynamic_batch) for a in result.failed_attempts] == [("dynamo", True), ("torchscript", True)]
    dims = onnx.load(result.path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [2, 3, 4, 4]
    assert "static batch 2" in result.why()


def test_measured_rtol_follows_the_modules_own_noise(tmp_path):
    model, x = Cancellation().eval(), torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    noise = fp32_noise(model, [x[:4]])
    assert NOISE_FACTOR * noise > ORT_CPU_RTOL  # the subject is noisy enough to matter
    result = export_onnx(model, x, tmp_path / "m.onnx", exporter="torchscript")
    assert result.rtol_measured
    assert result.rtol == pytest.approx(max(ORT_CPU_RTOL, min(NOISE_FACTOR * noise, ORT_NOISE_CAP)))
    assert result.rtol > ORT_CPU_RTOL and any("own fp32 error" in note for note in result.notes)
    assert result.error.within(result.rtol)


def test_measured_rtol_is_capped_and_floored(monkeypatch):
    model, x = Cancellation().eval(), torch.randn(4, 16)
    monkeypatch.setattr(onnx_export, "fp32_noise", lambda module, batches: 1.0)
    assert measured_rtol(model, x) == (ORT_NOISE_CAP, 1.0)
    monkeypatch.setattr(onnx_export, "fp32_noise", lambda module, batches: 0.0)
    assert measured_rtol(model, x) == (ORT_CPU_RTOL, 0.0)


def test_a_given_rtol_is_used_as_is(tmp_path):
    result = export_onnx(Cancellation().eval(), torch.randn(8, 16), tmp_path / "m.onnx", exporter="torchscript", rtol=1e-3)
    assert result.rtol == 1e-3 and not result.rtol_measured
    assert not any("own fp32 error" in note for note in result.notes)


def test_an_infinite_output_fails_verification(tmp_path):
    with pytest.raises(VerificationError, match="non-finite.*so does the PyTorch module"):
        export_onnx(Infinite().eval(), torch.randn(2, 3, 4, 4), tmp_path / "m.onnx", exporter="torchscript", rtol=1e-5)
    assert not any(tmp_path.iterdir())


def test_an_infinite_onnx_runtime_value_fails_verification(tmp_path, monkeypatch):
    real_run_onnx = onnx_export.run_onnx

    def one_inf(session, inputs):
        outputs = real_run_onnx(session, inputs)
        outputs[0] = outputs[0].copy()
        outputs[0].flat[0] = np.inf
        return outputs

    monkeypatch.setattr(onnx_export, "run_onnx", one_inf)
    with pytest.raises(VerificationError, match=r"ONNX Runtime gives 1 non-finite values") as failure:
        export_onnx(CircularConv().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", exporter="torchscript")
    assert "so does the PyTorch module" not in str(failure.value)
    assert not any(tmp_path.iterdir())


def _chatty_failing_export(monkeypatch):
    """torch.onnx.export that talks on every channel torch uses, then fails."""

    def export(*args, **kwargs):
        logging.getLogger("torch._guards").error("E-line: Error while creating guard")
        logging.getLogger("torch.export").warning("W-line from torch.export")
        logging.getLogger("onnxscript.rewriter").warning("W-line from onnxscript")
        warnings.warn("exporter chatter", UserWarning, stacklevel=1)
        print("[torch.onnx] printed to stdout")
        print("Traceback (most recent call last): printed to stderr", file=sys.stderr)
        raise RuntimeError("cannot export this")

    monkeypatch.setattr(torch.onnx, "export", export)


def test_a_failed_export_keeps_torchs_logs_off_the_console_and_in_the_log(tmp_path, monkeypatch, capfd):
    _chatty_failing_export(monkeypatch)
    log = tmp_path / "export.log"
    with pytest.raises(ExportError, match=f"Torch's log of the export: {log}"):
        export_onnx(CircularConv().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", log_path=log, rtol=1e-5)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    text = log.read_text()
    for line in ("Error while creating guard", "W-line from torch.export", "W-line from onnxscript", "exporter chatter",
                 "printed to stdout", "printed to stderr", "RuntimeError: cannot export this"):
        assert line in text, line
    assert text.count("cannot export this") >= 2  # both attempts (dynamo, TorchScript) are in the log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.log"]
    assert logging.getLogger("torch._dynamo").handlers  # torch's own handlers are back


def test_a_log_that_cannot_be_written_does_not_hide_the_export_error(tmp_path, monkeypatch):
    _chatty_failing_export(monkeypatch)

    def unwritable(*args, **kwargs):
        raise PermissionError("the log's folder became read-only during the export")

    monkeypatch.setattr(onnx_export, "write_text_atomic", unwritable)
    log = tmp_path / "export.log"
    with pytest.raises(ExportError, match="cannot export this") as failure:
        export_onnx(CircularConv().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", log_path=log, rtol=1e-5)
    assert "log of the export" not in str(failure.value) and not any(tmp_path.iterdir())  # no log, and none named


class Untouchable(nn.Module):
    def forward(self, x):
        raise AssertionError("the module ran before the outputs were checked")


def test_an_unwritable_log_path_is_refused_before_any_work(tmp_path):
    """The log follows the rule of every output: checked first, never replaced without force."""
    with pytest.raises(OutputError, match="is a directory"):
        export_onnx(Untouchable().eval(), torch.randn(2, 3), tmp_path / "m.onnx", log_path=tmp_path)
    log = tmp_path / "export.log"
    log.write_text("an earlier log")
    with pytest.raises(OutputError, match=f"{log} already exists; pass --force"):
        export_onnx(Untouchable().eval(), torch.randn(2, 3), tmp_path / "m.onnx", log_path=log)
    assert log.read_text() == "an earlier log" and sorted(p.name for p in tmp_path.iterdir()) == ["export.log"]


def test_a_log_that_appears_during_the_export_is_kept_and_the_new_one_written_beside_it(tmp_path, monkeypatch):
    """Regression: a failed export replaced an existing log without force."""
    _chatty_failing_export(monkeypatch)
    log = tmp_path / "export.log"

    class WritesTheLog(CircularConv):
        def forward(self, x):
            if not log.exists():
                log.write_text("another run's log")  # appears after the up-front check
            return super().forward(x)

    with pytest.raises(ExportError, match="cannot export this") as failure:
        export_onnx(WritesTheLog().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", log_path=log, rtol=1e-5)
    assert log.read_text() == "another run's log"
    (beside,) = [p for p in tmp_path.iterdir() if p != log]
    assert beside.name.startswith("export.") and beside.suffix == ".log"
    assert f"Torch's log of the export: {beside}" in str(failure.value)
    assert "RuntimeError: cannot export this" in beside.read_text()


def test_show_logs_leaves_them_on_the_console(tmp_path, monkeypatch, capfd):
    _chatty_failing_export(monkeypatch)
    with pytest.raises(ExportError):
        export_onnx(CircularConv().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", show_logs=True, rtol=1e-5,
                    exporter="torchscript")
    captured = capfd.readouterr()
    assert "printed to stdout" in captured.out
    assert "Error while creating guard" in captured.err and "printed to stderr" in captured.err


def test_a_real_dynamo_failure_prints_nothing(tmp_path):
    # Also shows that CircularConv is a real test subject: torch.export fails on it at batch 1.
    # The ~150 lines of torch/_guards.py logs that a batch-1 ConvNeXt export printed, in a fresh process
    # (torch configures its log handlers at import): none reaches stderr, all reach the log.
    script = textwrap.dedent(
        f"""
        import io, sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from egp_export.export.onnx import _captured
        from subject import CircularConv
        log = io.StringIO()
        try:
            with _captured(log, [], show=False):
                torch.onnx.export(CircularConv().eval(), (torch.randn(1, 3, 8, 8),), dynamo=True,
                                  dynamic_shapes=({{0: torch.export.Dim("batch")}},))
        except Exception as error:
            print("failed as expected:", type(error).__name__)
        print("log lines:", len(log.getvalue().splitlines()))
        print("guard lines:", log.getvalue().count("_guards"))
        """
    )
    (tmp_path / "subject.py").write_text(
        "import torch\nfrom torch import nn\n\n\n" + textwrap.dedent(_source(CircularConv))
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert "failed as expected" in run.stdout
    lines = dict(line.split(": ") for line in run.stdout.splitlines() if line.startswith(("log lines", "guard lines")))
    assert int(lines["log lines"]) > 20 and int(lines["guard lines"]) > 0


def _source(cls) -> str:
    import inspect

    return inspect.getsource(cls)
