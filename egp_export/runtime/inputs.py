"""What a runtime needs to know before it runs anything: the model's single input, engine files, the error type.

Shared by the inference backends (backends.py) and the TensorRT engine builder
(tensorrt.py), which must not import each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from egp_export.errors import EgpExportError

# A serialised TensorRT engine instead of an ONNX file (trtexec's and Polygraphy's usual names).
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# numpy dtype kinds that hold no numbers (ONNX string tensors load as object arrays): random_batch cannot draw them.
TEXT_KINDS = "OSU"


class BackendError(EgpExportError):
    """A backend is unknown, not installed here, or cannot load or run the model."""


# Inputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """The model's single input: name, per-sample shape, dtype, and its fixed batch size if it has one."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    fixed_batch: int | None = None

    def check_batch(self, batch_size: int) -> None:
        if batch_size < 1:
            raise BackendError(f"batch size must be positive, got {batch_size}.")
        if self.fixed_batch is not None and batch_size != self.fixed_batch:
            raise BackendError(
                f"the model's input {self.name!r} has a fixed batch size of {self.fixed_batch}; profile it at batch "
                f"{self.fixed_batch}, or export it with a dynamic batch dimension (export_onnx(dynamic_batch=True))."
            )

    def random_batch(self, batch_size: int, seed: int = 0) -> np.ndarray:
        """Standard-normal inputs of this spec (seeded: both sides of a comparison see the same data)."""
        self.check_batch(batch_size)
        generator = np.random.default_rng(seed)
        return generator.standard_normal((batch_size, *self.sample_shape)).astype(self.dtype)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "sample_shape": list(self.sample_shape),
            "dtype": str(np.dtype(self.dtype)),
            "fixed_batch": self.fixed_batch,
        }


def spec_from_dims(
    name: str, dims: Sequence[int | None], dtype: np.dtype, input_shape: Sequence[int] | None, where: str
) -> InputSpec:
    """An InputSpec from a model's input dimensions (None or negative = dynamic) and the user's sample shape."""
    if not dims:
        raise BackendError(f"{where}: the input {name!r} is a scalar; egp-export profiles batched inputs.")
    batch_dim, rest = dims[0], list(dims[1:])
    fixed_batch = batch_dim if batch_dim is not None and batch_dim > 0 else None
    if input_shape is not None:
        given = tuple(int(size) for size in input_shape)
        if len(given) != len(rest) or any(d is not None and d > 0 and d != g for d, g in zip(rest, given)):
            shown = ", ".join("?" if d is None or d < 0 else str(d) for d in rest)
            raise BackendError(
                f"{where}: --input-shape {' '.join(map(str, given))} does not fit the input {name!r} "
                f"of per-sample shape ({shown})."
            )
        return InputSpec(name, given, np.dtype(dtype), fixed_batch)
    if any(d is None or d < 0 for d in rest):
        shown = ", ".join("?" if d is None or d < 0 else str(d) for d in rest)
        raise BackendError(
            f"{where}: the input {name!r} has dynamic dimensions besides the batch ({shown}); "
            "give the per-sample shape with --input-shape (input_shape=)."
        )
    return InputSpec(name, tuple(int(d) for d in rest), np.dtype(dtype), fixed_batch)


def onnx_input_spec(model, input_shape: Sequence[int] | None = None) -> InputSpec:
    """The InputSpec of a single-input ONNX model (path or ModelProto); weights are not loaded."""
    import onnx

    if isinstance(model, onnx.ModelProto):
        proto, where = model, "the ONNX model"
    else:
        path = Path(model)
        where = str(path)
        try:
            proto = onnx.load(str(path), load_external_data=False)
        except FileNotFoundError:
            raise BackendError(f"{path} does not exist; give the path of an ONNX file.") from None
        except Exception as error:
            raise BackendError(f"{path} is not a readable ONNX file ({type(error).__name__}: {error}).") from None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [value for value in proto.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise BackendError(
            f"{where} has {len(inputs)} inputs ({', '.join(v.name for v in inputs)}); egp-export profiles single-input models."
        )
    value = inputs[0]
    dtype = _numeric_dtype(value.type)
    if dtype is None:
        raise BackendError(
            f"{where}: the input {value.name!r} has type {_type_name(value.type)}; egp-export feeds one numeric "
            "tensor (float, integer or bool) to a model, so export it with such an input."
        )
    dims = [d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in value.type.tensor_type.shape.dim]
    return spec_from_dims(value.name, dims, dtype, input_shape, where)


def _numeric_dtype(type_proto) -> np.dtype | None:
    """The numpy dtype of a numeric tensor type; None for anything else (sequence, map, optional, sparse,
    string, or an undeclared element type)."""
    import onnx

    if type_proto.WhichOneof("value") != "tensor_type":
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(type_proto.tensor_type.elem_type))
    except KeyError:  # element type 0, UNDEFINED
        return None
    return None if dtype.kind in TEXT_KINDS else dtype


def _type_name(type_proto) -> str:
    """An ONNX value type as ONNX writes it: tensor(float), sequence of tensor(float), map(int64, tensor(float))."""
    import onnx

    def element(elem_type: int) -> str:
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "undefined"

    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return f"tensor({element(type_proto.tensor_type.elem_type)})"
    if kind == "sparse_tensor_type":
        return f"sparse tensor({element(type_proto.sparse_tensor_type.elem_type)})"
    if kind == "sequence_type":
        return f"sequence of {_type_name(type_proto.sequence_type.elem_type)}"
    if kind == "optional_type":
        return f"optional {_type_name(type_proto.optional_type.elem_type)}"
    if kind == "map_type":
        return f"map({element(type_proto.map_type.key_type)}, {_type_name(type_proto.map_type.value_type)})"
    return kind or "no declared type"
