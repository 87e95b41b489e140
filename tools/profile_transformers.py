"""Benchmark: ONNX Runtime CPU latency of a Hugging Face BERT / ViT with EASIER-style identity MLPs, exported as it
is (the baseline a user has today) vs compiled through the torch.export front end.

Usage:
    python tools/profile_transformers.py --model bert [--layers 4] [--hidden 256] [--identity 1 3] [--batch 8]

The model is built from a config (random weights, nothing downloaded); the MLP activation of each ``--identity``
layer becomes the identity (egp_export.testing.identity_mlp_layers), as entropy-guided depth reduction leaves a
block whose GELU has zero entropy. It is compiled with ``frontend="export"`` on random token ids (images for
ViT), both models are exported with export_onnx (dynamo exporter, onnx-simplifier, dynamic batch) and timed in one
process, interleaved (A/B rounds, egp_export.runtime.profiler.round_orders), one ONNX Runtime thread each, on
real token ids below the vocabulary size. Prints one Markdown row: median latency of each, the ratio of medians
(baseline / compiled) and what the compile did.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import egp_export
from egp_export.analysis.numerics import compare
from egp_export.export.onnx import export_onnx
from egp_export.runtime.profiler import ratio_of_medians, round_orders, run_interleaved
from egp_export.testing import identity_mlp_layers


def build(kind: str, layers: int, hidden: int, sequence: int, image: int) -> tuple[torch.nn.Module, callable]:
    import transformers

    common = {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": 4 * hidden, "return_dict": False,
    }
    if kind == "bert":
        vocabulary = 1000
        model = transformers.BertModel(transformers.BertConfig(vocab_size=vocabulary, max_position_embeddings=sequence, **common))

        def sample(samples: int, seed: int) -> torch.Tensor:
            return torch.randint(0, vocabulary, (samples, sequence), generator=torch.Generator().manual_seed(seed))
    else:
        model = transformers.ViTModel(transformers.ViTConfig(image_size=image, patch_size=16, **common))

        def sample(samples: int, seed: int) -> torch.Tensor:
            return torch.randn(samples, 3, image, image, generator=torch.Generator().manual_seed(seed))

    return model.eval(), sample


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("bert", "vit"), default="bert")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--identity", type=int, nargs="+", default=[1, 3], help="layers whose MLP activation is the identity")
    parser.add_argument("--sequence", type=int, default=128, help="BERT sequence length")
    parser.add_argument("--image", type=int, default=64, help="ViT image size")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, sample = build(args.model, args.layers, args.hidden, args.sequence, args.image)
    identity_mlp_layers(model, tuple(args.identity))
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = egp_export.compile(model, sample(64, seed=1), frontend="export")
    compile_seconds = time.perf_counter() - started
    fresh = sample(args.batch, seed=2)
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        paths = {}
        for side, module in (("baseline", model), ("candidate", result.module)):
            paths[side] = export_onnx(module, fresh[:2], Path(folder) / f"{side}.onnx", exporter="dynamo", force=True).path
        sessions = {side: session(path) for side, path in paths.items()}
        feeds = {side: {s.get_inputs()[0].name: fresh.numpy()} for side, s in sessions.items()}
        outputs = {side: sessions[side].run(None, feeds[side]) for side in sessions}
        baseline, compiled = (tuple(torch.from_numpy(o) for o in outputs[side]) for side in ("baseline", "candidate"))
        error = compare(baseline, compiled)

        def measure(side: str):
            def run(count: int) -> np.ndarray:
                sessions[side].run(None, feeds[side])  # one untimed run per block
                times = []
                for _ in range(count):
                    begin = time.perf_counter()
                    sessions[side].run(None, feeds[side])
                    times.append((time.perf_counter() - begin) * 1e3)
                return np.asarray(times)

            return run

        orders = round_orders(args.rounds, "alternate")
        timings = run_interleaved({side: measure(side) for side in sessions}, orders, args.iterations)
    medians = {side: float(np.median(values)) for side, values in timings.items()}
    ratio = ratio_of_medians(timings["baseline"], timings["candidate"])
    kinds = [r["kind"] for r in result.report["rewrites"]]
    print(f"command: python tools/{Path(__file__).name} {shlex.join(argv)}")
    print(
        f"| {args.model} L={args.layers} H={args.hidden} identity={args.identity} batch={args.batch} "
        f"| {medians['baseline']:.2f} ms | {medians['candidate']:.2f} ms | {ratio:.2f}x "
        f"| {kinds.count('linear_merged')} merged, {kinds.count('residual_folded')} residuals folded "
        f"| layers {result.report['before']['layers']}->{result.report['after']['layers']} "
        f"| ORT compiled vs baseline max_rel {error.max_rel:.2g} | compile {compile_seconds:.0f} s |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
