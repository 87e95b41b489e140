"""``egp-export``: the command line. It parses, calls the library and prints; Python reaches all of it.

    egp-export analyze --arch A --calibration C --out DIR    per-site activation report
    egp-export compile --arch A --calibration C --out DIR    compiled model.onnx + report
    egp-export demo --out DIR                                train, EGP-prune, compile, verify and time a digits ResNet
    egp-export inspect model.onnx [--json]                   each ONNX node's source modules and rewrites
    egp-export prune ...                                     entropy-guided pruning (prune_cli.py)
    egp-export profile | gate | engine ...                   latency and TensorRT (perf_cli.py)
    egp-export recheck OUT --arch A --inputs SPEC            is the compile's guarantee still true on new data?

Errors the user can cause (EgpExportError) are printed as one
``egp-export: error: ...`` message and exit with the error's code; nothing
is written unless every output could be.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egp_export.cli.common import (
    PROG,
    add_image_preprocessing_arguments,
    dynamic_dim,
    holdout_fraction,
    image_preprocessing,
    non_negative_float,
    positive_int,
    progress,
    run_command,
    say,
    stage,
    stage_events,
)
from egp_export.errors import CalibrationError, ExportError
from egp_export.report.report import COMPILE_OUTPUTS, agreement_summary  # no torch nor numpy: --help stays fast
from egp_export.version import __version__

DEFAULT_TOLERANCE = 1e-5
DEFAULT_HOLDOUT = 0.2
DEPTH_PLOT = "depth.png"
PADDING_PLAN = "padding-plan.json"
ORIGINAL_MODEL = "original.onnx"
EXPORT_LOG = "export.log"  # egp_export.export.onnx.EXPORT_LOG; that module loads torch
# egp_export.export.onnx.EXPORTER_CHOICES, spelled out for the same reason (a test keeps them equal).
EXPORTER_CHOICES = ("auto", "dynamo", "torchscript")
# egp_export.measures.MEASURES plus EGP's entropy, spelled out so that --help loads no torch.
ANALYZE_MEASURES = ("entropy", "pqi", "energy", "dcor", "nhsic")
# What compile writes into --out (padding-plan.json only when asked).
COMPILE_FILES = (*COMPILE_OUTPUTS, DEPTH_PLOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compile depth-reduced (entropy-guided pruned) PyTorch networks: linearize activations that are "
        "linear on calibration data, fold and merge what they leave, export a verified ONNX file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    model = common.add_argument_group("model")
    model.add_argument(
        "--arch",
        metavar="SPEC",
        help="torchvision:NAME (e.g. torchvision:resnet18), transformers:CLASS (a Hugging Face class built from its "
        "config with --arch-kwargs, e.g. transformers:BertModel) or package.module:factory (e.g. mypkg.models:make_net); "
        "required unless --checkpoint holds a whole pickled module (with --unsafe-pickle)",
    )
    model.add_argument(
        "--arch-kwargs", nargs="+", default=[], metavar="K=V", help="keyword arguments for the factory, e.g. num_classes=10"
    )
    model.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="weights: a state dict, a training wrapper ({'state_dict': ...}), DataParallel/compile prefixes and "
        "torch.nn.utils.prune masks are handled; without it the factory's own initialisation is used",
    )
    model.add_argument(
        "--unsafe-pickle",
        action="store_true",
        help="allow checkpoints holding pickled Python objects (e.g. a whole nn.Module); this runs code from the file",
    )
    data = common.add_argument_group("calibration data")
    data.add_argument(
        "--calibration",
        required=True,
        metavar="SPEC",
        help="builtin:digits, a .pt/.pth tensor file, a .npy/.npz array, or a folder of images",
    )
    data.add_argument("--input-size", nargs=2, type=positive_int, metavar=("H", "W"), help="resize images of a folder")
    add_image_preprocessing_arguments(data)
    data.add_argument("--calibration-limit", type=positive_int, metavar="N", help="use the first N samples only")
    data.add_argument(
        "--leaf-module",
        action="append",
        default=[],
        metavar="NAME",
        help="trace this submodule (qualified name) as one call; repeat for several. Submodules torch.fx cannot "
        "trace through become leaves automatically; the report lists them (activations inside are not analysed)",
    )
    data.add_argument(
        "--tolerance",
        type=non_negative_float,
        default=DEFAULT_TOLERANCE,
        metavar="T",
        help="largest error allowed for smooth-activation surrogates, relative to the output scale "
        f"(default {DEFAULT_TOLERANCE:g}; verification allows at least max(T, {DEFAULT_TOLERANCE:g}); the ONNX "
        "Runtime check stays at fp32 noise whatever T)",
    )
    output = common.add_argument_group("output")
    output.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the outputs")
    output.add_argument("--force", action="store_true", help="overwrite existing outputs")
    loudness = output.add_mutually_exclusive_group()  # --quiet would silence --verbose's notes
    loudness.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    loudness.add_argument(
        "--verbose",
        action="store_true",
        help="print notes (mode switches, exporter notes) and torch's own logs during the ONNX export",
    )

    analyze = commands.add_parser(
        "analyze",
        parents=[common],
        help="measure activations per call site (entropy, regions, dead neurons); writes report.json, report.md",
        description="Measure every activation call site on the calibration data; nothing is rewritten.",
    )
    analyze.add_argument(
        "--measure",
        nargs="+",
        choices=ANALYZE_MEASURES,
        default=["entropy"],
        help="entropy (EGP's, per activation site; default), pqi (PQ Index per weight tensor), energy / dcor (per "
        "residual unit: energy distance between classes, distance correlation with the output), nhsic (per unit: "
        "ITPruner's CKA importance); several may be given",
    )
    analyze.add_argument(
        "--labels-from",
        metavar="SPEC",
        help="labelled data for energy/dcor (builtin:digits, or a .pt/.pth/.npz file with inputs and targets); "
        "default: builtin:digits when --calibration is builtin:digits",
    )
    analyze.set_defaults(run=_run_analyze)

    compile_ = commands.add_parser(
        "compile",
        parents=[common],
        help=f"compile and export; writes {', '.join(COMPILE_FILES)} (+ {PADDING_PLAN} with --padding-plan)",
        description="Compile the model on the calibration data, verify it on the held-out part, export it to "
        "ONNX and verify the file in ONNX Runtime.",
    )
    compile_.add_argument(
        "--holdout",
        type=holdout_fraction,
        default=DEFAULT_HOLDOUT,
        metavar="F",
        help=f"fraction of the calibration samples kept out for verification (default {DEFAULT_HOLDOUT}); the samples "
        "are split by a seeded permutation, see --split-seed",
    )
    # No literal default: egp_export.analysis.batches.DEFAULT_SPLIT_SEED is read at run time (importing it loads torch).
    compile_.add_argument(
        "--split-seed",
        type=int,
        metavar="N",
        help="seed of the permutation that splits the calibration samples into decide, validation and held-out "
        "parts (default egp_export.analysis.batches.DEFAULT_SPLIT_SEED, 0); the report states it",
    )
    compile_.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 3) when the compiled model does not verify, instead of withdrawing the rewrites whose neurons "
        "left their region (on the validation samples, then every statistical rewrite) and compiling the rest",
    )
    compile_.add_argument(
        "--min-observations",
        type=positive_int,
        metavar="N",
        help="rewrite a site only if each neuron was observed at least N times (samples x positions) on the samples "
        "decisions are made on; with n observations and no crossing the 95%% bound on the crossing rate is 3/n "
        "(default egp_export.compiler.DEFAULT_MIN_OBSERVATIONS, 500)",
    )
    compile_.add_argument(
        "--crossing-radius",
        type=non_negative_float,
        metavar="F",
        help="search (a few gradient steps from up to 32 validation samples) for inputs within F x each input "
        "feature's standard deviation that move a rewritten neuron out of its region, and withdraw those neurons; "
        "0 disables (default egp_export.analysis.crossings.DEFAULT_CROSSING_RADIUS, 0.1)",
    )
    compile_.add_argument(
        "--frontend",
        choices=("fx", "export", "auto"),
        default="fx",
        help="how the model becomes a graph: fx (torch.fx symbolic tracing, the default), export (torch.export, "
        "which runs the model and captures what fx cannot: Hugging Face transformers, data-dependent Python) or "
        "auto (fx, then torch.export when fx fails or needs untraceable leaves); the report's trace section says "
        "which ran and why",
    )
    merging = compile_.add_argument_group("merging")
    merging.add_argument(
        "--approximate",
        action="store_true",
        help="also merge conv chains that are exact only away from the border (later convs pad); the measured "
        "error must still be within --tolerance",
    )
    merging.add_argument(
        "--cost-model",
        choices=("analytic", "measured"),
        default="analytic",
        help="how the merge planner predicts conv latency: an analytic model (default) or single convs timed on "
        "ONNX Runtime CPU, cached in $XDG_CACHE_HOME/egp-export",
    )
    merging.add_argument(
        "--merge-plan",
        choices=("cost", "all"),
        default="cost",
        help="cost: split each conv chain where the cost model predicts it pays (default); all: merge every chain "
        "whole where that merge is allowed (exact, or border-approximate with --approximate), whatever it costs "
        "(the Layer-Folding baseline)",
    )
    # No literal default: egp_export.passes.CHANNEL_ALIGNMENT is read at run time (importing it loads torch).
    merging.add_argument(
        "--channel-alignment",
        type=positive_int,
        metavar="N",
        help="keep the channel counts dead-channel removal leaves at multiples of N: ONNX Runtime's CPU kernels "
        "run odd counts far slower; 1 removes every dead channel (default egp_export.passes.CHANNEL_ALIGNMENT, 8)",
    )
    merging.add_argument(
        "--padding-plan",
        action="store_true",
        help=f"also write {PADDING_PLAN}: the chains that merge only approximately, with all their padding moved "
        "to the first conv (LayerMerge's alternative). Applying it changes the function at the border, so it is "
        "for users who fine-tune afterwards (egp_export.apply_padding_plan); the compile itself is unchanged",
    )
    merging.add_argument(
        "--debug", action="store_true", help="check the numerics after every pass and name the pass that broke them"
    )
    merging.add_argument(
        "--measure-latency",
        action="store_true",
        help=f"also export the model as it is to {ORIGINAL_MODEL} and time it against the compiled model on ONNX "
        "Runtime CPU (interleaved, bootstrap interval); the report then shows measured beside predicted latency, "
        f"and {ORIGINAL_MODEL} is the baseline for 'egp-export gate'",
    )
    export = compile_.add_argument_group("ONNX export")
    export.add_argument(
        "--exporter",
        choices=EXPORTER_CHOICES,
        default="auto",
        help="torch.onnx exporter: auto (default) tries dynamo, then TorchScript; the report says which was used and why",
    )
    export.add_argument("--opset", type=positive_int, metavar="N", help="ONNX opset version (default: the exporter's)")
    export.add_argument(
        "--static-batch",
        action="store_true",
        help="if no exporter gives a dynamic batch dimension, accept one fixed to batch 1 (the example's)",
    )
    export.add_argument(
        "--no-simplify", action="store_true", help="skip onnx-simplifier (to find the step at fault when a check fails)"
    )
    export.add_argument(
        "--dynamic-dim",
        action="append",
        default=[],
        type=dynamic_dim,
        metavar="INPUT:AXIS=NAME",
        help="make axis AXIS (beyond the batch, axis 0) of input INPUT dynamic under NAME, e.g. input_ids:1=seq; "
        "inputs sharing a NAME share its size; repeat for several. Each is verified in ONNX Runtime at the "
        "calibration data's size and a second one; the torch.export front end keeps it symbolic in the captured graph. "
        "A single-tensor model's input is called 'input'",
    )
    export.add_argument(
        "--dtype",
        choices=("fp32", "fp16"),
        default="fp32",
        help="fp16: write the file in fp16, keeping fp32 (with casts) the nodes whose weights or activations on the "
        "decide samples go beyond half of fp16's range (listed in the report); checked on the held-out samples "
        "within 8x the original model's own fp16 noise, with top-1 agreement (default fp32)",
    )
    compile_.set_defaults(run=_run_compile)

    demo = commands.add_parser(
        "demo",
        help="train a small ResNet on scikit-learn's digits, EGP-prune, compile, export, verify and time it (CPU)",
        description="Train a small ResNet-style CNN on scikit-learn's digits (no download), EGP-prune it until some "
        "activation sites are linear, compile it, export both the pruned and the compiled model to ONNX, verify them "
        "with ONNX Runtime on the held-out test split, time them, and write DIR/summary.json.",
    )
    demo.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the outputs")
    demo.add_argument("--quick", action="store_true", help="the CI size: fewer epochs, iterations and timing rounds")
    demo.add_argument("--seed", type=int, default=0, help="seeds the split, initialisation and batch order (default 0)")
    demo.add_argument("--force", action="store_true", help="overwrite existing outputs")
    demo.add_argument("--quiet", action="store_true", help="print nothing but warnings and errors")
    demo.set_defaults(run=_run_demo, verbose=False)

    inspect = commands.add_parser(
        "inspect",
        help="print where each node of a model.onnx egp-export wrote comes from: source modules and rewrites",
        description="Print one row per node of an ONNX file egp-export wrote (compile or export_onnx): the node, its op "
        "type, the modules of the original PyTorch model it computes (qualified names; (model) is the model's own "
        "forward) and the rewrites that made it, read from the nodes' metadata_props (pkg.egp_export.*). Nodes the "
        "exporter or onnx-simplifier added say so, and why.",
    )
    inspect.add_argument("onnx", type=Path, metavar="MODEL.onnx", help="the ONNX file")
    inspect.add_argument("--json", action="store_true", help="print the table as JSON, one object per node")
    inspect.set_defaults(run=_run_inspect)

    # Commands defined beside their libraries; each module stays light until a command runs.
    from egp_export.cli.perf import add_perf_commands
    from egp_export.cli.prune import add_prune_command
    from egp_export.cli.recheck import add_recheck_command

    add_prune_command(commands)
    add_perf_commands(commands)
    add_recheck_command(commands, load_model=_load_model, load_inputs=_load_calibration, check_inputs=_check_input_size_applies)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0, the gate's 1 on failure, or the error's exit code)."""
    return run_command(build_parser(), argv)


