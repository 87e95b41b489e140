"""The seeds' pruning methods on the digits ResNet: dense -> pruned -> compiled, accuracy, depth and latency.

Usage:
    python tools/run_methods.py [--seed 0] [--quick]

Trains the demo's ``digits_resnet`` (dense), then runs each method on the
fit split with the validation split choosing epochs, and measures everything
on the held-out test split (450 digits), one CPU thread:

  egp       EGP (reference entropy), the demo's settings: until 3 activation sites are linear
  nepenthe  NEPENTHE (entropy-weighted budgets), the same settings
  easier    EASIER: one layer's activation replaced by the identity per iteration, 2 iterations
  sap       Diao et al. 2023: PQ Index pruning, rewind to init, retrain (from the untrained model)
  energy    Soltani et al.: residual units removed by class energy distance + 1-D k-means (2 stages)
  dcor      the same with distance correlation to the outputs as the score
  itpruner  Zheng et al.: CKA importance, widths for 50 % of the MACs, trained from scratch

Every pruned model goes the way a user's checkpoint goes: the literature's
methods write ``pruned.pt`` and the model is rebuilt from it
(``outcome.rebuild``, what ``egp-export compile --checkpoint`` does); then
``egp_export.compile`` (the train split as calibration data, its validation
part held out) and ``export_onnx`` from a batch-1 example. Accuracies of the
pruned and compiled models are ONNX Runtime's; depth is the longest
conv/linear chain of the traced graph; latencies are ONNX Runtime CPU
medians of interleaved A/B runs (dense vs compiled, pruned vs compiled) at
batch 1 and 64.

Then prints the per-unit measures (energy, dcor, nhsic) and the PQ Index of
the dense model's layers (``layer_measures``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from egp_export.analysis.fx import propagate_shapes
from egp_export.analysis.summary import summarize
from egp_export.analysis.trace import trace
from egp_export.compiler import compile as compile_model
from egp_export.demo.digits import digits_resnet
from egp_export.export.onnx import export_onnx, ort_session, run_onnx
from egp_export.io.datasets import load_digits_split
from egp_export.measures import layer_measures, model_macs
from egp_export.prune.api import prune
from egp_export.prune.blocks import prune_energy
from egp_export.prune.itpruner import prune_itpruner
from egp_export.prune.outcome import rebuild
from egp_export.prune.sap import prune_sap, sparsity
from egp_export.prune.training import OptimConfig, as_dataset, evaluate, train
from egp_export.runtime.profiler import compare

BATCH_SIZES = (1, 64)


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of conv/linear weights that are exactly zero."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


def depth_of(model: torch.nn.Module, example: torch.Tensor) -> int:
    """Longest conv/linear chain of the traced model."""
    graph = trace(model)
    propagate_shapes(graph, example)
    return summarize(graph)["depth"]


def onnx_accuracy(path: Path, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    predictions = torch.as_tensor(run_onnx(ort_session(path), inputs)[0]).argmax(dim=1)
    return float((predictions == labels).to(torch.float64).mean())


def compile_and_time(name: str, model: torch.nn.Module, dense_onnx: Path, data: dict, folder: Path, quick: bool) -> dict:
    """Compile and export ``model``; ONNX accuracies, depths and interleaved latencies against the dense and pruned files."""
    x, x_test, y_test, holdout = data["x"], data["x_test"], data["y_test"], data["holdout"]
    example = x[:1]
    result = compile_model(model, x, holdout=holdout)
    pruned = export_onnx(model, example, folder / f"{name}_pruned.onnx", verify_inputs=x_test)
    compiled = export_onnx(result.module, example, folder / f"{name}_compiled.onnx", verify_inputs=x_test)
    report = result.report
    row = {
        "pruned_acc": onnx_accuracy(pruned.path, x_test, y_test),
        "compiled_acc": onnx_accuracy(compiled.path, x_test, y_test),
        "depth_pruned": report["before"]["depth"],
        "depth_compiled": report["after"]["depth"],
        "macs_compiled": report["after"]["macs"],
        "linearized": report["activations_linearized"],
        "activations": report["before"]["activations"],
        "max_rel": report["verification"]["pytorch"]["max_rel"],
    }
    rounds, iterations = (6, 10) if quick else (30, 30)
    for batch in BATCH_SIZES:
        versus_dense = compare(dense_onnx, compiled.path, batch_size=batch, rounds=rounds, iterations=iterations)
        versus_pruned = compare(pruned.path, compiled.path, batch_size=batch, rounds=rounds, iterations=iterations)
        row[f"b{batch}"] = {
            "dense_ms": versus_dense.baseline_stats.median,
            "pruned_ms": versus_pruned.baseline_stats.median,
            "compiled_ms": versus_dense.candidate_stats.median,
            "compiled_over_dense": 1 / versus_dense.speedup,
            "compiled_over_pruned": 1 / versus_pruned.speedup,
        }
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run, not the documented numbers)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 0.25 if args.quick else 1.0

    def epochs(count: int) -> int:
        return max(1, round(count * scale))

    x, y, x_test, y_test = load_digits_split(seed=args.seed)
    fit = len(x) - round(0.2 * len(x))
    train_data, val_data, test = (x[:fit], y[:fit]), (x[fit:], y[fit:]), as_dataset((x_test, y_test), "test")
    data = {"x": x, "x_test": x_test, "y_test": y_test, "holdout": (len(x) - fit) / len(x)}
    example = x[:1]
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"digits: {fit} fit / {len(x) - fit} validation / {len(x_test)} test; torch {torch.__version__}, 1 thread\n")

    started = time.perf_counter()
    torch.manual_seed(args.seed)
    untrained = digits_resnet()
    dense = digits_resnet()
    dense.load_state_dict(untrained.state_dict())
    train(dense, as_dataset(train_data, "fit"), OptimConfig(epochs=epochs(20), lr=0.1, scheduler="cosine", batch_size=64),
          seed=args.seed)
    dense_test, dense_macs, dense_depth = evaluate(dense, test), model_macs(dense, example), depth_of(dense, example)

    egp_settings = {"rate": 0.5, "iterations": 8, "target_linear_sites": 3, "max_accuracy_drop": 0.02,
                    "epochs_per_iteration": epochs(6), "lr": 0.05, "scheduler": "cosine", "batch_size": 64,
                    "seed": args.seed, "progress": False}
    egp_family = {
        "egp": lambda: prune(dense, train_data, val_data, "egp", **egp_settings),
        "nepenthe": lambda: prune(dense, train_data, val_data, "nepenthe", **egp_settings),
        "easier": lambda: prune(dense, train_data, val_data, "easier",
                                **{**egp_settings, "iterations": 2, "target_linear_sites": None}),
    }
    literature = {
        "sap": lambda folder: prune_sap(untrained, train_data, val_data, iterations=5, epochs=epochs(20), batch_size=64,
                                        lr=0.1, seed=args.seed, out_dir=folder),
        "energy": lambda folder: prune_energy(dense, train_data, val_data, stages=2, rounds=5, samples=256,
                                              epochs=epochs(10), batch_size=64, seed=args.seed, out_dir=folder),
        "dcor": lambda folder: prune_energy(dense, train_data, val_data, score="dcor", stages=2, rounds=5, samples=256,
                                            epochs=epochs(10), batch_size=64, seed=args.seed, out_dir=folder),
        "itpruner": lambda folder: prune_itpruner(dense, train_data, val_data, rebuild=digits_resnet, flops_ratio=0.5,
                                                  epochs=epochs(20), batch_size=64, lr=0.1, seed=args.seed,
                                                  out_dir=folder),
    }
    rows, outcomes = [], {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        dense_onnx = export_onnx(dense, example, folder / "dense.onnx", verify_inputs=x_test).path
        for name, run in egp_family.items():
            clock = time.perf_counter()
            result = run()
            final = result.final
            what = (f"iteration {final['iteration']}, {final['linear_sites']} linear sites"
                    + (f", sparsity {final['sparsity']:.3f}" if name != "easier" else ""))
            rows.append({"method": name, "removed": what, "zeros": zero_fraction(result.model),
                         "pruned_torch_acc": evaluate(result.model, test), "prune_seconds": time.perf_counter() - clock,
                         **compile_and_time(name, result.model, dense_onnx, data, folder, args.quick)})
        for name, run in literature.items():
            clock = time.perf_counter()
            outcome = run(folder / name)
            outcomes[name] = outcome
            if name == "sap":
                what = f"iteration {outcome.details['iteration']}, sparsity {outcome.details['sparsity']:.3f}"
            elif name == "itpruner":
                what = "widths " + ", ".join(f"{k}={v}" for k, v in outcome.arch_kwargs["hidden_widths"].items())
            else:
                what = "removed " + ", ".join(outcome.arch_kwargs["removed_blocks"])
            seconds = time.perf_counter() - clock
            # What `egp-export compile --arch egp_export.demo.digits:digits_resnet --checkpoint pruned.pt` loads.
            model = rebuild(digits_resnet, outcome.paths["pruned.pt"])
            rows.append({"method": name, "removed": what, "zeros": zero_fraction(model),
                         "pruned_torch_acc": evaluate(model, test), "prune_seconds": seconds,
                         **compile_and_time(name, model, dense_onnx, data, folder, args.quick)})

    print(f"dense: test accuracy {dense_test:.4f} (PyTorch), depth {dense_depth}, MACs {dense_macs:,.0f}\n")
    print("| method | what was pruned | zero weights | test acc pruned | test acc compiled | depth dense -> pruned "
          "-> compiled | MACs compiled | linearized | max_rel | prune s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['removed']} | {row['zeros']:.3f} | {row['pruned_acc']:.4f} | "
              f"{row['compiled_acc']:.4f} | {dense_depth} -> {row['depth_pruned']} -> {row['depth_compiled']} | "
              f"{row['macs_compiled']:,.0f} | {row['linearized']}/{row['activations']} | {row['max_rel']:.1e} | "
              f"{row['prune_seconds']:.0f} |")
    print("\nlatency, ONNX Runtime CPU (1 thread), medians in ms; ratios from interleaved A/B runs "
          "(compiled / dense, compiled / pruned; below 1 = faster):")
    print("| method | " + " | ".join(f"b{b} dense | b{b} pruned | b{b} compiled | b{b} c/d | b{b} c/p"
                                     for b in BATCH_SIZES) + " |")
    print("|---|" + "---|" * (5 * len(BATCH_SIZES)))
    for row in rows:
        cells = []
        for b in BATCH_SIZES:
            t = row[f"b{b}"]
            cells.append(f"{t['dense_ms']:.3f} | {t['pruned_ms']:.3f} | {t['compiled_ms']:.3f} | "
                         f"{t['compiled_over_dense']:.3f} | {t['compiled_over_pruned']:.3f}")
        print(f"| {row['method']} | " + " | ".join(cells) + " |")
    for row in rows:
        if abs(row["pruned_acc"] - row["pruned_torch_acc"]) > 1e-9:
            print(f"note: {row['method']}: PyTorch test accuracy {row['pruned_torch_acc']:.4f} vs ONNX Runtime "
                  f"{row['pruned_acc']:.4f}")

    sap_dense = outcomes["sap"].history[0]
    print(f"\nSAP trains its own dense model from the initialisation: validation accuracy {sap_dense['accuracy']:.4f}; "
          "per iteration (validation accuracy, sparsity of the prunable weights):")
    for record in outcomes["sap"].history:
        print(f"  iteration {record['iteration']}: {record['accuracy']:.4f}, {record['sparsity']:.3f}")
    print(f"SAP result: masked fraction {sparsity(outcomes['sap'].model):.3f} of the prunable weights")
    for name in ("energy", "dcor"):
        for record in outcomes[name].history[1:]:
            scores = ", ".join(f"{k} {v:.3f}" for k, v in record["scores"].items())
            print(f"{name} stage {record['stage']}: K={record['groups']}, scores {scores}; removed {record['removed']}")

    print("\nper-unit measures of the dense model (layer_measures):")
    print("| unit | energy | dcor | nhsic t | nhsic alpha (beta=1) |")
    print("|---|---|---|---|---|")
    measured = {m: {row["name"]: row for row in layer_measures(dense, train_data, m, samples=256, seed=args.seed)}
                for m in ("energy", "dcor", "nhsic")}
    for unit in measured["energy"]:
        print(f"| {unit} | {measured['energy'][unit]['value']:.3f} | {measured['dcor'][unit]['value']:.3f} | "
              f"{measured['nhsic'][unit]['value']:.4f} | {measured['nhsic'][unit]['alpha']:.4f} |")
    print("\nPQ Index (p=0.5, q=1) of the dense model's weights and SAP's count at the defaults:")
    print("| weight | PQI | unmasked d | r | SAP prunes c |")
    print("|---|---|---|---|---|")
    for row in layer_measures(dense, measure="pqi"):
        print(f"| {row['name']} | {row['value']:.4f} | {row['unmasked']} | {row['sap_r']} | {row['sap_prune']} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
