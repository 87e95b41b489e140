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

Under ``torchrun`` the same command runs distributed (egp_export.prune.distributed):

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


def add_prune_command(subparsers) -> argparse.ArgumentParser:
    """Register ``prune`` on an ``add_subparsers()`` object; the parsed namespace's ``run`` executes it."""
    # Defaults are literals here: importing egp_export.prune.api for them would load torch for --help.
    parser = subparsers.add_parser(
        "prune",
        help="entropy-guided pruning (EGP, NEPENTHE, EASIER) with fine-tuning; writes pruned.pt for compile",
        description="Prune the weights of low-entropy layers until activations become linear on the data, "
        "fine-tuning after every step; write checkpoints that 'egp-export compile --checkpoint' reads.",
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
    method.add_argument("--method", choices=("egp", "nepenthe", "easier"), default="egp", help="default egp")
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
    training = parser.add_argument_group("fine-tuning (defaults: EGP's reference SGD recipe)")
    training.add_argument("--epochs-per-iteration", type=non_negative_int, default=5, metavar="E", help="default 5")
    training.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    training.add_argument("--lr", type=positive_float, default=0.1, help="learning rate (default 0.1)")
    training.add_argument("--momentum", type=non_negative_float, default=0.9, help="SGD momentum (default 0.9)")
    training.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="default 1e-4")
    training.add_argument("--scheduler", choices=("multistep", "cosine", "constant"), default="multistep",
                          help="per iteration: step decay at 50%% and 75%% of the epochs (default), cosine, constant")
    training.add_argument("--batch-size", type=positive_int, default=128, help="global batch size (default 128)")
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


def run_prune(args: argparse.Namespace) -> None:
    from egp_export.io.arch import build_model, parse_kwargs
    from egp_export.io.checkpoint import apply_state_dict, load_state_dict
    from egp_export.io.datasets import load_labelled_splits
    from egp_export.prune.api import PRUNED_CHECKPOINT, prune
    from egp_export.prune.distributed import runtime_from_env, shutdown

    if args.entropy == "reference" and args.method != "egp":
        raise EgpExportError(
            f"--entropy reference is EGP's reference layer entropy; --method {args.method} uses the pooled one: "
            "drop --entropy or pass --entropy pooled."
        )
    runtime = runtime_from_env()
    talk = not args.quiet and runtime.is_main
    try:
        model = build_model(args.arch, parse_kwargs(args.arch_kwargs))
        if args.checkpoint is not None:
            apply_state_dict(model, load_state_dict(args.checkpoint, allow_pickle=args.unsafe_pickle))
        train, held_out = load_labelled_splits(args.data, args.eval_data, eval_fraction=args.eval_fraction, seed=args.seed)
        result = prune(
            model.eval(), train, held_out, args.method, entropy=args.entropy, prune_shortcuts=args.prune_shortcuts,
            rate=args.rate, iterations=args.iterations, target_sparsity=args.target_sparsity,
            max_accuracy_drop=args.max_accuracy_drop, target_linear_sites=args.target_linear_sites,
            epochs_per_iteration=args.epochs_per_iteration, optimizer=args.optimizer, lr=args.lr,
            momentum=args.momentum, weight_decay=args.weight_decay, scheduler=args.scheduler,
            batch_size=args.batch_size, entropy_samples=args.entropy_samples, out_dir=args.out,
            resume=args.resume, force=args.force, seed=args.seed,
            progress=talk and sys.stderr.isatty(), runtime=runtime,
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
        print(
            f"note: EASIER replaced {', '.join(result.identity_sites)} by the identity; 'egp-export compile' restores "
            "them from --arch, so compile this result from Python: egp_export.prune.load_pruned(model, path).",
            flush=True,
        )
    print(f"wrote {checkpoint}, {args.out / 'metrics.jsonl'}, plots and per-iteration checkpoints in {args.out}", flush=True)
    if not result.identity_sites:
        print(f"next: egp-export compile --arch {args.arch} --checkpoint {checkpoint} --calibration ... --out DIR", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
