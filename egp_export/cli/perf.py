"""The ``profile``, ``gate`` and ``engine`` commands: parse, call the library, print.

    egp-export profile MODEL.onnx [--backend B] [--batch-size N ...] [--out DIR]     latency table (+ JSON, PNG)
    egp-export gate BASELINE.onnx CANDIDATE.onnx --min-speedup S [--max-rel-error E]  exit 0 pass / 1 fail
        [--inputs HELD_OUT] [--min-top1-agreement A]
    egp-export engine MODEL.onnx --out model.engine [--fp16] [--dla N]                 TensorRT engine

All three take ``--inputs SPEC`` (the forms ``--calibration`` takes; for a
model with several inputs a dict or ``.npz`` archive with one array per ONNX
input name): the numeric checks and the timing then run on those samples;
without it they run on seeded random inputs (``--val-range``; ``--dim
NAME=SIZE`` sizes a named dynamic dimension such as a sequence axis), and a
numeric check says so.

``add_perf_commands(subparsers)`` registers them on the main parser;
``main(argv)`` runs them on a parser of their own. The gate prints its
one-line verdict last and exits 0 when it passes, 1 when it fails; errors the
user can cause print ``egp-export: error: ...`` and exit with the error's code.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from egp_export.cli.common import (
    PROG,
    add_inputs_arguments,
    agreement_fraction,
    confidence,
    dims,
    load_inputs,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    progress,
    run_command,
    say,
)
from egp_export.errors import OutputError

PROFILE_JSON = "profile.json"
PROFILE_MARKDOWN = "profile.md"
PROFILE_PLOT = "latency.png"
PROFILE_HTML = "profile.html"
ONNX_BACKENDS = ("ort-cpu", "ort-cuda", "tensorrt", "tensorrt-rtx")


def _add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="ort-cpu",
        choices=ONNX_BACKENDS,
        help="where to run (default ort-cpu; torch-cuda runs PyTorch modules: use egp_export.runtime.profiler from Python)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        metavar="N",
        help="ONNX Runtime intra/inter-op threads (default 1: reproducible ratios on shared CI machines)",
    )
    parser.add_argument(
        "--input-shape",
        nargs="+",
        type=positive_int,
        metavar="D",
        help="per-sample input shape of a one-input model (e.g. 3 224 224), needed when its dimensions are dynamic "
        "(or --dim NAME=SIZE by dimension name, any number of inputs)",
    )


def add_perf_commands(subparsers) -> None:
    """Register ``profile``, ``gate`` and ``engine`` on an argparse subparsers object."""
    profile = subparsers.add_parser(
        "profile",
        help="time an ONNX model: median/p90/p99 per batch size; table + JSON (+ PNG) in --out",
        description="Time an ONNX model on one backend: warm-up, then N timed iterations per batch size.",
    )
    profile.add_argument("model", type=Path, metavar="MODEL.onnx", help="ONNX file (or a TensorRT engine for tensorrt)")
    _add_backend_arguments(profile)
    profile.add_argument(
        "--batch-size", nargs="+", type=positive_int, default=[1], metavar="N", help="batch sizes to time (default 1)"
    )
    profile.add_argument("--iterations", type=positive_int, default=100, metavar="N", help="timed iterations (default 100)")
    profile.add_argument(
        "--warmup", type=non_negative_int, default=10, metavar="N", help="untimed iterations first (default 10)"
    )
    profile.add_argument("--layers", action="store_true", help="add the backend's per-layer time breakdown where it has one")
    profile.add_argument("--out", type=Path, metavar="DIR", help=f"write {PROFILE_JSON}, {PROFILE_MARKDOWN}, {PROFILE_PLOT} here")
    profile.add_argument("--html", action="store_true", help=f"with --out, also write {PROFILE_HTML}")
    profile.add_argument("--force", action="store_true", help="overwrite existing outputs")
    profile.add_argument("--quiet", action="store_true", help="print nothing but the table and errors")
    add_inputs_arguments(profile)
    profile.set_defaults(run=_run_profile)

    gate = subparsers.add_parser(
        "gate",
        help="CI gate: exit 0 when the candidate is at least S times faster (CI lower bound) and correct, else 1",
        description="Time BASELINE and CANDIDATE interleaved in one process; pass when the lower bound of the "
        "bootstrap confidence interval of the speedup (baseline / candidate median latency) is at least "
        "--min-speedup and, with --max-rel-error, the candidate's outputs match the baseline's.",
    )
    gate.add_argument("baseline", type=Path, metavar="BASELINE.onnx")
    gate.add_argument("candidate", type=Path, metavar="CANDIDATE.onnx")
    gate.add_argument("--min-speedup", type=positive_float, required=True, metavar="S", help="required speedup, e.g. 1.2")
    gate.add_argument(
        "--max-rel-error",
        type=non_negative_float,
        metavar="E",
        help="also require max |candidate - baseline| / max |baseline| <= E on the same inputs (--inputs, else random)",
    )
    gate.add_argument(
        "--min-top1-agreement",
        type=agreement_fraction,
        metavar="A",
        help="also require the candidate to predict the baseline's class (arg-max of each class-score output) on at "
        "least this fraction of the samples, e.g. 0.99",
    )
    _add_backend_arguments(gate)
    gate.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="batch size (default 1)")
    gate.add_argument("--rounds", type=positive_int, default=20, metavar="N", help="interleaved A/B rounds (default 20)")
    gate.add_argument(
        "--iterations", type=positive_int, default=20, metavar="N", help="timed runs per model per round (default 20)"
    )
    gate.add_argument(
        "--warmup", type=non_negative_int, default=10, metavar="N", help="untimed runs per model first (default 10)"
    )
    gate.add_argument("--order", choices=("alternate", "random"), default="alternate", help="who goes first per round")
    gate.add_argument("--confidence", type=confidence, default=0.95, metavar="C", help="interval level (default 0.95)")
    gate.add_argument("--seed", type=int, default=0, help="seeds inputs, round order and bootstrap (default 0)")
    gate.add_argument("--junit", type=Path, metavar="PATH", help="write a JUnit XML report")
    gate.add_argument("--summary", type=Path, metavar="PATH", help="write a Markdown summary (e.g. for $GITHUB_STEP_SUMMARY)")
    gate.add_argument("--json", type=Path, metavar="PATH", help="write the full result with raw timings as JSON")
    gate.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of both latency distributions")
    gate.add_argument("--force", action="store_true", help="overwrite existing outputs")
    gate.add_argument("--quiet", action="store_true", help="print only the verdict and errors")
    add_inputs_arguments(gate)
    gate.set_defaults(run=_run_gate)

    engine = subparsers.add_parser(
        "engine",
        help="build a TensorRT engine from an ONNX file, checked against ONNX Runtime",
        description="Build, check against ONNX Runtime and write a serialised TensorRT engine (needs TensorRT and a GPU).",
    )
    engine.add_argument("model", type=Path, metavar="MODEL.onnx")
    engine.add_argument("--out", type=Path, required=True, metavar="PATH", help="engine file to write, e.g. model.engine")
    engine.add_argument("--fp16", action="store_true", help="fp16 (builder flag on TensorRT 10, in the ONNX graph on 11)")
    engine.add_argument("--dla", type=non_negative_int, metavar="N", help="build for DLA core N (Jetson; needs --fp16)")
    engine.add_argument("--workspace-mb", type=positive_int, metavar="M", help="builder workspace limit (default 1024 MB)")
    engine.add_argument("--timing-cache", type=Path, metavar="PATH", help="read and update this TensorRT timing cache")
    engine.add_argument("--min-batch", type=positive_int, default=1, metavar="N", help="optimisation profile (default 1)")
    engine.add_argument("--opt-batch", type=positive_int, metavar="N", help="batch size tuned for (default: min)")
    engine.add_argument("--max-batch", type=positive_int, metavar="N", help="largest batch size (default: opt)")
    engine.add_argument(
        "--input-shape", nargs="+", type=positive_int, metavar="D", help="per-sample shape if dynamic besides the batch"
    )
    engine.add_argument("--runtime", choices=("tensorrt", "tensorrt-rtx"), default="tensorrt", help="TensorRT flavour")
    engine.add_argument("--no-tf32", action="store_true", help="build without TF32 kernels (TensorRT enables them by default)")
    engine.add_argument("--no-verify", action="store_true", help="skip the check against ONNX Runtime")
    engine.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_inputs_arguments(engine)
    engine.set_defaults(run=_run_engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Latency profiling, the CI latency gate and TensorRT engines.")
    add_perf_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one of the perf commands; return its exit status (the gate's 0/1, or an error's code)."""
    return run_command(build_parser(), argv)


