"""Errors a user can cause, each with a message that says what to do.

The CLI prints ``str(error)`` and exits non-zero without a traceback for every
subclass of :class:`EgpExportError`; anything else is a bug in egp-export.
"""

from __future__ import annotations


class EgpExportError(Exception):
    """Base class of every error caused by the user's input or environment."""

    exit_code = 2


class CheckpointError(EgpExportError):
    """A checkpoint is missing, corrupt, or does not fit the architecture."""


class ArchitectureError(EgpExportError):
    """An ``--arch`` specification cannot be resolved to a model factory."""


class OptionError(EgpExportError, ValueError):
    """An option or argument is out of its range or not finite (a ValueError too, like Python's own checks)."""


class UnsupportedModelError(EgpExportError, ValueError):
    """The model lacks what a measure or method needs (residual units of a known type)."""


class TrainingError(EgpExportError):
    """Fine-tuning diverged: a loss, weight, buffer or output became NaN or infinite."""


class CalibrationError(EgpExportError):
    """Calibration data is empty, non-finite, or shaped wrongly for the model."""


class TraceError(EgpExportError):
    """The model cannot be captured as a torch.fx graph."""


class OutputError(EgpExportError):
    """An output path exists (and ``force`` was not given) or is not writable."""


class ExportError(EgpExportError):
    """ONNX export, simplification or checking failed."""


class PassError(EgpExportError):
    """A rewrite pass cannot run: a fact it reads (shapes, calibrated sites) was never computed, or it failed.

    The message names the pass; a failure inside the pass chains the original exception.
    """


class VerificationError(EgpExportError):
    """A compiled or exported model does not match the original within tolerance."""

    exit_code = 3


class ReportError(EgpExportError):
    """A compile's outputs (report.json, model.onnx) are missing, unreadable, or belong to another model."""
