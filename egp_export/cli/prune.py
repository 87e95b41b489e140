"""``egp-export prune``: entropy-guided pruning from the command line, writing checkpoints ``compile`` reads.

    egp-export prune --arch egp_export.demo.digits:digits_resnet --checkpoint dense.pt \\
        --data builtin:digits --out pruned/ --method egp --target-linear-sites 2
    egp-export compile --arch egp_export.demo.digits:digits_resnet --checkpoint pruned/pruned.pt \\
        --calibration builtin:digits --out compiled/

``--data`` is labelled data:

* ``builtin:digits``: scikit-learn's digits, split as ``datasets.load_digits_split``
  (seeded by ``--seed``); the held-out 25 % is the eval split;
* a ``.pt``/``.pth`` file holding an ``(inputs, targets)`` pair, or a dict
  with the inputs under one of ``inputs``/``input``/``x``/``data``/``images``
  and the targets under one of ``targets``/``target``/``labels``/``label``/``y``;
* a ``.npz`` archive with the same keys.

The eval split is ``--eval-data`` (same forms) or, without it, the last
``--eval-fraction`` of a seeded permutation of ``--data``.

Under ``torchrun`` the same command runs distributed (egp_export.distributed):

    torchrun --nproc_per_node=2 -m egp_export prune --arch ... --data builtin:digits --out DIR
Errors the user can cause print ``egp-export: error: ...`` and exit with the
error's code; nothing but the pruning outputs is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from egp_export.cli.common import PROG, fraction, non_negative_float, non_negative_int, positive_float, positive_int, run_command
from egp_export.errors import EgpExportError

DEFAULT_EVAL_FRACTION = 0.2
ENTROPY_METHODS = ("egp", "nepenthe", "easier")
OTHER_METHODS = ("sap", "energy", "itpruner")
# The methods that read each method-specific option (the rest read every option): any other method would ignore it,
# so a value other than the default is refused there.
OPTION_METHODS = {
    "prune_shortcuts": ENTROPY_METHODS,
    "rate": ENTROPY_METHODS,
    "target_sparsity": ENTROPY_METHODS,
    "target_linear_sites": ENTROPY_METHODS,
    "entropy_samples": ENTROPY_METHODS,
    "momentum": ENTROPY_METHODS,
    "resume": ENTROPY_METHODS,
    "iterations": (*ENTROPY_METHODS, "sap"),
    "max_accuracy_drop": (*ENTROPY_METHODS, "sap"),
    "rewind": ("sap",),
    "stages": ("energy",),
    "score": ("energy",),
    "flops_ratio": ("itpruner",),
    "beta": ("itpruner",),
}


def add_prune_command(subparsers) -> argparse.ArgumentParser:
    """Register ``prune`` on an ``add_subparsers()`` object; the parsed namespace's ``run`` executes it."""
    # Defaults are literals here: importing egp_export.prune.api for them would load torch for --help.
    parser = subparsers.add_parser(
        "prune",
        help="prune with fine-tuning (EGP, NEPENTHE, EASIER, SAP, energy block removal, ITPruner); writes pruned.pt",
        description="Prune a trained model and fine-tune it: EGP/NEPENTHE/EASIER (activations made linear on the data), "
        "SAP (PQ Index), energy-statistics residual-unit removal, or ITPruner widths; write a checkpoint that "
        "'egp-export compile --checkpoint' reads (removed units and new widths are recorded in it).",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--arch", required=True, metavar="SPEC", help="torchvision:NAME or package.module:factory")
    model.add_argument("--arch-kwargs", nargs="+", default=[], metavar="K=V", help="keyword arguments for the factory")
    model.add_argument("--checkpoint", type=Path, metavar="PATH", help="trained weights to start from (a state dict)")
    model.add_argument("--unsafe-pickle", action="store_true", help="allow checkpoints holding pickled Python objects")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--data", required=True, metavar="SPEC",
        help="labelled training data: builtin:digits, a .pt/.pth file with (inputs, targets), or a .npz archive",
    )
    data.add_argument("--eval-data", metavar="SPEC", help="labelled eval data (same forms); default: split off --data")
    data.add_argument(
        "--eval-fraction", type=fraction, default=DEFAULT_EVAL_FRACTION, metavar="F",
        help=f"fraction of --data held out for eval when --eval-data is not given (default {DEFAULT_EVAL_FRACTION})",
    )
    data.add_argument(
        "--entropy-samples", type=positive_int, default=4096, metavar="N",
        help="training samples the activation entropy is measured on (default 4096)",
    )
    method = parser.add_argument_group("pruning")
    method.add_argument(
        "--method", choices=ENTROPY_METHODS + OTHER_METHODS, default="egp",
        help="egp (default), nepenthe, easier (entropy-guided); sap (PQ Index + SAP); energy (residual units by energy "
        "statistics); itpruner (widths from nHSIC/CKA importance under a MACs budget)",
    )
    method.add_argument(
        "--entropy", choices=("reference", "pooled"),
        help="layer entropy: 'reference' (EGP's code: per batch of 128, mean over the neurons not constant in it; "
        "EGP's default) or 'pooled' (over all samples and neurons at once; NEPENTHE's and EASIER's default)",
    )
    method.add_argument("--prune-shortcuts", action="store_true",
                        help="also prune the shortcut (downsample) convs of residual blocks (EGP's code never does)")
    method.add_argument("--rate", type=fraction, default=0.5, help="fraction of the eligible weights pruned per iteration "
                        "(default 0.5, the paper's halving)")
    method.add_argument("--iterations", type=non_negative_int, default=10, help="at most this many iterations (default 10)")
    method.add_argument("--target-sparsity", type=fraction, metavar="S", help="stop at this sparsity of the pruned layers")
    method.add_argument(
        "--max-accuracy-drop", type=non_negative_float, metavar="D",
        help="reject iterations whose eval accuracy falls more than D (a fraction) below the dense model's",
    )
    method.add_argument("--target-linear-sites", type=non_negative_int, metavar="N",
                        help="stop once N activation sites are linear on the data")
    others = parser.add_argument_group("sap, energy, itpruner")
    others.add_argument("--rewind", choices=("init", "pre_prune"), default="init",
                        help="sap: retrain from the initial weights (the paper, default) or from the pre-prune ones")
    others.add_argument("--stages", type=positive_int, default=1, help="energy: score, cluster, remove, retrain rounds")
    others.add_argument("--score", choices=("energy", "dcor"), default="energy",
                        help="energy: energy distance between classes (default) or distance correlation with the output")
    others.add_argument("--flops-ratio", type=fraction, default=0.5, metavar="R",
                        help="itpruner: MACs budget as a fraction of the dense model's (default 0.5)")
    others.add_argument("--beta", type=positive_float, default=1.0, help="itpruner: importance temperature (default 1)")
    training = parser.add_argument_group(
        "fine-tuning (defaults: each method's reference recipe; for EGP SGD lr 0.1, momentum 0.9, weight decay 1e-4, "
        "multistep, 5 epochs per iteration)"
    )
    training.add_argument("--epochs-per-iteration", type=non_negative_int, metavar="E",
                          help="epochs after each pruning step (sap, energy, itpruner: of each retraining)")
    training.add_argument("--optimizer", choices=("sgd", "adam", "adamw"))
    training.add_argument("--lr", type=positive_float, help="learning rate")
    training.add_argument("--momentum", type=non_negative_float, help="SGD momentum (egp, nepenthe, easier)")
    training.add_argument("--weight-decay", type=non_negative_float)
    training.add_argument("--scheduler", choices=("multistep", "cosine", "constant"),
                          help="per iteration: step decay at 50%% and 75%% of the epochs, cosine, or constant")
    training.add_argument("--batch-size", type=positive_int, help="global batch size")
    training.add_argument("--seed", type=int, default=0, help="seeds the data split, batch order and dropout (default 0)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for checkpoints, metrics and plots")
    output.add_argument("--resume", action="store_true", help="continue from DIR/state.pt (same settings)")
    output.add_argument("--force", action="store_true", help="overwrite existing outputs")
    output.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.set_defaults(run=run_prune, verbose=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="egp-export pruning")
    add_prune_command(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (``prune ...``), run it; return 0 or the error's exit code (no traceback for user errors)."""
    return run_command(build_parser(), argv)


# Running -------------------------------------------------------------------------------


def _training_options(args: argparse.Namespace) -> dict:
    """The fine-tuning options given on the command line (the rest stay at the method's own defaults)."""
    given = {
        "optimizer": args.optimizer, "lr": args.lr, "weight_decay": args.weight_decay,
        "scheduler": args.scheduler, "batch_size": args.batch_size,
    }
    return {key: value for key, value in given.items() if value is not None}


def run_prune(args: argparse.Namespace) -> None:
    from egp_export.io.arch import build_model, parse_kwargs
    from egp_export.io.checkpoint import apply_state_dict, load_state_dict
    from egp_export.io.datasets import load_labelled_splits

    _refuse_ignored_options(args)
    if args.entropy == "reference" and args.method != "egp":
        raise EgpExportError(
            f"--entropy reference is EGP's reference layer entropy; --method {args.method} uses the pooled one: "
            "drop --entropy or pass --entropy pooled."
        )
    arch_kwargs = parse_kwargs(args.arch_kwargs)
    model = build_model(args.arch, arch_kwargs)
    if args.checkpoint is not None:
        apply_state_dict(model, load_state_dict(args.checkpoint, allow_pickle=args.unsafe_pickle))
    train, held_out = load_labelled_splits(args.data, args.eval_data, eval_fraction=args.eval_fraction, seed=args.seed)
    if args.method in OTHER_METHODS:
        _run_other_method(args, model.eval(), train, held_out, lambda **widths: build_model(args.arch, {**arch_kwargs, **widths}))
    else:
        _run_entropy_method(args, model.eval(), train, held_out)


def _refuse_ignored_options(args: argparse.Namespace) -> None:
    """Refuse options the chosen method does not read, when given a value other than their default."""
    defaults = build_parser().parse_args(["prune", "--arch", "-", "--data", "-", "--out", "-"])
    ignored = [
        f"--{dest.replace('_', '-')} ({', '.join(methods)})"
        for dest, methods in OPTION_METHODS.items()
        if args.method not in methods and getattr(args, dest) != getattr(defaults, dest)
    ]
    if ignored:
        raise EgpExportError(
            f"--method {args.method} does not use {', '.join(ignored)}: it would be ignored; drop it, or choose a "
            "method that uses it (in parentheses)."
        )


def _run_other_method(args: argparse.Namespace, model, train, held_out, rebuild) -> None:
    """SAP, energy block removal or ITPruner: one run, one checkpoint with the kwargs that rebuild the result."""
    options = {**_training_options(args), "seed": args.seed, "out_dir": args.out, "force": args.force}
    if args.epochs_per_iteration is not None:
        options["epochs"] = args.epochs_per_iteration
    if args.method == "sap":
        from egp_export.prune.sap import prune_sap

        outcome = prune_sap(
            model, train, held_out, iterations=args.iterations, rewind=args.rewind,
            max_accuracy_drop=args.max_accuracy_drop, **options,
        )
    elif args.method == "energy":
        from egp_export.prune.blocks import prune_energy

        outcome = prune_energy(model, train, held_out, stages=args.stages, score=args.score, **options)
    else:
        from egp_export.prune.itpruner import prune_itpruner

        outcome = prune_itpruner(
            model, train, held_out, rebuild=rebuild, flops_ratio=args.flops_ratio, beta=args.beta, **options
        )
    if args.quiet:
        return
    print(f"{args.method.upper()}: accuracy {outcome.dense_accuracy:.4f} -> {outcome.accuracy:.4f}", flush=True)
    kwargs = " ".join(f"{key}={value!r}".replace(" ", "") for key, value in outcome.arch_kwargs.items())
    print(f"wrote {', '.join(str(path) for path in outcome.paths.values())}", flush=True)
    print(
        f"next: egp-export compile --arch {args.arch}"
        + (f" --arch-kwargs {kwargs}" if kwargs else "")
        + f" --checkpoint {outcome.paths['pruned.pt']} --calibration ... --out DIR",
        flush=True,
    )


def _run_entropy_method(args: argparse.Namespace, model, train, held_out) -> None:
    from egp_export.distributed import runtime_from_env, shutdown
    from egp_export.prune.api import PRUNED_CHECKPOINT, prune

    runtime = runtime_from_env()
    talk = not args.quiet and runtime.is_main
    options = _training_options(args)
    if args.momentum is not None:
        options["momentum"] = args.momentum
    if args.epochs_per_iteration is not None:
        options["epochs_per_iteration"] = args.epochs_per_iteration
    try:
        result = prune(
            model, train, held_out, args.method, entropy=args.entropy, prune_shortcuts=args.prune_shortcuts,
            rate=args.rate, iterations=args.iterations, target_sparsity=args.target_sparsity,
            max_accuracy_drop=args.max_accuracy_drop, target_linear_sites=args.target_linear_sites,
            entropy_samples=args.entropy_samples, out_dir=args.out,
            resume=args.resume, force=args.force, seed=args.seed,
            progress=talk and sys.stderr.isatty(), runtime=runtime, **options,
        )
    finally:
        shutdown()
    if not talk:
        return
    final = result.final
    print(
        f"{args.method.upper()}: {len(result.history) - 1} iteration(s); stopped: {result.stop_reason}\n"
        f"accuracy {result.dense_accuracy:.4f} -> {final['accuracy']:.4f} (iteration {final['iteration']}), "
        f"sparsity {final['sparsity']:.3f}, {final['linear_sites']} of {len(result.history[0]['entropies'])} "
        f"activation sites linear on the data",
        flush=True,
    )
    checkpoint = args.out / PRUNED_CHECKPOINT
    if result.identity_sites:
        print(f"note: EASIER replaced {', '.join(result.identity_sites)} by the identity (recorded in {checkpoint})", flush=True)
    print(f"wrote {checkpoint}, {args.out / 'metrics.jsonl'}, plots and per-iteration checkpoints in {args.out}", flush=True)
    print(f"next: egp-export compile --arch {args.arch} --checkpoint {checkpoint} --calibration ... --out DIR", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