def _note(args: argparse.Namespace, text: str) -> None:
    if args.verbose and not args.quiet:
        print(f"note: {text}", flush=True)


def _load_model(args: argparse.Namespace):
    """The network the checkpoint holds: a whole pickled module as it is, else --arch with the weights applied
    and EASIER's identity sites (checkpoint metadata) rewritten."""
    from egp_export.errors import ArchitectureError
    from egp_export.io.arch import build_model, parse_kwargs
    from egp_export.io.checkpoint import apply_identity_sites, apply_state_dict, read_checkpoint

    checkpoint = read_checkpoint(args.checkpoint, allow_pickle=args.unsafe_pickle) if args.checkpoint else None
    if args.checkpoint is None and args.unsafe_pickle:
        _note(args, "--unsafe-pickle has no effect without --checkpoint")
    if checkpoint is not None and checkpoint.module is not None:
        if args.arch:
            _note(args, f"{args.checkpoint} holds a whole module; it is compiled as it is and --arch is not used")
        args.arch = args.arch or type(checkpoint.module).__name__
        model = checkpoint.module
    elif not args.arch:
        raise ArchitectureError(
            "--arch is required (e.g. --arch torchvision:resnet18), unless --checkpoint holds a whole pickled "
            "nn.Module, which is compiled as it is (with --unsafe-pickle)."
        )
    else:
        kwargs = parse_kwargs(args.arch_kwargs)
        if checkpoint is not None and checkpoint.arch_kwargs:
            # A pruned architecture (removed units, new widths) rebuilds from the checkpoint; --arch-kwargs win.
            kwargs = {**checkpoint.arch_kwargs, **kwargs}
            _note(args, f"{args.checkpoint}: building {args.arch} with {checkpoint.arch_kwargs} (pruned architecture)")
        model = build_model(args.arch, kwargs)
        if checkpoint is not None:
            apply_state_dict(model, checkpoint.state_dict)
    if model.training:
        # Freshly built models (torchvision's included) start in training mode; deployment means eval.
        model.eval()
        _note(args, f"{args.arch} was in training mode; switched it to eval mode")
    if checkpoint is not None and checkpoint.identity_sites and checkpoint.module is None:
        model = apply_identity_sites(model, checkpoint.identity_sites, args.checkpoint)
        _note(args, f"{args.checkpoint}: {', '.join(checkpoint.identity_sites)} replaced by the identity (EASIER)")
    return model


