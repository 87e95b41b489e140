"""The literature's other pruning methods on the digits ResNet: dense -> pruned, held-out accuracy, what was removed.

Usage:
    python tools/run_methods.py [--seed 0] [--quick]

Trains the demo's ``digits_resnet`` (dense), then runs each method's entry
function on the fit split with the validation split choosing epochs, and
measures everything on the held-out test split (450 digits), one CPU thread:

  sap       Diao et al. 2023: PQ Index pruning, rewind to init, retrain (from the untrained model)
  energy    Soltani et al.: residual units removed by class energy distance + 1-D k-means (2 stages)
  dcor      the same with distance correlation to the outputs as the score
  itpruner  Zheng et al.: CKA importance, widths for 50 % of the MACs, trained from scratch

Then prints the per-unit measures (energy, dcor, nhsic) and the PQ Index of
the dense model's layers (``layer_measures``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

import torch

from egp_export.demo.digits import digits_resnet
from egp_export.io.datasets import load_digits_split
from egp_export.measures import layer_measures, model_macs
from egp_export.prune.blocks import prune_energy
from egp_export.prune.itpruner import prune_itpruner
from egp_export.prune.sap import prune_sap, sparsity
from egp_export.prune.training import OptimConfig, as_dataset, evaluate, train


def zero_fraction(model: torch.nn.Module) -> float:
    """Fraction of conv/linear weights that are exactly zero."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return sum(int((m.weight == 0).sum()) for m in layers) / sum(m.weight.numel() for m in layers)


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
    dense_test, dense_macs = evaluate(dense, test), model_macs(dense, example)
    rows = [("dense", dense_test, dense_test, 0.0, 4, dense_macs, "", time.perf_counter() - started)]

    runs = {
        "sap": lambda: prune_sap(untrained, train_data, val_data, iterations=5, epochs=epochs(20), batch_size=64,
                                 lr=0.1, seed=args.seed),
        "energy": lambda: prune_energy(dense, train_data, val_data, stages=2, rounds=5, samples=256,
                                       epochs=epochs(10), batch_size=64, seed=args.seed),
        "dcor": lambda: prune_energy(dense, train_data, val_data, score="dcor", stages=2, rounds=5, samples=256,
                                     epochs=epochs(10), batch_size=64, seed=args.seed),
        "itpruner": lambda: prune_itpruner(dense, train_data, val_data, rebuild=digits_resnet, flops_ratio=0.5,
                                           epochs=epochs(20), batch_size=64, lr=0.1, seed=args.seed),
    }
    outcomes = {}
    for name, run in runs.items():
        clock = time.perf_counter()
        outcome = run()
        outcomes[name] = outcome
        units = sum(1 for m in outcome.model.modules() if type(m).__name__ == "ExpansionBlock")
        if name == "sap":
            what = f"iteration {outcome.details['iteration']}, sparsity {outcome.details['sparsity']:.3f}"
            dense_of_run = None
        elif name == "itpruner":
            what = "widths " + ", ".join(f"{k}={v}" for k, v in outcome.arch_kwargs["hidden_widths"].items())
            dense_of_run = dense_test
        else:
            what = "removed " + ", ".join(outcome.arch_kwargs["removed_blocks"])
            dense_of_run = dense_test
        rows.append((name, dense_of_run, evaluate(outcome.model, test), zero_fraction(outcome.model), units,
                     model_macs(outcome.model, example), what, time.perf_counter() - clock))

    sap_dense = outcomes["sap"].history[0]
    print("| method | dense test acc | pruned test acc | zero weights | residual units | MACs | what | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name, dense_acc, acc, zeros, units, macs, what, seconds in rows:
        shown = "(own dense, see below)" if dense_acc is None else f"{dense_acc:.4f}"
        print(f"| {name} | {shown} | {acc:.4f} | {zeros:.3f} | {units} | {macs:,.0f} | {what} | {seconds:.0f} |")
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
