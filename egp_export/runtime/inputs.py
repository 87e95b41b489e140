"""What a runtime needs to know before it runs anything: the model's named inputs, engine files, the error type,
and the inputs a check or a timing runs on (a user's data, or seeded random ones that say so).

A model takes one or more named inputs (:class:`ModelInputs`, one :class:`InputSpec` each, in the ONNX file's
order); what a backend runs on is a *feed*, a dict from input name to a numpy array ``[batch, ...]``. Every input's
first dimension is the batch. A dynamic dimension beyond the batch needs a size: from the user's data when given,
else by its name in ``dims`` (``--dim seq=12``), else (one input only) from ``input_shape``; a dynamic dimension
with no size is refused, naming it.

Shared by the inference backends (backends.py) and the TensorRT engine builder
(tensorrt.py), which must not import each other.

Random inputs (the default for timing; a numeric check on them says it is not
on real data): floats are standard normal, or uniform in ``val_range``;
integers are ids in ``val_range`` or, when the input indexes an embedding
table (an ONNX ``Gather`` on a constant), in ``[0, rows)`` of that table, else
0 or 1 (a mask); bools are 0 or 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from egp_export.errors import EgpExportError

# A serialised TensorRT engine instead of an ONNX file (trtexec's and Polygraphy's usual names).
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
# numpy dtype kinds that hold no numbers (ONNX string tensors load as object arrays): random_batch cannot draw them.
TEXT_KINDS = "OSU"
# Random integer inputs that index no embedding table: 0 or 1, as an attention mask takes.
DEFAULT_INTEGER_RANGE = (0, 2)
# uint8 data fed to a float input is read as image pixels: divided by 255 in float32, as an image folder is
# (io/datasets.py) and as the compile converts uint8 calibration data (analysis/batches.py): the same values.
UINT8_PIXEL_SCALE = 255.0


class BackendError(EgpExportError):
    """A backend is unknown, not installed here, or cannot load or run the model."""


# Inputs ----------------------------------------------------------------------


@dataclass(frozen=True)
class InputSpec:
    """One input of the model: name, per-sample shape, dtype, and its fixed batch size if it has one."""

    name: str
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    fixed_batch: int | None = None
    id_range: tuple[int, int] | None = None  # integer input indexing an embedding table: its rows, [low, high)

    def check_batch(self, batch_size: int) -> None:
        if batch_size < 1:
            raise BackendError(f"batch size must be positive, got {batch_size}.")
        if self.fixed_batch is not None and batch_size != self.fixed_batch:
            raise BackendError(
                f"the model's input {self.name!r} has a fixed batch size of {self.fixed_batch}; profile it at batch "
                f"{self.fixed_batch}, or export it with a dynamic batch dimension (export_onnx(dynamic_batch=True))."
            )

    def random_batch(self, batch_size: int, seed: int = 0, val_range: tuple[float, float] | None = None) -> np.ndarray:
        """Seeded random inputs of this spec (both sides of a comparison see the same data); module docstring."""
        self.check_batch(batch_size)
        generator = np.random.default_rng(seed)
        shape = (batch_size, *self.sample_shape)
        kind = np.dtype(self.dtype).kind
        if kind in "iu":
            low, high = self.integer_range(val_range)
            return generator.integers(low, high, size=shape).astype(self.dtype)
        if kind == "b":
            return generator.integers(0, 2, size=shape).astype(self.dtype)
        if val_range is not None:
            return generator.uniform(*val_range, size=shape).astype(self.dtype)
        return generator.standard_normal(shape).astype(self.dtype)

    def integer_range(self, val_range: tuple[float, float] | None = None) -> tuple[int, int]:
        """[low, high) of random integer inputs: ``val_range``, the embedding table's rows, or 0 and 1."""
        if val_range is not None:
            low, high = int(np.ceil(val_range[0])), int(np.floor(val_range[1]))
            if high <= low:
                raise BackendError(
                    f"--val-range {val_range[0]:g} {val_range[1]:g} holds no integer for the integer input {self.name!r}; "
                    "give LOW < HIGH with at least one integer in [LOW, HIGH)."
                )
            return low, high
        return self.id_range or DEFAULT_INTEGER_RANGE

    def describe_random(self, val_range: tuple[float, float] | None = None) -> str:
        """How random_batch draws: ``N(0, 1)``, ``uniform [0, 1)``, ``integers in [0, 1000), the embedding table's rows``."""
        kind = np.dtype(self.dtype).kind
        if kind in "iu":
            low, high = self.integer_range(val_range)
            why = ", the embedding table's rows" if val_range is None and self.id_range else ""
            return f"integers in [{low}, {high}){why}"
        if kind == "b":
            return "booleans"
        return "N(0, 1)" if val_range is None else f"uniform [{val_range[0]:g}, {val_range[1]:g})"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "sample_shape": list(self.sample_shape),
            "dtype": str(np.dtype(self.dtype)),
            "fixed_batch": self.fixed_batch,
            "id_range": None if self.id_range is None else list(self.id_range),
        }


