"""fp16 ONNX files whose weights and activations fit fp16's range, verified against the fp32 module.

    fp32 ONNX (already verified) → observed range of every float tensor on the
    range samples → nodes kept fp32 → onnxruntime.transformers.float16
    (``keep_io_types``, ``node_block_list``) → fp32→fp16→fp32 round trips
    removed → onnx.checker → checked on the verify samples against the
    module's fp32 outputs, at a tolerance from the reference model's own fp16
    noise; top-1 agreement on [batch, classes] outputs.

Nodes kept fp32, each listed with its reason (``KeptNode``):

- ``weights``: a float initializer of the node (a merged layer's weights)
  holds a value beyond ``FP16_SAFE_MAX``;
- ``activations``: an input or output of the node reached ``|x| > FP16_SAFE_MAX``
  on the range samples, so an overflowing tensor's producer and every consumer
  stay fp32 and the tensor never passes through fp16.

``FP16_SAFE_MAX`` is half of fp16's largest finite value (65504): ranges are
observed on the range samples only, and held-out inputs may go beyond them.

Why the round trips are removed: the converter casts a kept node's fp32
output to fp16 and back for the next kept node, and every fp32 graph input to
fp16 before a kept consumer casts it back (onnxruntime 1.32,
``transformers/float16.py``): a tensor beyond fp16's range would be inf
between two fp32 nodes. ``Cast(fp16)`` followed by ``Cast(fp32)`` is replaced
by the fp32 tensor itself, which only removes a rounding.

How it is checked: ONNX Runtime's CPU provider has no fp16 kernels for
Conv, Relu, Gemm and most ops; it casts their fp16 weights to fp32 and runs
the whole chain in fp32, dropping the fp16 roundings between ops (onnxruntime
1.32: an unguarded file whose activations reach 5.8e6 gives finite outputs
there, and inf on a GPU). So the file is checked twice, both within the
tolerance: as it is on ONNX Runtime CPU (fp16 weights, fp32 arithmetic), and
as an emulation (``emulation``): the same graph in fp32 where every tensor the
file holds in fp16 is rounded to fp16 (``Cast`` to fp16 and back, which ONNX
Runtime keeps in an fp32 graph): fp16 storage with fp32 arithmetic, what GPU
kernels accumulating in fp32 compute. Overflow shows there as inf.

Tolerance: fp16 rounds every value to 11 significant bits and the error grows
through the network, so no fixed number fits every model. The check allows
``NOISE_FACTOR`` (as for fp32, ``analysis.numerics``) times the reference's
fp16 noise: its error, converted the same way, against its own fp32 PyTorch
outputs. The compile's reference is the original model on the held-out
samples (the compiled file should be no noisier in fp16 than the model it
replaces); without one it is the module itself on the range samples, so that
the held-out check is not the measurement it is judged by. Never below
``FP16_RTOL_FLOOR`` (fp16's unit roundoff), never above ``FP16_NOISE_CAP``
(1e-2): random-weight zoo networks are so ill-conditioned that their own fp16
noise is of the output's size (torchvision resnet18 0.89, timm resnet10t
0.72, regnetx_002 1.02 at 32x32 on 51 held-out samples, ``python
tools/fp16_zoo.py``); 8x that would pass anything. Trained, the same resnet18
is 9.0e-4 (one epoch on the digits at 32x32; its compiled fp16 file 9.0e-4,
top-1 agreement 100% on 269 held-out and 450 test digits: ``pytest -m slow -s
tests/export/test_fp16.py -k zoo``).
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from egp_export.analysis.numerics import NOISE_FACTOR, ErrorAccumulator, ErrorStats, output_leaves
from egp_export.errors import ExportError, VerificationError

FP16_MAX = 65504.0  # largest finite float16
FP16_SAFE_MAX = FP16_MAX / 2  # observed on the range samples only: leave held-out inputs a factor of 2
FP16_RTOL_FLOOR = 2.0**-11  # fp16's unit roundoff
# Beyond 1% of the output's scale fp16 changes answers, not last digits: the project's fp16 tolerance for TensorRT
# engines (runtime/tensorrt.py TRT_FP16_RTOL). A model noisier than that in fp16 is refused, not excused.
FP16_NOISE_CAP = 1e-2
DTYPES = ("fp32", "fp16")


class KeepReason(str, enum.Enum):
    WEIGHTS = "weights"
    ACTIVATIONS = "activations"


_WORDING = {
    KeepReason.WEIGHTS: "weights up to {value:.3g}, beyond fp16's safe range {limit:g}",
    KeepReason.ACTIVATIONS: "activations up to {value:.3g} on the range samples, beyond fp16's safe range {limit:g}",
}


@dataclass(frozen=True)
class KeptNode:
    """A node of the fp16 file left in fp32, and why."""

    node: str
    op_type: str
    reason: KeepReason
    value: float  # the largest |value| that did not fit

    def describe(self) -> str:
        text = _WORDING[self.reason].format(value=self.value, limit=FP16_SAFE_MAX)
        return f"{self.node} ({self.op_type}): {text}"

    def to_dict(self) -> dict:
        return {"node": self.node, "op_type": self.op_type, "reason": self.reason.value, "value": self.value,
                "text": self.describe()}


@dataclass
class Fp16Result:
    """What stayed fp32 in the fp16 file, and how far the file is from the module."""

    kept_fp32: list[KeptNode]
    nodes: int  # nodes of the fp32 graph
    error: ErrorStats  # the fp16 emulation vs the module's fp32 outputs on the verify samples
    file_error: ErrorStats  # the file on ONNX Runtime CPU (fp16 weights, fp32 arithmetic), same samples
    rtol: float
    noise: float  # the reference's fp16 noise
    noise_source: str
    samples: int
    top1_agreement: dict[str, float] = field(default_factory=dict)  # output path -> fraction, [batch, classes] outputs
    op_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        top1 = "; ".join(f"top-1 agreement {share:.2%} on {name}" for name, share in self.top1_agreement.items())
        kept = f"{len(self.kept_fp32)} of {self.nodes} nodes kept fp32"
        return (f"fp16: {kept}; {self.error.describe()} on {self.samples} samples (fp16 emulated; the file on ONNX "
                f"Runtime CPU {self.file_error.max_rel:.3g}), allowed {self.rtol:.3g} ({NOISE_FACTOR:g} x the fp16 "
                f"noise of {self.noise_source}, {self.noise:.3g})" + (f"; {top1}" if top1 else ""))

    def to_dict(self) -> dict:
        return {
            "kept_fp32": [node.to_dict() for node in self.kept_fp32],
            "nodes": self.nodes,
            "error": self.error.to_dict(),
            "file_error": self.file_error.to_dict(),
            "rtol": self.rtol,
            "noise": self.noise,
            "noise_factor": NOISE_FACTOR,
            "noise_source": self.noise_source,
            "samples": self.samples,
            "top1_agreement": dict(self.top1_agreement),
            "op_counts": dict(self.op_counts),
        }


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")


def _session(data: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])


def _run(session: onnxruntime.InferenceSession, batch: torch.Tensor) -> list[np.ndarray]:
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(batch.detach().cpu().numpy())})


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose every node has a unique name (the block list names nodes)."""
    named = onnx.ModelProto()
    named.CopyFrom(model)
    seen: set[str] = set()
    for index, node in enumerate(named.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return named


def tensor_ranges(model: onnx.ModelProto, batches: Sequence[torch.Tensor]) -> dict[str, float]:
    """Largest finite |value| of every float tensor (graph inputs, node outputs) on ``batches``, one batch at a time;
    float initializers and constants are read from the graph."""
    ranges: dict[str, float] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT:
            ranges[tensor.name] = _largest(numpy_helper.to_array(tensor))
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    shown = {value.name for value in probe.graph.output}
    for node in probe.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.t.data_type == TensorProto.FLOAT:
                    ranges[node.output[0]] = _largest(numpy_helper.to_array(attribute.t))
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in node.output if n and n not in shown)
        shown.update(node.output)
    session = _session(probe.SerializeToString())
    names = [output.name for output in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    for batch in batches:
        values = dict(zip(names, _run(session, batch)))
        values[input_name] = batch.detach().cpu().numpy()
        for name, value in values.items():
            if isinstance(value, np.ndarray) and value.dtype == np.float32:
                ranges[name] = max(ranges.get(name, 0.0), _largest(value))
    return ranges


def _largest(values: np.ndarray) -> float:
    finite = np.abs(values[np.isfinite(values)])
    return float(finite.max()) if finite.size else 0.0


def nodes_beyond_range(model: onnx.ModelProto, ranges: dict[str, float], limit: float = FP16_SAFE_MAX) -> list[KeptNode]:
    """The nodes whose float inputs or outputs go beyond ``limit``: weights first, else the activation's."""
    weights = {t.name for t in model.graph.initializer}
    kept = []
    for node in model.graph.node:
        touching = [name for name in (*node.input, *node.output) if name and ranges.get(name, 0.0) > limit]
        if not touching:
            continue
        heavy = [name for name in touching if name in weights]
        reason = KeepReason.WEIGHTS if heavy else KeepReason.ACTIVATIONS
        kept.append(KeptNode(node.name, node.op_type, reason, max(ranges[name] for name in (heavy or touching))))
    return kept


def convert(model: onnx.ModelProto, kept: Sequence[KeptNode]) -> onnx.ModelProto:
    """``model`` in fp16 but for the ``kept`` nodes, fp32 inputs and outputs; checked with onnx.checker."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    half = convert_float_to_float16(
        _named(model), keep_io_types=True, node_block_list=[node.node for node in kept], max_finite_val=FP16_MAX
    )
    _sort_topologically(half.graph)  # the converter appends its casts at the end
    _remove_round_trips(half.graph)
    del half.graph.value_info[:]  # types changed around the removed casts; shape inference recomputes them
    try:
        half = onnx.shape_inference.infer_shapes(half, strict_mode=True)
        onnx.checker.check_model(half)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the fp16 graph is not type-consistent: {str(error).strip().splitlines()[0]}") from error
    return half


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _remove_round_trips(graph: onnx.GraphProto) -> None:
    """Replace ``Cast(to=fp32)(Cast(to=fp16)(x))`` with x where x is fp32 (an Identity where it is a graph output)."""
    producer = {name: node for node in graph.node for name in node.output}
    float_types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info, *graph.output)}
    float_types.update({t.name: t.data_type for t in graph.initializer})
    outputs = {value.name for value in graph.output}
    renamed: dict[str, str] = {}
    for node in list(graph.node):
        first = producer.get(node.input[0]) if _cast_to(node) == TensorProto.FLOAT else None
        if first is None or _cast_to(first) != TensorProto.FLOAT16:
            continue
        source = first.input[0]
        if source in producer and _cast_to(producer[source]) == TensorProto.FLOAT:
            pass  # produced by a cast to fp32: fp32 for sure
        elif float_types.get(source) != TensorProto.FLOAT:
            continue
        if node.output[0] in outputs:
            node.op_type, node.input[0] = "Identity", source
            del node.attribute[:]
        else:
            renamed[node.output[0]] = source
            graph.node.remove(node)
    for node in graph.node:
        for index, name in enumerate(node.input):
            node.input[index] = renamed.get(name, name)
    _drop_dead_nodes(graph)


def _sort_topologically(graph: onnx.GraphProto) -> None:
    available = {value.name for value in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [node for node in pending if all(name in available for name in node.input)]
        if not ready:
            raise ExportError(f"the fp16 graph has a cycle or an undefined input at {pending[0].name}")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        placed = {id(node) for node in ready}
        pending = [node for node in pending if id(node) not in placed]
    del graph.node[:]
    graph.node.extend(ordered)


def _drop_dead_nodes(graph: onnx.GraphProto) -> None:
    needed = {value.name for value in graph.output}
    for node in reversed(list(graph.node)):
        if any(name in needed for name in node.output):
            needed.update(node.input)
        else:
            graph.node.remove(node)


def to_fp16(fp32: bytes, range_batches: Sequence[torch.Tensor]) -> tuple[onnx.ModelProto, list[KeptNode], int]:
    """(the fp16 model, the nodes kept fp32, the number of nodes) of a verified fp32 ONNX file."""
    model = _named(onnx.load_from_string(fp32))
    kept = nodes_beyond_range(model, tensor_ranges(model, range_batches))
    return convert(model, kept), kept, len(model.graph.node)


def emulation(half: onnx.ModelProto) -> onnx.ModelProto:
    """``half`` computed in fp32 with every tensor it holds in fp16 rounded to fp16 (see the module docstring).

    fp16 initializers and constants become fp32 (exactly: they hold fp16 values); a node whose output is fp16
    computes it in fp32 and a ``Cast`` to fp16 and back rounds it, a ``Cast`` to fp16 included.
    """
    typed = onnx.shape_inference.infer_shapes(half, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in (*typed.graph.input, *typed.graph.value_info, *typed.graph.output)}
    emulated = onnx.ModelProto()
    emulated.CopyFrom(half)
    graph = emulated.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == TensorProto.FLOAT16:
            graph.initializer[index].CopyFrom(numpy_helper.from_array(_fp32(tensor), tensor.name))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(_fp32(attribute.t), attribute.t.name))
        nodes.append(node)
        for index, name in enumerate(node.output):
            if types.get(name) == TensorProto.FLOAT16:
                node.output[index] = f"{name}__fp32"
                nodes.append(helper.make_node("Cast", [f"{name}__fp32"], [f"{name}__fp16"], to=TensorProto.FLOAT16))
                nodes.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return emulated


def _fp32(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor).astype(np.float32)


def _outputs(module: nn.Module, batch: torch.Tensor):
    with torch.no_grad():
        return module(batch.clone())  # a model may write into its input


def _compare(model: onnx.ModelProto, module: nn.Module, batches: Sequence[torch.Tensor], references=None):
    """(ErrorStats, top-1 agreement per [batch, classes] output) of ``model`` against the module's fp32 outputs."""
    try:
        session = _session(model.SerializeToString())
    except Exception as error:
        raise ExportError(f"ONNX Runtime cannot load the fp16 model: {str(error).strip().splitlines()[0]}") from error
    errors, agree, total = ErrorAccumulator(), Counter(), Counter()
    for index, batch in enumerate(batches):
        reference = references[index] if references is not None else _outputs(module, batch)
        candidate = _run(session, batch)
        bad = sum(int(np.size(c) - np.count_nonzero(np.isfinite(c))) for c in candidate)
        if bad:
            raise VerificationError(
                f"the fp16 ONNX file gives {bad} non-finite values (inf or NaN) on {tuple(batch.shape)} samples: a "
                "value beyond fp16's range on inputs unlike the range samples; export in fp32, or give range samples "
                "that cover these inputs"
            )
        errors.add(reference, candidate)
        for (name, ref), cand in zip(output_leaves(reference), candidate):
            if isinstance(ref, torch.Tensor) and ref.dim() == 2 and ref.shape[-1] >= 2 and ref.is_floating_point():
                agree[name] += int((ref.argmax(-1).numpy() == cand.argmax(-1)).sum())  # [batch, classes]
                total[name] += int(ref.shape[0])
    return errors.result(), {name: agree[name] / total[name] for name in total}


def _worst(error: ErrorStats) -> float:
    return max(error.max_rel, error.sample_rel)


def fp16_noise(fp32: bytes, module: nn.Module, range_batches: Sequence[torch.Tensor],
               batches: Sequence[torch.Tensor]) -> float:
    """The fp16 noise of ``module``: its fp32 ONNX file ``fp32`` converted as ``to_fp16`` does (ranges from
    ``range_batches``), emulated, against its fp32 PyTorch outputs on ``batches`` (the worst output or sample)."""
    half, _, _ = to_fp16(fp32, range_batches)
    return _worst(_compare(emulation(half), module, batches)[0])


def export_fp16(
    fp32: bytes,
    module: nn.Module,
    range_batches: Sequence[torch.Tensor],
    verify_batches: Sequence[torch.Tensor],
    *,
    references=None,
    noise: float | None = None,
    noise_source: str = "the original model",
) -> tuple[bytes, Fp16Result]:
    """The fp16 version of the verified fp32 file ``fp32`` of ``module`` and its check on ``verify_batches``.

    ``noise``: the reference's fp16 noise (``fp16_noise`` of the original model); None measures the module's own
    on ``range_batches``. ``references``: the module's outputs on ``verify_batches`` when already computed.
    Raises VerificationError when the emulation or the file on ONNX Runtime CPU is beyond
    ``NOISE_FACTOR * noise`` (within ``FP16_RTOL_FLOOR`` and ``FP16_NOISE_CAP``) or gives non-finite values.
    """
    half, kept, nodes = to_fp16(fp32, range_batches)
    emulated = emulation(half)
    if noise is None:
        noise, noise_source = _worst(_compare(emulated, module, range_batches)[0]), "the module itself on the range samples"
    rtol = min(max(FP16_RTOL_FLOOR, NOISE_FACTOR * noise), FP16_NOISE_CAP)
    error, top1 = _compare(emulated, module, verify_batches, references)
    file_error, _ = _compare(half, module, verify_batches, references)
    samples = sum(int(batch.shape[0]) for batch in verify_batches)
    result = Fp16Result(kept, nodes, error, file_error, rtol, noise, noise_source, samples, top1,
                        dict(sorted(Counter(node.op_type for node in half.graph.node).items())))
    for what, measured in (("emulated in fp16", error), ("on ONNX Runtime CPU", file_error)):
        if not measured.within(rtol):
            capped = f", capped at {FP16_NOISE_CAP:g}: fp16 is too coarse for this model" if rtol == FP16_NOISE_CAP else ""
            raise VerificationError(
                f"the fp16 ONNX file ({what}) differs from the module by {measured.describe()} > {rtol:.3g} "
                f"({NOISE_FACTOR:g} x the fp16 noise of {noise_source}, {noise:.3g}{capped}) on {samples} samples; "
                f"{len(kept)} nodes were kept fp32. Export in fp32 (--dtype fp32)"
            )
    return half.SerializeToString(), result
