"""What every egp-export command shares: argument types, the error contract, printing.

Imports nothing heavy, so ``egp-export --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from egp_export.errors import EgpExportError

PROG = "egp-export"
EXIT_INTERRUPTED = 130


def _number(parse: Callable[[str], float], accept: Callable[[float], bool], what: str):
    """An argparse type: ``parse`` the text, refuse NaN and infinities, then refuse what ``accept`` rejects.

    Every numeric option is one of these, so no command ever receives inf or nan
    (``float("inf")`` parses, and ``inf > 0`` holds).
    """

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number ({what}), got {text}")
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    convert.__name__ = what.replace(" ", "_")  # argparse names the type in its messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0.0, "a positive number")
non_negative_float = _number(float, lambda v: v >= 0.0, "a non-negative number")
fraction = _number(float, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
confidence = _number(float, lambda v: 0.0 < v < 1.0, "between 0 and 1")
holdout_fraction = _number(float, lambda v: 0.0 <= v < 1.0, "in [0, 1)")
agreement_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1] (0.99 for 99%)")


def dynamic_dim(text: str) -> tuple[str, int, str]:
    """An argparse type for ``--dynamic-dim INPUT:AXIS=NAME`` (``input_ids:1=seq``): (input, axis, name)."""
    name, _, rest = text.rpartition(":")
    axis, equals, dim = rest.partition("=")
    if not name or not equals or not axis.strip().isdigit() or not dim.isidentifier():
        raise argparse.ArgumentTypeError(
            f"must be INPUT:AXIS=NAME, e.g. input_ids:1=seq (an input of forward, an axis number, a name), got {text!r}"
        )
    return name, int(axis), dim


def dim_size(text: str) -> tuple[str, int]:
    """An argparse type for ``--dim NAME=SIZE`` (``seq=12``): a named dynamic dimension of a model's inputs and its size."""
    name, equals, size = text.partition("=")
    if not equals or not name.strip() or not size.strip().isdigit() or int(size) < 1:
        raise argparse.ArgumentTypeError(f"must be NAME=SIZE with a positive SIZE, e.g. seq=128, got {text!r}")
    return name.strip(), int(size)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run the chosen command; the exit status is 0, the command's own (the gate's 1), or the error's.

    Errors the user can cause print ``egp-export: error: ...`` without a
    traceback; warnings print as one line each.
    """
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.run(args) or 0
    except EgpExportError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def say(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(text, flush=True)


def progress(args: argparse.Namespace) -> bool:
    # A progress bar only where someone watches it; in logs it is noise.
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


class StageLine:
    """What a finished stage reports; the caller fills in ``detail``."""

    def __init__(self) -> None:
        self.detail = ""


@contextlib.contextmanager
def stage(args: argparse.Namespace, name: str, doing: str) -> Iterator[StageLine]:
    """On a terminal, ``name: doing ...`` before the block and ``name: detail, 3.2 s`` after it (on stderr).

    Stages take from seconds to minutes (an ONNX export of a ConvNeXt: a
    minute); a silent terminal looks hung. In logs (not a TTY) and with
    --quiet nothing is printed: the command's summary says what happened.
    """
    line = StageLine()
    shown = progress(args)
    if shown:
        print(f"{name}: {doing} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield line
    if shown:
        detail = f"{line.detail}, " if line.detail else ""
        print(f"{name}: {detail}{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def _fact(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def stage_events(args: argparse.Namespace):
    """A callback for ``compile(on_stage=...)`` printing each stage as ``stage`` does (terminal only), or None."""
    if not progress(args):
        return None

    def show(event) -> None:
        if not event.done:
            print(f"  {event.stage} ...", file=sys.stderr, flush=True)
            return
        facts = ", ".join(f"{name.replace('_', ' ')} {_fact(value)}" for name, value in event.facts.items())
        print(f"  {event.stage}: {facts + ', ' if facts else ''}{event.seconds:.1f} s", file=sys.stderr, flush=True)

    return show


# Data options shared by compile/analyze (calibration) and gate/engine/profile (--inputs) ------------------------


def add_image_preprocessing_arguments(group) -> None:
    """--normalize MEAN STD and --preset imagenet|timm on an argparse parser or group (io/datasets.py)."""
    group.add_argument(
        "--normalize",
        nargs=2,
        metavar=("MEAN", "STD"),
        help="normalise image sources per channel after scaling pixels to [0, 1]: (x - MEAN) / STD, each one number "
        "or comma-separated per channel (e.g. 0.485,0.456,0.406 0.229,0.224,0.225); recorded in the report",
    )
    group.add_argument(
        "--preset",
        choices=("imagenet", "timm"),
        help="image normalisation: imagenet (mean 0.485,0.456,0.406, std 0.229,0.224,0.225) or timm (the model's own, "
        "from timm's resolve_data_config; PyTorch timm models only)",
    )


def image_preprocessing(args: argparse.Namespace, model=None):
    """The ImagePreprocessing --normalize / --preset ask for (None without them)."""
    from egp_export.io.datasets import image_preprocessing as resolve
    from egp_export.io.datasets import parse_channel_values

    normalize = getattr(args, "normalize", None)
    pair = None if normalize is None else (parse_channel_values(normalize[0]), parse_channel_values(normalize[1]))
    return resolve(normalize=pair, preset=getattr(args, "preset", None), model=model)


def add_inputs_arguments(parser: argparse.ArgumentParser) -> None:
    """--inputs SPEC (and how to read it) and --val-range LOW HIGH (random inputs) for gate, engine and profile."""
    data = parser.add_argument_group("inputs")
    data.add_argument(
        "--inputs",
        metavar="SPEC",
        help="real inputs for the numeric check and the timing, in the forms --calibration takes (builtin:digits, "
        ".pt/.pth, .npy/.npz, a folder of images), e.g. the compile's held-out samples; without it, seeded random "
        "inputs, and the numeric check says it is not on real data",
    )
    data.add_argument("--inputs-limit", type=positive_int, metavar="N", help="use the first N samples of --inputs only")
    data.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"), help="resize images of an --inputs folder")
    add_image_preprocessing_arguments(data)
    data.add_argument(
        "--dim",
        action="append",
        type=dim_size,
        metavar="NAME=SIZE",
        help="size of a named dynamic dimension of the model's inputs besides the batch (e.g. seq=128; repeat for "
        "several); --inputs size them otherwise",
    )
    data.add_argument(
        "--val-range",
        nargs=2,
        type=_finite_float,
        metavar=("LOW", "HIGH"),
        help="random inputs uniform in [LOW, HIGH) instead of N(0, 1) (integer inputs: ids in [LOW, HIGH); default: "
        "the rows of the embedding table they index, else 0 or 1)",
    )


_finite_float = _number(float, lambda v: True, "a number")


def dims(args: argparse.Namespace) -> dict[str, int] | None:
    """The --dim sizes by name, or None; a name given twice with two sizes is refused."""
    from egp_export.errors import OptionError

    sizes: dict[str, int] = {}
    for name, size in args.dim or ():
        if sizes.get(name, size) != size:
            raise OptionError(f"--dim {name}= is given twice, as {sizes[name]} and {size}; give it once.")
        sizes[name] = size
    return sizes or None


def load_inputs(args: argparse.Namespace, model: Path | None = None):
    """(the --inputs batch, its name) or (None, None); refuses the options that only apply to the other case.

    With ``model`` an ONNX file of several inputs, a dict or ``.npz`` archive is read as one array per input name.
    """
    from egp_export.errors import OptionError
    from egp_export.io.datasets import load_calibration

    if args.val_range is not None:
        low, high = args.val_range
        if args.inputs is not None:
            raise OptionError("--val-range draws random inputs, and --inputs gives real ones; drop one of them.")
        if not low < high:
            raise OptionError(f"--val-range LOW HIGH needs LOW < HIGH, got {low:g} {high:g}.")
    if args.input_size is not None and args.inputs is not None and not Path(args.inputs).is_dir():
        raise OptionError(f"--input-size resizes the images of a folder, and {args.inputs} is not one; drop --input-size.")
    if args.inputs is None:
        given = [name for name in ("inputs_limit", "input_size", "normalize", "preset") if getattr(args, name) is not None]
        if given:
            options = ", ".join("--" + name.replace("_", "-") for name in given)
            raise OptionError(f"{options} read(s) the --inputs data, and no --inputs was given; add --inputs SPEC or drop them.")
        return None, None
    notes: list[str] = []
    data = load_calibration(
        args.inputs,
        input_size=tuple(args.input_size) if args.input_size else None,
        limit=args.inputs_limit,
        notes=notes,
        preprocessing=image_preprocessing(args),
        signature=_onnx_signature(model, args.inputs),
    )
    for note in notes:
        say(args, f"note: {note}")
    return data, args.inputs


def _onnx_signature(model: Path | None, spec: str):
    """The input names of an ONNX ``model`` with several inputs, as the signature load_calibration reads dicts by
    (none required: a missing one is refused by the runtime, naming the file's inputs); None otherwise.

    An ``.npz`` archive's keys are checked here first, so that a key that names no input of the file is refused
    naming the file's inputs."""
    from egp_export.analysis.batches import TARGET_KEYS
    from egp_export.analysis.inputs import Signature
    from egp_export.runtime.inputs import ENGINE_SUFFIXES, BackendError, onnx_declared_inputs

    if model is None or Path(model).suffix.lower() in ENGINE_SUFFIXES or not Path(model).is_file():
        return None
    names = tuple(value.name for value in onnx_declared_inputs(model)[0])
    if len(names) < 2:
        return None
    path = Path(spec)
    if path.suffix.lower() == ".npz" and path.is_file():
        import zipfile

        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                keys = list(archive.files)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            keys = []  # unreadable: load_calibration says why
        unknown = [key for key in keys if key not in names and key not in TARGET_KEYS]
        if unknown:
            raise BackendError(
                f"{spec} holds {', '.join(map(repr, keys))} and {model} takes the inputs {', '.join(map(repr, names))}: "
                f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not among them; save one "
                "array per input, under its name."
            )
    return Signature(names, ())