def spec_from_dims(
    name: str,
    dims: Sequence[int | str | None],
    dtype: np.dtype,
    input_shape: Sequence[int] | None,
    where: str,
    sizes: Mapping[str, int] | None = None,
) -> InputSpec:
    """An InputSpec from a model's input dimensions and the sizes the user gave for the dynamic ones.

    ``dims``: an int (static; negative = dynamic), a str (a named dynamic dimension, ONNX ``dim_param``) or None
    (dynamic, unnamed). ``input_shape`` is the whole per-sample shape; ``sizes`` gives named dimensions a size.
    """
    if not dims:
        raise BackendError(f"{where}: the input {name!r} is a scalar; egp-export profiles batched inputs.")
    batch_dim, rest = dims[0], list(dims[1:])
    fixed_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None
    shown = ", ".join(str(d) if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else "?") for d in rest)
    if input_shape is not None:
        given = tuple(int(size) for size in input_shape)
        if len(given) != len(rest) or any(isinstance(d, int) and d > 0 and d != g for d, g in zip(rest, given)):
            raise BackendError(
                f"{where}: per-sample shape ({', '.join(map(str, given))}) does not fit the input {name!r} "
                f"of per-sample shape ({shown})."
            )
        for dim, size in zip(rest, given):
            if isinstance(dim, str) and sizes and dim in sizes and sizes[dim] != size:
                raise BackendError(
                    f"{where}: --dim {dim}={sizes[dim]} and the input {name!r} given with {dim} = {size}; drop --dim "
                    "(the data sizes it) or give data of that size."
                )
        return InputSpec(name, given, np.dtype(dtype), fixed_batch)
    sizes = sizes or {}
    resolved = []
    for axis, dim in enumerate(rest, start=1):
        if isinstance(dim, int) and dim > 0:
            resolved.append(dim)
        elif isinstance(dim, str) and dim in sizes:
            resolved.append(int(sizes[dim]))
        elif isinstance(dim, str):
            raise BackendError(
                f"{where}: the input {name!r} has the dynamic dimension {dim!r} (axis {axis}, shape ({shown}) per "
                f"sample) and no size for it; give --dim {dim}=SIZE (dims={{{dim!r}: SIZE}}), the per-sample shape with "
                "--input-shape (a one-input model), or real inputs with --inputs."
            )
        else:
            raise BackendError(
                f"{where}: the input {name!r} has dynamic dimensions besides the batch ({shown}); "
                "give the per-sample shape with --input-shape (input_shape=), or real inputs with --inputs."
            )
    return InputSpec(name, tuple(resolved), np.dtype(dtype), fixed_batch)


@dataclass(frozen=True)
class DeclaredInput:
    """One input as a model file declares it: dimensions (int, a dim_param name, or None), dtype, embedding rows."""

    name: str
    dims: tuple[int | str | None, ...]
    dtype: np.dtype
    id_range: tuple[int, int] | None = None


