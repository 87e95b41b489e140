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


def dynamic_dim(text: str) -> tuple[str, int, str]:
    """An argparse type for ``--dynamic-dim INPUT:AXIS=NAME`` (``input_ids:1=seq``): (input, axis, name)."""
    name, _, rest = text.rpartition(":")
    axis, equals, dim = rest.partition("=")
    if not name or not equals or not axis.strip().isdigit() or not dim.isidentifier():
        raise argparse.ArgumentTypeError(
            f"must be INPUT:AXIS=NAME, e.g. input_ids:1=seq (an input of forward, an axis number, a name), got {text!r}"
        )
    return name, int(axis), dim


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