def _load_calibration(args: argparse.Namespace, model):
    """The calibration inputs, converted for the model where it rejects them as stored (each conversion stated)."""
    from egp_export.analysis import inputs
    from egp_export.analysis.batches import fitting_conversion
    from egp_export.io.datasets import load_calibration

    input_size = tuple(args.input_size) if args.input_size else None
    notes: list[str] = []
    data = load_calibration(
        args.calibration, input_size=input_size, limit=args.calibration_limit, notes=notes,
        signature=inputs.signature(model), preprocessing=image_preprocessing(args, model),
    )
    for note in notes:
        say(args, f"note: {note}")
    conversion = fitting_conversion(model, inputs.take(data, slice(0, 1)), images=True)
    if conversion is None:
        return data  # as stored; compile/analyze name the dtype the model rejects
    say(args, f"note: {args.calibration} {conversion.note}")
    return conversion(data)


def _preprocessing_record(args: argparse.Namespace, model) -> dict:
    """{"preprocessing": ...} for the report when the calibration data are images (how they were scaled), else {}."""
    preprocessing = image_preprocessing(args, model)
    if preprocessing is not None:
        return {"preprocessing": preprocessing.to_dict()}
    if args.calibration == "builtin:digits" or Path(args.calibration).is_dir():
        return {"preprocessing": {"scale": "pixels / 255", "mean": None, "std": None, "source": "default"}}
    return {}


