"""Every numeric option of every command refuses inf and NaN at parse time (issue 15, item 12)."""

from __future__ import annotations

import argparse
import math

import pytest

from egp_export.cli.main import build_parser, main

NON_FINITE = ("inf", "-inf", "nan", "Infinity", "1e400")  # 1e400 overflows to inf


def _options(parser: argparse.ArgumentParser):
    """(command, option, action) for every option of every subcommand that converts its text with a ``type``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                for option in sub._actions:
                    if option.option_strings and callable(option.type):
                        yield command, option.option_strings[-1], option


def test_the_walk_finds_the_float_options_of_every_command():
    names = {(command, option) for command, option, _ in _options(build_parser())}
    for expected in [("prune", "--lr"), ("prune", "--beta"), ("prune", "--rate"), ("prune", "--flops-ratio"),
                     ("compile", "--tolerance"), ("compile", "--holdout"), ("analyze", "--tolerance"),
                     ("gate", "--min-speedup"), ("gate", "--confidence")]:
        assert expected in names


def test_no_option_of_any_command_accepts_a_non_finite_number():
    accepted = []
    for command, option, action in _options(build_parser()):
        for text in NON_FINITE:
            try:
                value = action.type(text)
            except (argparse.ArgumentTypeError, ValueError, TypeError):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                accepted.append(f"{command} {option} {text}")
    assert accepted == []


@pytest.mark.parametrize("argv", [
    ["prune", "--arch", "a:b", "--data", "builtin:digits", "--out", "o", "--method", "itpruner", "--beta", "inf"],
    ["prune", "--arch", "a:b", "--data", "builtin:digits", "--out", "o", "--lr", "nan"],
    ["compile", "--arch", "a:b", "--calibration", "builtin:digits", "--out", "o", "--holdout", "nan"],
    ["compile", "--arch", "a:b", "--calibration", "builtin:digits", "--out", "o", "--tolerance", "inf"],
])
def test_a_non_finite_option_exits_2_with_one_error_line(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {argv[-2]}: must be a finite number" in errors[0], errors