@dataclass(frozen=True)
class ModelInputs:
    """Every input of a model, in its file's order, with the sizes of its dynamic dimensions resolved."""

    specs: tuple[InputSpec, ...]

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    @property
    def fixed_batch(self) -> int | None:
        return next((spec.fixed_batch for spec in self.specs if spec.fixed_batch is not None), None)

    def spec(self, name: str) -> InputSpec:
        return next(spec for spec in self.specs if spec.name == name)

    def check_batch(self, batch_size: int) -> None:
        for spec in self.specs:
            spec.check_batch(batch_size)

    def random_batch(self, batch_size: int, seed: int = 0, val_range: tuple[float, float] | None = None) -> dict:
        """A seeded random feed: input ``i`` is drawn as ``InputSpec.random_batch`` with seed ``seed + i``."""
        return {spec.name: spec.random_batch(batch_size, seed + index, val_range) for index, spec in enumerate(self.specs)}

    def describe_random(self, val_range: tuple[float, float] | None = None) -> str:
        if len(self.specs) == 1:
            return self.specs[0].describe_random(val_range)
        return "; ".join(f"{spec.name}: {spec.describe_random(val_range)}" for spec in self.specs)

    def feed(self, inputs) -> dict:
        """``inputs`` (a feed, or one array for a one-input model) as a feed in the model's order and dtypes."""
        if not isinstance(inputs, Mapping):
            if len(self.specs) != 1:
                raise BackendError(f"the model takes {len(self.specs)} inputs ({', '.join(self.names)}); give a dict "
                                   "of arrays, one per input name.")
            inputs = {self.specs[0].name: inputs}
        unknown, missing = [n for n in inputs if n not in self.names], [n for n in self.names if n not in inputs]
        if unknown or missing:
            raise BackendError(_name_mismatch("the feed", list(inputs), self.names, unknown, missing))
        return {spec.name: np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype) for spec in self.specs}

    def to_dict(self) -> dict:
        return {"inputs": [spec.to_dict() for spec in self.specs]}


def _name_mismatch(source: str, keys: list[str], names: list[str], unknown: list[str], missing: list[str]) -> str:
    problems = []
    if unknown:
        problems.append(f"{', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not among them")
    if missing:
        problems.append(f"{', '.join(map(repr, missing))} {'is' if len(missing) == 1 else 'are'} missing")
    return (f"{source} holds {', '.join(map(repr, keys))} and the model's inputs are {', '.join(map(repr, names))}: "
            f"{' and '.join(problems)}; give one array per input, under its name.")


def resolve_inputs(
    declared: Sequence[DeclaredInput],
    where: str,
    input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    dims: Mapping[str, int] | None = None,
) -> ModelInputs:
    """The ModelInputs of ``declared``: ``input_shape`` is one per-sample shape (a one-input model) or a dict of
    them by input name (the shapes of the user's data); ``dims`` sizes named dynamic dimensions."""
    if input_shape is not None and not isinstance(input_shape, Mapping):
        if len(declared) != 1:
            raise BackendError(
                f"{where} has {len(declared)} inputs ({', '.join(d.name for d in declared)}); --input-shape gives the "
                "shape of one input: size the dynamic dimensions by name with --dim NAME=SIZE instead."
            )
        input_shape = {declared[0].name: input_shape}
    shapes = input_shape or {}
    named = {dim for value in declared for dim in value.dims[1:] if isinstance(dim, str)}
    unknown = sorted(set(dims or {}) - named)
    if unknown:
        raise BackendError(
            f"{where} has no dynamic dimension named {', '.join(map(repr, unknown))} beyond the batch (its named "
            f"dimensions: {', '.join(map(repr, sorted(named))) or 'none'}); drop that --dim."
        )
    specs = []
    for value in declared:
        spec = spec_from_dims(value.name, value.dims, value.dtype, shapes.get(value.name), where, dims)
        specs.append(replace(spec, id_range=value.id_range))
    return ModelInputs(tuple(specs))