def _run_profile(args: argparse.Namespace) -> int:
    from egp_export.io.fileio import check_writable, write_text_atomic
    from egp_export.report.report import to_json
    from egp_export.runtime.profiler import profile

    outputs = {}
    if args.html and args.out is None:  # it would write nothing: refused, not ignored
        raise OutputError(f"--html writes {PROFILE_HTML} into the --out folder; give --out DIR as well, or leave out --html.")
    if args.out is not None:
        names = (PROFILE_JSON, PROFILE_MARKDOWN, PROFILE_PLOT) + ((PROFILE_HTML,) if args.html else ())
        outputs = {name: check_writable(args.out / name, force=args.force) for name in names}
    inputs, source = load_inputs(args, args.model)
    result = profile(
        args.model,
        backend=args.backend,
        batch_sizes=args.batch_size,
        iterations=args.iterations,
        warmup=args.warmup,
        input_shape=args.input_shape,
        dims=dims(args),
        layers=args.layers,
        threads=args.threads,
        inputs=inputs,
        inputs_source=source or "inputs",
        val_range=tuple(args.val_range) if args.val_range else None,
        progress=progress(args),
    )
    settings = ", ".join(f"{key} {value}" for key, value in result.backend.items() if key != "backend")
    say(args, f"{args.model} on {args.backend} ({settings}); {args.iterations} iterations after {args.warmup} warm-up; "
              f"inputs: {result.inputs}")
    print(result.format_table(), flush=True)
    for batch in result.batches:
        if batch.layers:
            total = sum(layer.ms for layer in batch.layers) or 1.0
            top = ", ".join(f"{layer.name} {layer.ms:.3f} ms ({layer.ms / total:.0%})" for layer in batch.layers[:5])
            say(args, f"batch {batch.batch_size} slowest layers: {top}")
    if outputs:
        from egp_export.report.html import render_html
        from egp_export.report.plots import plot_profile

        markdown = result.to_markdown()
        write_text_atomic(outputs[PROFILE_JSON], to_json(result.to_dict()), force=args.force)
        plot_profile(result, outputs[PROFILE_PLOT], force=args.force)
        write_text_atomic(outputs[PROFILE_MARKDOWN], markdown + f"\n![latency distributions]({PROFILE_PLOT})\n", force=args.force)
        if args.html:
            page = render_html(markdown + f"\n![latency distributions]({PROFILE_PLOT})\n", {PROFILE_PLOT: outputs[PROFILE_PLOT]})
            write_text_atomic(outputs[PROFILE_HTML], page, force=args.force)
        say(args, "wrote " + ", ".join(str(path) for path in outputs.values()))
    return 0


