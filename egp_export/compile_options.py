"""What a compile is asked to do: one frozen ``CompileOptions``, every value checked here and nowhere else.

``compile(model, calibration, options, **overrides)`` takes one (the command
line builds one from its flags); keyword arguments override its fields.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

from egp_export.algebra.costmodel import AnalyticCost
from egp_export.analysis.batches import DEFAULT_BATCH_SIZE, DEFAULT_SPLIT_SEED
from egp_export.analysis.capture import FRONTENDS
from egp_export.analysis.crossings import DEFAULT_CROSSING_RADIUS
from egp_export.errors import CalibrationError, EgpExportError, OptionError
from egp_export.measured_cost import MeasuredCost
from egp_export.passes import CHANNEL_ALIGNMENT

# Fraction of the calibration samples (before the verification part) used only to withdraw rewrites.
DEFAULT_VALIDATION = 0.2
# A site is rewritten only if each neuron was observed at least this often
# (samples x positions) on the decide split: with n observations and no
# crossing, the 95% bound on the crossing rate is 3/n (0.6% at 500). A
# squeeze-excitation site sees one observation per sample, so it needs 500
# samples where a conv site on 8x8 maps needs 8.
DEFAULT_MIN_OBSERVATIONS = 500
MERGE_PLANS = ("cost", "all")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_tolerance(tolerance: float) -> None:
    """Refuse a tolerance no check can use: negative, inf or NaN (inf would make every check fail, "8.5e-08 >
    allowed inf", and NaN compares false with everything)."""
    if not _is_number(tolerance) or not math.isfinite(tolerance) or tolerance < 0:
        raise CalibrationError(
            f"tolerance must be a finite number >= 0, got {tolerance!r}; give the relative error smooth-activation "
            "surrogates and border-approximate merges may add (e.g. 1e-5, the default)."
        )


def resolve_cost_model(cost_model):
    """A cost object from ``None``/"analytic"/"measured" or one given as is."""
    if cost_model is None or cost_model == "analytic":
        return AnalyticCost()
    if cost_model == "measured":
        return MeasuredCost()
    if hasattr(cost_model, "conv_seconds"):
        return cost_model
    raise OptionError(f"cost_model must be 'analytic', 'measured' or a cost object, got {cost_model!r}")


@dataclass(frozen=True)
class CompileOptions:
    """Every option of ``compile``, checked when the object is made (``but(**overrides)``: a copy, checked again).

    ``tolerance`` (finite, >= 0, else CalibrationError) bounds what
    smooth-activation surrogates and border-approximate merges may add to the
    error. ``holdout`` / ``validation``: the fractions of the samples kept
    to verify and to withdraw rewrites (validation is unused with
    ``strict``, which raises VerificationError as soon as the check fails
    instead of backing off). A site is only rewritten if each neuron was
    observed ``min_observations`` times (distinct samples x positions).
    ``crossing_radius`` (0 disables) bounds a gradient search from the
    validation samples (analysis/crossings.py) for inputs within that
    fraction of each input feature's std that move a rewritten neuron out of
    its region; such neurons are withdrawn. ``batch_size``: samples per batch.
    ``approximate`` allows conv merges that are exact only away from the
    border; ``cost_model`` ("analytic", "measured", or a cost object from
    costmodel.py) decides which merges pay; ``merge_plan="all"`` merges every
    conv chain whole; ``conv_merging=False`` stops before conv-chain and
    residual merging (the padding plan inspects the chains left).
    ``channel_alignment`` (default 8) keeps channel counts left by
    dead-channel removal at multiples of it (ONNX Runtime's CPU kernels run
    odd counts far slower); 1 removes every dead channel. ``steps`` replaces
    the pass pipeline (``passes.default_steps``). ``split_seed`` seeds the
    split. ``debug`` checks numerics after every pass and names the pass that
    broke them; ``progress`` shows a bar over the calibration batches.
    ``leaf_modules`` (submodule names or types) are captured as single calls,
    as are submodules torch.fx cannot trace through; the report's ``trace``
    section lists them. ``frontend``: how the model becomes a graph, one of
    ``analysis.capture.FRONTENDS``. ``on_stage`` is called with a
    ``StageEvent`` as each stage starts and ends (the command line prints
    them on a terminal). ``runtime`` (one rank of a torchrun job,
    ``egp_export.distributed.runtime_from_env()``) splits the
    calibration, validation and verification work over the ranks and merges
    their statistics and errors exactly: every rank returns the same module
    and report (every rank must be given the same calibration data; the
    measured cost model is refused, its timings differ between processes).
    """

    tolerance: float = 1e-5
    holdout: float = 0.2
    validation: float = DEFAULT_VALIDATION
    strict: bool = False
    min_observations: int = DEFAULT_MIN_OBSERVATIONS
    crossing_radius: float = DEFAULT_CROSSING_RADIUS
    batch_size: int = DEFAULT_BATCH_SIZE
    approximate: bool = False
    cost_model: object = None
    merge_plan: str = "cost"
    channel_alignment: int = CHANNEL_ALIGNMENT
    conv_merging: bool = True
    steps: tuple | None = None
    split_seed: int = DEFAULT_SPLIT_SEED
    debug: bool = False
    progress: bool = False
    leaf_modules: tuple = ()
    frontend: str = "fx"
    on_stage: Callable | None = None
    runtime: object = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        if self.steps is not None:
            object.__setattr__(self, "steps", tuple(self.steps))
        check_tolerance(self.tolerance)
        for name in ("holdout", "validation"):
            fraction = getattr(self, name)
            if not _is_number(fraction) or not 0.0 <= fraction < 1.0:
                raise CalibrationError(f"{name} fraction must be in [0, 1), got {fraction!r}.")
        if not _is_integer(self.min_observations) or self.min_observations < 0:
            raise CalibrationError(f"min_observations must be >= 0 (a whole number), got {self.min_observations!r}.")
        if not _is_number(self.crossing_radius) or not math.isfinite(self.crossing_radius) or self.crossing_radius < 0:
            raise CalibrationError(
                f"crossing_radius must be a finite number >= 0 (0 disables the search), got {self.crossing_radius}."
            )
        for name in ("batch_size", "channel_alignment"):
            value = getattr(self, name)
            if not _is_integer(value) or value < 1:
                raise OptionError(f"{name} must be an integer >= 1, got {value!r}.")
        if self.merge_plan not in MERGE_PLANS:
            raise OptionError(f"merge_plan must be one of {', '.join(MERGE_PLANS)}, got {self.merge_plan!r}.")
        if self.frontend not in FRONTENDS:
            raise OptionError(f"frontend must be one of {', '.join(FRONTENDS)}, got {self.frontend!r}.")
        if self.cost_model not in (None, "analytic", "measured") and not hasattr(self.cost_model, "conv_seconds"):
            raise OptionError(f"cost_model must be 'analytic', 'measured' or a cost object, got {self.cost_model!r}")
        measured = self.cost_model == "measured" or isinstance(self.cost_model, MeasuredCost)
        if measured and getattr(self.runtime, "world_size", 1) > 1:
            raise EgpExportError(
                "the measured cost model times convolutions in each process, so processes could plan different "
                "merges; use the analytic cost model (the default) when compiling under torchrun."
            )

    def but(self, **overrides) -> CompileOptions:
        """These options with ``overrides`` (checked again); an unknown name is refused."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"compile() got unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return replace(self, **overrides) if overrides else self