def onnx_inputs(
    model, input_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None, dims: Mapping[str, int] | None = None
) -> ModelInputs:
    """The ModelInputs of an ONNX model (path or ModelProto); weights are not loaded. Arguments: resolve_inputs."""
    declared, where = onnx_declared_inputs(model)
    return resolve_inputs(declared, where, input_shape, dims)


def onnx_declared_inputs(model) -> tuple[list[DeclaredInput], str]:
    """The inputs an ONNX model (path or ModelProto) declares, and how to name the model in messages."""
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
    declared = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dtype = _numeric_dtype(value.type)
        if dtype is None:
            raise BackendError(
                f"{where}: the input {value.name!r} has type {_type_name(value.type)}; egp-export feeds numeric "
                "tensors (float, integer or bool) to a model, so export it with such inputs."
            )
        dims = tuple(
            d.dim_value if d.WhichOneof("value") == "dim_value" else (d.dim_param or None)
            for d in value.type.tensor_type.shape.dim
        )
        rows = _embedding_rows(proto.graph, value.name) if dtype.kind in "iu" else None
        declared.append(DeclaredInput(value.name, dims, dtype, rows))
    if not declared:
        raise BackendError(f"{where} has no inputs; egp-export runs models that take at least one tensor.")
    return declared, where


def onnx_input_spec(model, input_shape: Sequence[int] | None = None) -> InputSpec:
    """The InputSpec of a single-input ONNX model (path or ModelProto); several inputs: :func:`onnx_inputs`."""
    declared, where = onnx_declared_inputs(model)
    if len(declared) != 1:
        raise BackendError(
            f"{where} has {len(declared)} inputs ({', '.join(d.name for d in declared)}); this call reads one "
            "input: use onnx_inputs()."
        )
    return resolve_inputs(declared, where, input_shape).specs[0]


def _embedding_rows(graph, name: str) -> tuple[int, int] | None:
    """[0, rows) when ``name`` (through Cast nodes) indexes constant tables with Gather: the smallest table's rows."""
    tables = {init.name: list(init.dims) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tables[node.output[0]] = list(node.attribute[0].t.dims)
    names, rows = {name}, []
    for node in graph.node:  # topological order: a Cast of the input comes before its consumers
        if node.op_type == "Cast" and node.input and node.input[0] in names:
            names.add(node.output[0])
        elif node.op_type == "Gather" and len(node.input) == 2 and node.input[1] in names and node.input[0] in tables:
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims and -len(dims) <= axis < len(dims):
                rows.append(int(dims[axis]))
    return (0, min(rows)) if rows else None


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


# A user's inputs ----------------------------------------------------------------


def fitted_inputs(batch, spec: InputSpec, source: str, notes: list[str] | None = None) -> np.ndarray:
    """A user's batch (a tensor or array ``[N, ...]``; a tuple or dict of them holding one tensor) as the model's
    input: its sample shape checked and its values converted to the input's dtype, each conversion stated in
    ``notes``.

    float input: uint8 data are image pixels, divided by 255 (the scale of an image folder); other integers and
    bools are taken as stored. Integer input: integer data as stored (inside the embedding table's rows when the
    input indexes one), float data only when every value is a whole number. BackendError otherwise.
    """
    notes = [] if notes is None else notes
    array = _single_array(batch, spec, source)
    if array.ndim == 0 or tuple(array.shape[1:]) != tuple(spec.sample_shape):
        shape = "a scalar" if array.ndim == 0 else f"samples of shape {tuple(array.shape[1:])}"
        raise BackendError(
            f"{source} holds {shape}; the model's input {spec.name!r} takes samples of shape {tuple(spec.sample_shape)}"
            " (give --input-shape when its dimensions are dynamic, or data of that shape)."
        )
    if array.shape[0] == 0:
        raise BackendError(f"{source} holds no samples.")
    target, kind = np.dtype(spec.dtype), array.dtype.kind
    if target.kind == "f":
        if array.dtype == np.uint8:
            notes.append(f"{source}: uint8 data divided by 255 for the float input {spec.name!r} (image pixels in "
                         "[0, 1], as an image folder is read)")
            return (array.astype(np.float32) / np.float32(UINT8_PIXEL_SCALE)).astype(target)
        if kind in "iub":
            notes.append(f"{source}: {array.dtype} data converted to {target} for the input {spec.name!r} (values as stored)")
        _check_finite(array, source)
        return np.ascontiguousarray(array, dtype=target)
    if target.kind in "iub":
        if kind == "f":
            _check_finite(array, source)
            if not np.array_equal(array, np.round(array)):
                raise BackendError(
                    f"{source} holds fractional values and the model's input {spec.name!r} takes {target} "
                    "(token ids): save the ids as integers."
                )
            notes.append(f"{source}: whole-number {array.dtype} data converted to {target} for the input {spec.name!r}")
        converted = np.ascontiguousarray(array, dtype=target)
        if target.kind in "iu" and spec.id_range is not None:
            low, high = spec.id_range
            outside = int(((converted < low) | (converted >= high)).sum())
            if outside:
                raise BackendError(
                    f"{source} holds {outside} ids outside [{low}, {high}), the rows of the embedding table the input "
                    f"{spec.name!r} indexes (values {int(converted.min())}..{int(converted.max())}); give ids of this "
                    "model's vocabulary."
                )
        return converted
    raise BackendError(f"the model's input {spec.name!r} has dtype {target}; egp-export cannot feed it {source}.")


def _single_array(batch, spec: InputSpec, source: str) -> np.ndarray:
    if isinstance(batch, np.ndarray):
        return batch
    from egp_export.analysis.inputs import leaves

    tensors = leaves(batch)
    if len(tensors) != 1:
        kind = f"a dict of {len(tensors)} inputs ({', '.join(map(str, batch))})" if isinstance(batch, dict) else (
            f"{len(tensors)} inputs")
        raise BackendError(f"{source} holds {kind}; the model takes one input, {spec.name!r}.")
    tensor = tensors[0]
    return tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)