def _run_gate(args: argparse.Namespace) -> int:
    from egp_export.io.fileio import check_writable, write_text_atomic
    from egp_export.report.report import to_json
    from egp_export.runtime.gate import gate, write_junit, write_summary

    requested = {"junit": args.junit, "summary": args.summary, "json": args.json, "plot": args.plot}
    for path in requested.values():  # refuse before timing anything
        if path is not None:
            check_writable(path, force=args.force)
    inputs, source = load_inputs(args, args.baseline)
    result = gate(
        args.baseline,
        args.candidate,
        min_speedup=args.min_speedup,
        max_rel_error=args.max_rel_error,
        min_top1_agreement=args.min_top1_agreement,
        inputs=inputs,
        inputs_source=source or "inputs",
        val_range=tuple(args.val_range) if args.val_range else None,
        backend=args.backend,
        batch_size=args.batch_size,
        input_shape=args.input_shape,
        dims=dims(args),
        rounds=args.rounds,
        iterations=args.iterations,
        warmup=args.warmup,
        order=args.order,
        confidence=args.confidence,
        seed=args.seed,
        threads=args.threads,
        progress=progress(args),
    )
    c = result.comparison
    base, cand = c.baseline_stats, c.candidate_stats
    say(args, f"{'':10} {'median ms':>10} {'p90 ms':>10} {'p99 ms':>10}")
    say(args, f"{'baseline':10} {base.median:10.4f} {base.p90:10.4f} {base.p99:10.4f}  {c.baseline}")
    say(args, f"{'candidate':10} {cand.median:10.4f} {cand.p90:10.4f} {cand.p99:10.4f}  {c.candidate}")
    if result.numeric is not None and result.numeric.error is not None:
        say(args, f"numerics: {result.numeric.error.agreement('' if result.numeric.real_data else 'random')}")
    for note in result.notes:
        say(args, f"note: {note}")
    for reason in result.reasons:
        say(args, f"why: {reason}")
    written = []
    if args.junit is not None:
        written.append(write_junit(result, args.junit, force=args.force))
    if args.summary is not None:
        written.append(write_summary(result, args.summary, force=args.force))
    if args.json is not None:
        written.append(write_text_atomic(args.json, to_json(result.to_dict()), force=args.force))
    if args.plot is not None:
        from egp_export.report.plots import plot_comparison

        written.append(plot_comparison(c, args.plot, min_speedup=args.min_speedup, force=args.force))
    if written:
        say(args, "wrote " + ", ".join(str(path) for path in written))
    print(result.verdict(), flush=True)
    return result.exit_code