def _wrote(out: Path, names) -> str:
    return ", ".join(str(out / name) for name in names)


def _labelled(args: argparse.Namespace, calibration):
    """(inputs, labels) for the measures that need classes, from --labels-from or the built-in digits."""
    from egp_export.io.datasets import BUILTIN_DIGITS, load_labelled_splits

    spec = args.labels_from or (BUILTIN_DIGITS if args.calibration == BUILTIN_DIGITS else None)
    if spec is None:
        raise CalibrationError(
            "--measure energy/dcor compares classes: give labelled data with --labels-from (builtin:digits, or a "
            ".pt/.pth/.npz file with inputs and targets)."
        )
    train, _ = load_labelled_splits(spec, eval_fraction=0.2, seed=0)
    return train


def _run_analyze(args: argparse.Namespace) -> None:
    from egp_export.analysis import inputs
    from egp_export.analysis.plans import analyze
    from egp_export.io.fileio import run_transaction
    from egp_export.report.report import ANALYZE_OUTPUTS, write_report

    measures = list(dict.fromkeys(args.measure))
    with run_transaction(args.out, ANALYZE_OUTPUTS, force=args.force) as staging:
        _check_input_size_applies(args)
        model = _load_model(args)
        calibration = _load_calibration(args, model)
        samples = inputs.batch_size(calibration)
        with stage(args, "analyze", f"measuring activations on {samples} samples") as line:
            analysis = analyze(
                model, calibration, tolerance=args.tolerance, progress=progress(args), leaf_modules=args.leaf_module
            )
            line.detail = f"{analysis['num_sites']} activation sites"
        report = {
            "egp_export_version": __version__,
            "tolerance": args.tolerance,
            "calibration": {"samples": samples, "sample_shape": inputs.sample_shape(calibration),
                            **_preprocessing_record(args, model)},
            "analysis": analysis,
        }
        layer_measures = [m for m in measures if m != "entropy"]
        if layer_measures:
            from egp_export.measures import layer_measures as measure_layers

            for measure in layer_measures:
                with stage(args, measure, f"measuring {measure}") as line:
                    # energy/dcor compare classes; nhsic reads the inputs alone; pqi reads the weights.
                    data = _labelled(args, calibration) if measure in ("energy", "dcor") else calibration
                    rows = measure_layers(model, data, measure)
                    report.setdefault("measures", {})[measure] = rows
                    line.detail = f"{len(rows)} rows"
        write_report(report, staging)
    dead = sum(site["dead_neurons"] for site in analysis["sites"])
    say(
        args,
        f"{args.arch}: {analysis['num_sites']} activation sites, {analysis['num_linear_sites']} linear on the data, "
        f"{dead} dead neurons, mean entropy {analysis['mean_entropy']:.3f} bits",
    )
    for measure, rows in report.get("measures", {}).items():
        say(args, f"{measure}: {len(rows)} rows (report.md)")
    say(args, f"wrote {_wrote(args.out, ANALYZE_OUTPUTS)}")