def _check_finite(array: np.ndarray, source: str) -> None:
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise BackendError(f"{source} holds {bad} inf/NaN values; clean or drop those samples.")


def named_arrays(batch, names: Sequence[str], source: str) -> dict:
    """A user's batch as ``{input name: tensor or array}`` for a model taking ``names``.

    A dict is matched by key (every name present, no other key); a tuple or list positionally, in the file's input
    order; one tensor or array feeds a one-input model (as does any batch holding a single tensor).
    """
    names = list(names)
    if len(names) == 1:
        return {names[0]: batch}  # fitted_inputs reads its one tensor, whatever it is stored under
    if isinstance(batch, Mapping):
        keys = [str(key) for key in batch]
        unknown, missing = [k for k in keys if k not in names], [n for n in names if n not in keys]
        if unknown or missing:
            raise BackendError(_name_mismatch(source, keys, names, unknown, missing))
        return {name: batch[name] for name in names}
    if isinstance(batch, (tuple, list)) and len(batch) == len(names):
        return dict(zip(names, batch))
    held = f"{len(batch)} inputs" if isinstance(batch, (tuple, list)) else "one array"
    raise BackendError(
        f"{source} holds {held} and the model takes {len(names)} inputs ({', '.join(map(repr, names))}); give a dict "
        "(.npz archive, .pt dict) with one array per input, under its name."
    )


def sample_shapes(batch, names: Sequence[str], source: str) -> dict[str, tuple[int, ...]]:
    """The per-sample shape of each input in a user's batch (what sizes the model's dynamic dimensions)."""
    shapes = {}
    for name, value in named_arrays(batch, names, source).items():
        leaf = _single_array(value, InputSpec(name, (), np.dtype("float32")), source)
        shapes[name] = tuple(int(d) for d in leaf.shape[1:])
    return shapes