def _run_engine(args: argparse.Namespace) -> int:
    from egp_export.runtime.engines import build_engine
    from egp_export.runtime.tensorrt import DEFAULT_WORKSPACE_MB

    inputs, source = load_inputs(args, args.model)
    result = build_engine(
        args.model,
        args.out,
        fp16=args.fp16,
        dla_core=args.dla,
        workspace_mb=args.workspace_mb or DEFAULT_WORKSPACE_MB,
        timing_cache=args.timing_cache,
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        input_shape=args.input_shape,
        dims=dims(args),
        runtime=args.runtime,
        tf32=not args.no_tf32,
        verify=not args.no_verify,
        inputs=inputs,
        inputs_source=source or "inputs",
        val_range=tuple(args.val_range) if args.val_range else None,
        force=args.force,
    )
    low, opt, high = result.batch_range
    precision = f"fp16 ({result.fp16})" if result.fp16 else "fp32" + ("" if args.no_tf32 else " (TF32 allowed)")
    print(
        f"{result.module} {result.version}: built {result.path} ({result.size_bytes / 2**20:.1f} MiB) in "
        f"{result.build_seconds:.1f} s; {precision}, batch {low}..{high} (opt {opt})"
        + (f", DLA core {result.dla_core}" if result.dla_core is not None else ""),
        flush=True,
    )
    if result.error is not None:
        print(
            f"engine vs ONNX Runtime (CPU, fp32) on {result.origin.describe()}: {result.error.agreement()}; max abs "
            f"{result.error.max_abs:.2e}, max rel {result.error.max_rel:.2e} (allowed {result.rtol:.0e})",
            flush=True,
        )
    for note in result.notes:
        print(f"note: TensorRT: {note}", flush=True)
    return 0