def _run_compile(args: argparse.Namespace) -> None:
    from egp_export.distributed import runtime_from_env, shutdown
    from egp_export.io.fileio import run_transaction

    names = COMPILE_FILES + ((PADDING_PLAN,) if args.padding_plan else ()) + ((ORIGINAL_MODEL,) if args.measure_latency else ())
    # Under torchrun every rank calibrates and verifies its share; rank 0 alone exports and writes.
    runtime = runtime_from_env()
    if not runtime.is_main:
        try:
            _compile_on_a_rank(args, runtime, names)
        finally:
            shutdown()
        return
    # Everything is written into a staging folder and moved into --out together at the end:
    # an error or Ctrl-C on the way leaves --out as it was (but for export.log, see below).
    try:
        with run_transaction(args.out, names, force=args.force) as staging:
            _check_export_options(args)
            report, held, moves = _compile_into(args, staging, {name: staging / name for name in names}, runtime)
    finally:
        shutdown()

    before, after = report["before"], report["after"]
    pytorch, onnxruntime = report["verification"]["pytorch"], report["verification"]["onnxruntime"]
    predicted = report["predicted_conv_latency_us"]
    say(
        args,
        f"{args.arch}: depth {before['depth']} -> {after['depth']}, "
        f"{report['activations_linearized']} of {before['activations']} activations linearized, "
        f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,}",
    )
    say(
        args,
        f"{len(report['rewrites'])} rewrites, {len(report['refusals'])} refusals (see report.md); predicted conv "
        f"latency {predicted['before']:g} -> {predicted['after']:g} us ({predicted['cost_model']} cost model)",
    )
    agreement = agreement_summary(pytorch, "held-out" if held else "calibration")
    if agreement:
        ort_top1 = onnxruntime.get("top1_agreement")
        say(args, f"{agreement} (compiled vs original)"
                  + (f"; ONNX Runtime top-1 agreement {100 * ort_top1:.2f}%" if ort_top1 is not None else ""))
    say(
        args,
        f"max relative error: PyTorch {pytorch['max_rel']:.2e} on {held or report['calibration']['samples']} "
        f"{'held-out' if held else 'calibration'} samples, ONNX Runtime {onnxruntime['max_rel']:.2e} "
        f"(allowed {pytorch['rtol']:.2g} and {onnxruntime['rtol']:.2g})",
    )
    say(args, f"ONNX export: {report['onnx']['exporter_reason']}")
    fp16 = report["onnx"].get("fp16")
    if fp16:
        top1 = "".join(f", top-1 agreement {share:.2%} on {name}" for name, share in fp16["top1_agreement"].items())
        say(
            args,
            f"fp16 file: max relative error {fp16['error']['max_rel']:.2e} on {fp16['samples']} held-out samples "
            f"(allowed {fp16['rtol']:.2g}, {fp16['noise_factor']:g} x the original model's fp16 noise){top1}; "
            f"{len(fp16['kept_fp32'])} of {fp16['nodes']} nodes kept fp32"
            + "".join(f"\n  kept fp32: {kept['text']}" for kept in fp16["kept_fp32"]),
        )
    measured = report.get("measured_latency")
    if measured:
        say(
            args,
            f"measured on {measured['backend']}: {measured['original_ms']:.4g} -> {measured['compiled_ms']:.4g} ms, "
            f"speedup {measured['speedup']:.3f} [{measured['ci'][0]:.3f}, {measured['ci'][1]:.3f}] "
            f"(predicted {measured['predicted_speedup']:.3f})",
        )
    if moves:
        say(
            args,
            f"padding plan: {len(moves)} conv chain(s) would merge exactly with their padding moved to the first conv; "
            "applying it changes the model at the border, so fine-tune after egp_export.apply_padding_plan",
        )
    elif moves is not None:
        say(args, "padding plan: empty, no linear conv chain merges only approximately")
    say(args, f"wrote {_wrote(args.out, names)}")


