"""``egp-export recheck``: does a compile's guarantee still hold on new data? (runtime/recheck.py)

    egp-export recheck OUT --arch A [--checkpoint C] --inputs SPEC [--json PATH|-] [--plot PATH]

Exit 0 when it holds, 3 when it no longer does (the sites and neurons are
named), 2 for errors the user can cause. Imports nothing heavy until it runs.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from egp_export.cli.common import positive_int, say

JSON_STDOUT = "-"


def add_recheck_command(subparsers, *, load_model, load_inputs, check_inputs) -> None:
    """The ``recheck`` subcommand. The model and data are loaded as ``compile`` loads them: ``load_model(args)``,
    ``load_inputs(args, model)`` and ``check_inputs(args)`` are compile's own (cli/main.py, which imports this)."""
    recheck = subparsers.add_parser(
        "recheck",
        help="re-measure a compiled model's rewritten sites and outputs on new data; exit 3 when its guarantee no "
        "longer holds (data drift)",
        description="Re-measure every rewritten activation site of the original model on new data and compare the "
        "compiled ONNX file with the original there, without recompiling. Exit 0 when every rewritten neuron stayed "
        "in its region and the outputs are within the compile's allowance, 3 when not (the sites and neurons are "
        "named), 2 for usage errors.",
    )
    recheck.add_argument(
        "compiled", type=Path, metavar="OUT",
        help="the --out folder of 'egp-export compile' (or its report.json or model.onnx; the other is read beside it)",
    )
    model = recheck.add_argument_group("model (as given to compile)")
    model.add_argument("--arch", metavar="SPEC", help="as for compile: torchvision:NAME or package.module:factory")
    model.add_argument("--arch-kwargs", nargs="+", default=[], metavar="K=V", help="as for compile")
    model.add_argument("--checkpoint", type=Path, metavar="PATH", help="the weights the compile was given")
    model.add_argument("--unsafe-pickle", action="store_true", help="as for compile: allow a pickled nn.Module")
    data = recheck.add_argument_group("new data")
    # dest as compile's --calibration options: the same loader reads them.
    data.add_argument(
        "--inputs", dest="calibration", required=True, metavar="SPEC",
        help="the data to recheck on, in the forms --calibration takes: builtin:digits, a .pt/.pth tensor file, a "
        ".npy/.npz array, or a folder of images",
    )
    data.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"), help="resize images of a folder")
    data.add_argument("--limit", dest="calibration_limit", type=positive_int, metavar="N", help="use the first N samples only")
    output = recheck.add_argument_group("output")
    output.add_argument(
        "--json", metavar="PATH", help=f"write the result as JSON to PATH ('{JSON_STDOUT}': stdout, instead of the table)"
    )
    output.add_argument(
        "--plot", type=Path, metavar="PATH", help="write a PNG: per site, the rewritten neurons that left their region"
    )
    output.add_argument("--force", action="store_true", help="overwrite existing --json / --plot files")
    loudness = output.add_mutually_exclusive_group()
    loudness.add_argument("--quiet", action="store_true", help="print nothing but the verdict, warnings and errors")
    loudness.add_argument("--verbose", action="store_true", help="print notes (mode switches, checkpoint notes)")
    recheck.set_defaults(run=partial(_run_recheck, load_model=load_model, load_inputs=load_inputs, check_inputs=check_inputs))


def _run_recheck(args: argparse.Namespace, *, load_model, load_inputs, check_inputs) -> int:
    from egp_export.io.fileio import check_writable, write_text_atomic
    from egp_export.report.report import to_json
    from egp_export.runtime.recheck import load_compiled, recheck

    to_stdout = args.json == JSON_STDOUT
    json_path = None if args.json is None or to_stdout else check_writable(args.json, force=args.force)
    if args.plot is not None:
        check_writable(args.plot, force=args.force)
    report, onnx_path = load_compiled(args.compiled)
    check_inputs(args)
    if to_stdout:
        args.quiet = True  # stdout holds the JSON alone
    model = load_model(args)
    result = recheck(model, report, onnx_path, load_inputs(args, model))
    document = result.to_dict()
    if json_path is not None:
        write_text_atomic(json_path, to_json(document), force=args.force)
    if args.plot is not None:
        from egp_export.report.plots import plot_recheck

        plot_recheck(document, args.plot, force=args.force)
    if to_stdout:
        sys.stdout.write(to_json(document))
    else:
        for line in table(document):
            say(args, line)
        print(result.verdict(), flush=True)
    return result.exit_code


def table(result: dict) -> list[str]:
    """The result as text: one row per rewritten site, one per output, then why the guarantee fails (if it does)."""
    rows = [("site", "activation", "rewrite", "neurons", "left", "outside", "margin compile -> now", "neurons that left")]
    for site in result["sites"]:
        margins = "—" if site["min_margin"] is None else f"{_number(site['compile_margin'])} -> {_number(site['min_margin'])}"
        if site["surrogate_error"] is not None:
            margins = f"error {site['surrogate_error']:.2g} (allowed {site['allowed_error']:.2g})"
        outside = "—" if site["outside_fraction"] is None else f"{site['outside_fraction']:.2%}"
        if site["compile_bound"] is not None:
            outside += f" (bound {100 * site['compile_bound']:.2g}%)"
        left = ", ".join(map(str, site["left_neurons"][:8])) + (" ..." if site["left"] > 8 else "")
        rows.append((site["site"], site["activation"], site["rewrite"], str(site["rewritten"]), str(site["left"]),
                     outside, margins, left or "—"))
    lines = [f"{result['samples']} samples, {len(result['sites'])} rewritten sites:", *_aligned(rows), ""]
    outputs = result["outputs"]
    rows = [("output", "max_rel", "per-sample", "allowed", "top-1 agreement")]
    for output in outputs.get("outputs", []):
        top1 = result["top1_agreement"].get(output["output"])
        rows.append((output["output"], f"{output['max_rel']:.2e}", f"{output['max_sample_rel']:.2e}",
                     f"{outputs['allowed']:.2g}", "—" if top1 is None else f"{top1:.2%}"))
    if not outputs.get("outputs"):  # non-finite mismatches: no per-output rows
        rows.append(("all", _number(outputs["max_rel"]), "—", f"{outputs['allowed']:.2g}", "—"))
    lines += ["compiled ONNX (ONNX Runtime) vs original (PyTorch):", *_aligned(rows)]
    lines += [f"note: {note}" for note in result["notes"]]
    lines += [f"no longer holds: {reason}" for reason in result["reasons"]]
    return lines


def _number(value) -> str:
    return "—" if value is None else f"{value:.3g}"


def _aligned(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