def data_input_shape(model, batch, source: str):
    """The per-sample shape of each input in a user's batch that sizes a dynamic dimension of ``model``, for
    ``prepare(input_shape=)``: an ONNX path's input names are read and matched (a mismatch refused naming them), an
    engine file's taken from the batch's own keys. None when there is nothing to size."""
    if Path(model).suffix.lower() not in ENGINE_SUFFIXES:
        declared, _ = onnx_declared_inputs(model)
        shapes = sample_shapes(batch, [value.name for value in declared], source)
        # Static inputs are left to fitted_feed, which says how the data differ from them.
        dynamic = {value.name for value in declared if any(not (isinstance(d, int) and d > 0) for d in value.dims[1:])}
        return {name: shape for name, shape in shapes.items() if name in dynamic} or None
    names = [str(key) for key in batch] if isinstance(batch, Mapping) and len(batch) > 1 else ["input"]
    shapes = sample_shapes(batch, names, source)
    return shapes if len(names) > 1 else next(iter(shapes.values()))


def fitted_feed(batch, inputs: ModelInputs, source: str, notes: list[str] | None = None) -> dict:
    """A user's batch as a feed of the model's inputs: each input fitted as :func:`fitted_inputs` does, and all of
    one length. BackendError naming the file's inputs when the names do not match."""
    notes = [] if notes is None else notes
    named = named_arrays(batch, inputs.names, source)
    several = len(inputs.specs) > 1
    feed = {
        spec.name: fitted_inputs(named[spec.name], spec, f"{source} entry {spec.name!r}" if several else source, notes)
        for spec in inputs.specs
    }
    lengths = {name: len(array) for name, array in feed.items()}
    if len(set(lengths.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in lengths.items())
        raise BackendError(f"{source} holds inputs of different lengths ({counts}); give one sample per row of each.")
    return feed


def feed_length(feed: Mapping[str, np.ndarray]) -> int:
    return len(next(iter(feed.values())))


def feed_slice(feed: Mapping[str, np.ndarray], start: int, stop: int) -> dict:
    return {name: array[start:stop] for name, array in feed.items()}


def describe_shapes(feed: Mapping[str, np.ndarray]) -> str:
    """``8x3x32x32`` for one input; ``input_ids 8x12, attention_mask 8x12`` for several."""
    shapes = {name: "x".join(map(str, array.shape)) for name, array in feed.items()}
    if len(shapes) == 1:
        return next(iter(shapes.values()))
    return ", ".join(f"{name} {shape}" for name, shape in shapes.items())


def samples_for_batch(inputs: Mapping[str, np.ndarray], batch_size: int, source: str) -> dict:
    """The first ``batch_size`` samples of a user's feed (what a timing at that batch size runs on)."""
    if feed_length(inputs) < batch_size:
        raise BackendError(
            f"{source} holds {feed_length(inputs)} samples, fewer than batch size {batch_size}: give more samples or a "
            "smaller batch size."
        )
    return feed_slice(inputs, 0, batch_size)


@dataclass(frozen=True)
class InputOrigin:
    """What a numeric check or a timing ran on: a user's data (``real``) or seeded random inputs."""

    source: str  # the --inputs specification, or "random"
    real: bool
    samples: int
    drawn: str = ""  # random inputs: how they were drawn (InputSpec.describe_random)

    def describe(self) -> str:
        """``512 samples of held-out.npy`` or ``8 random samples of N(0, 1) (not real data: give --inputs)``."""
        count = f"{self.samples:,} sample{'s' if self.samples != 1 else ''}"
        if self.real:
            return f"{count} of {self.source}"
        return f"{self.samples:,} random {count.split(' ', 1)[1]} of {self.drawn} (not real data: give --inputs)"

    def to_dict(self) -> dict:
        return {"source": self.source, "real_data": self.real, "samples": self.samples, "drawn": self.drawn or None,
                "described": self.describe()}


def random_origin(spec: InputSpec | ModelInputs, samples: int, val_range: tuple[float, float] | None) -> InputOrigin:
    return InputOrigin("random", False, samples, spec.describe_random(val_range))