def _compile_on_a_rank(args: argparse.Namespace, runtime, names) -> None:
    """A torchrun rank other than 0: refuse what rank 0 refuses before compiling (so no rank waits for one that
    stopped), then take part in the compile, silently; rank 0 writes everything."""
    import warnings

    from egp_export.compiler import compile as compile_model
    from egp_export.io.fileio import check_writable

    args.quiet = True
    for name in names:
        check_writable(args.out / name, force=args.force)
    _check_export_options(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 0 shows them
        model = _load_model(args)
        compile_model(model, _load_calibration(args, model), _compile_options(args, runtime=runtime))


def _compile_options(args: argparse.Namespace, **more):
    """The one CompileOptions the compile command's flags make (flags left unset keep the library's defaults);
    ``more``: options that are not flags (the torchrun runtime, the stage printer)."""
    from egp_export.compile_options import CompileOptions

    flags = {
        "tolerance": args.tolerance,
        "holdout": args.holdout,
        "split_seed": args.split_seed,
        "strict": args.strict,
        "min_observations": args.min_observations,
        "crossing_radius": args.crossing_radius,
        "approximate": args.approximate,
        "leaf_modules": args.leaf_module,
        "frontend": args.frontend,
        "dynamic_dims": _dynamic_dims(args) or None,  # kept symbolic by torch.export, then exported dynamic
        "cost_model": args.cost_model,
        "merge_plan": args.merge_plan,
        "channel_alignment": args.channel_alignment,
        "debug": args.debug,
    }
    return CompileOptions(**{name: value for name, value in flags.items() if value is not None}, **more)


def _compile_into(
    args: argparse.Namespace, folder: Path, paths: dict[str, Path], runtime=None
) -> tuple[dict, int, list | None]:
    """Compile, export and verify, writing the outputs into ``folder`` (at ``paths``).

    Returns (the report, the number of held-out samples, the padding plan or None).
    """
    from egp_export.analysis import inputs
    from egp_export.compiler import compile as compile_model
    from egp_export.io.fileio import write_text_atomic
    from egp_export.padding import padding_plan, save_plan
    from egp_export.report.plots import plot_depth, plot_entropy
    from egp_export.report.report import ENTROPY_PLOT, ONNX_MODEL, with_export, write_report

    model = _load_model(args)
    calibration = _load_calibration(args, model)
    _check_dynamic_dims(args, model, calibration)
    with stage(args, "compile", f"trace, calibrate on {inputs.batch_size(calibration)} samples, rewrite, verify") as line:
        options = _compile_options(args, progress=progress(args), on_stage=stage_events(args), runtime=runtime)
        result = compile_model(model, calibration, options)
        line.detail = f"{result.report['activations_linearized']} activations linearized"
    if runtime is not None and runtime.world_size > 1:
        from egp_export.distributed import shutdown

        shutdown()  # the other ranks are done; the export and reports are rank 0's alone
    # ONNX Runtime is checked on the samples compile() held out (gathered: its split is a permutation), and the
    # padding plan runs the compile's own stages with its options: the same split, the same decisions.
    held = result.report["calibration"]["holdout_samples"]
    verify = inputs.take(calibration, result.split.holdout) if held else calibration
    moves = padding_plan(model, calibration, options.but(on_stage=None, progress=False)) if args.padding_plan else None
    rtol = _ort_rtol(result.report["verification"]["fp32_noise"], result.module, verify)
    fp16 = None
    if args.dtype == "fp16":  # ranges from the samples the compile decided on, the check on the held-out ones
        ranges = inputs.take(calibration, result.split.decide)
        fp16 = {"range_inputs": ranges, "fp16_noise": _original_fp16_noise(args, model, calibration, ranges, verify)}
    exported = _export(args, result.module, calibration, verify, paths[ONNX_MODEL], rtol, fp16)
    for note in exported.notes:
        _note(args, f"ONNX export: {note}")
    report = with_export(result.report, exported, path=args.out / ONNX_MODEL)
    report["calibration"] = {**report["calibration"], **_preprocessing_record(args, model)}
    if args.measure_latency:
        report["measured_latency"] = _measure_latency(args, model, calibration, verify, paths, rtol, report)
    with stage(args, "report", "writing reports and plots"):
        write_report(report, folder)
        plot_entropy(report, paths[ENTROPY_PLOT])
        plot_depth(report, paths[DEPTH_PLOT])
        if moves is not None:
            write_text_atomic(paths[PADDING_PLAN], save_plan(moves) + "\n", force=False)
    return report, held, moves


def _check_export_options(args: argparse.Namespace) -> None:
    """Refuse, before any work, an --input-size that would be ignored, an --opset no exporter can write and an
    existing export.log without --force (a failed export's log goes into --out itself, outside the staging folder,
    so the transaction does not check it)."""
    from egp_export.export.onnx import check_opset
    from egp_export.io.fileio import check_writable

    _check_input_size_applies(args)
    if args.opset is not None:
        check_opset(args.opset)
    check_writable(args.out / EXPORT_LOG, force=args.force)


def _check_input_size_applies(args: argparse.Namespace) -> None:
    """--input-size resizes the images of a folder; for any other source it would be ignored, so it is refused."""
    if args.input_size and not Path(args.calibration).is_dir():
        raise CalibrationError(
            f"--input-size resizes the images of a folder, and {args.calibration} is not a folder, so it would be "
            "ignored; drop --input-size, or store the data at the size the model takes."
        )


def _ort_rtol(original_noise: float | None, module, verify) -> float:
    """What ONNX Runtime may differ from the compiled module by: fp32 noise, never the user's --tolerance.

    ORT against the compiled module is a check of one fp32 implementation against another: 1e-5
    (ORT_CPU_RTOL), raised to the compiled module's own measured noise floor and to the original model's (when
    the compile measured it), both capped at 1e-4 (NOISE_CAP). The --tolerance only bounds what the compile's
    approximations may add against the original; it must not loosen this check (--tolerance 1e308 would let
    any file through).
    """
    from egp_export.compiler import noise_floor
    from egp_export.export.onnx import measured_rtol

    return max(measured_rtol(module, verify)[0], noise_floor(original_noise or 0.0))


def _original_fp16_noise(args: argparse.Namespace, model, calibration, ranges, verify) -> float:
    """The original model's own fp16 noise: its fp32 export converted as the compiled file is, on the held-out
    samples (export.fp16.fp16_noise); the compiled fp16 file is allowed 8x that."""
    import tempfile

    from egp_export.analysis.batches import DEFAULT_BATCH_SIZE
    from egp_export.export.fp16 import fp16_noise

    with tempfile.TemporaryDirectory() as folder, stage(args, "fp16 noise", "the original model in fp16") as line:
        original = Path(folder) / ORIGINAL_MODEL
        _export(args, model, calibration, verify, original, None)
        noise = fp16_noise(original.read_bytes(), model, list(ranges.split(DEFAULT_BATCH_SIZE)),
                           list(verify.split(DEFAULT_BATCH_SIZE)))
        line.detail = f"max_rel {noise:.3g}"
    return noise


def _export(args: argparse.Namespace, module, calibration, verify, path: Path, rtol: float | None, fp16=None):
    """export_onnx with the command line's export options, one sample as the example; prints the stage lines.
    ``fp16``: export_onnx's fp16 arguments (range_inputs, fp16_noise) with --dtype fp16."""
    from egp_export.analysis import inputs
    from egp_export.analysis.batches import DEFAULT_BATCH_SIZE
    from egp_export.export.onnx import export_onnx

    held = inputs.batch_size(verify)
    with stage(args, "export", f"{args.exporter} exporter, {path.name}") as line:
        exported = export_onnx(
            module,
            inputs.clone(inputs.take(calibration, slice(0, 1))),  # a model may write into its input
            path,
            verify_inputs=[inputs.take(verify, slice(first, first + DEFAULT_BATCH_SIZE))
                           for first in range(0, held, DEFAULT_BATCH_SIZE)],
            dynamic_dims=_dynamic_dims(args),
            rtol=rtol,
            exporter=args.exporter,
            opset=args.opset,
            static_batch=args.static_batch,
            simplify=not args.no_simplify,
            # --out itself, not the staging folder: the log of a failed export must outlive the run.
            log_path=args.out / EXPORT_LOG,
            force=args.force,  # the log's; `path` is in the staging folder
            show_logs=args.verbose,
            **({"dtype": "fp16", **fp16} if fp16 is not None else {}),
        )
        line.detail = exported.why()
    for warning in exported.warnings:  # the file passed on every held-out sample, alone and batched: say it anyway
        print(
            f"{PROG}: warning: ONNX export of {path.name}: {warning} (the file was verified on all "
            f"{exported.verified_samples} held-out samples at batch sizes "
            f"{', '.join(map(str, exported.verified_batch_sizes))}; inputs unlike them may take another branch)",
            file=sys.stderr,
            flush=True,
        )
    if progress(args):
        print(
            f"ORT check: max_rel {exported.error.max_rel:.2e} (allowed {exported.rtol:.2g}), "
            f"{exported.seconds.get('verify', 0.0):.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return exported


def _dynamic_dims(args: argparse.Namespace) -> dict[str, dict[int, str]]:
    """--dynamic-dim INPUT:AXIS=NAME options as export_onnx's dynamic_dims ({input: {axis: name}})."""
    dims: dict[str, dict[int, str]] = {}
    for name, axis, dim in args.dynamic_dim:
        if dims.get(name, {}).get(axis, dim) != dim:
            raise ExportError(f"--dynamic-dim gives {name}:{axis} two names, {dims[name][axis]} and {dim}; give one.")
        dims.setdefault(name, {})[axis] = dim
    return dims


def _check_dynamic_dims(args: argparse.Namespace, model, calibration) -> None:
    """Refuse, before the compile, a --dynamic-dim the export would refuse (an unknown input, the batch axis, a size
    of 1, one name on two sizes)."""
    from egp_export.analysis import inputs
    from egp_export.export.onnx import checked_dims, input_names

    example = inputs.take(calibration, slice(0, 1))
    checked_dims(_dynamic_dims(args), input_names(model, example), example)


def _measure_latency(args, model, calibration, verify, paths, rtol: float, report: dict) -> dict:
    """Export the model as it is and time it against the compiled file (ONNX Runtime CPU, interleaved)."""
    from egp_export.report.report import ONNX_MODEL
    from egp_export.runtime.profiler import compare

    _export(args, model, calibration, verify, paths[ORIGINAL_MODEL], rtol)
    with stage(args, "latency", "timing original.onnx against model.onnx on ONNX Runtime CPU"):
        # Timed on a held-out sample: real data (a token model's ids, a sequence length the files need sized).
        comparison = compare(
            paths[ORIGINAL_MODEL], paths[ONNX_MODEL], backend="ort-cpu", progress=progress(args), inputs=verify,
            inputs_source="the held-out samples",
        )
    return {
        "backend": "ort-cpu, 1 thread, batch 1",
        "original_ms": comparison.baseline_stats.median,
        "compiled_ms": comparison.candidate_stats.median,
        "speedup": comparison.speedup,
        "ci": list(comparison.ci),
        "confidence": comparison.confidence,
        # The cost model only sees conv layers and bias maps: this is its view of the same ratio.
        "predicted_speedup": report["predicted_conv_latency_us"]["before"]
        / max(report["predicted_conv_latency_us"]["after"], 1e-9),
    }


def _run_inspect(args: argparse.Namespace) -> None:
    import json

    from egp_export.export.inspect import format_table, inspect_onnx, summarize

    rows = inspect_onnx(args.onnx)
    if args.json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    print(format_table(rows))
    print(summarize(rows))


def _run_demo(args: argparse.Namespace) -> None:
    from egp_export.demo.digits import run_egp_demo

    run_egp_demo(args.out, force=args.force, quick=args.quick, seed=args.seed, progress=not args.quiet)


if __name__ == "__main__":
    raise SystemExit(main())
