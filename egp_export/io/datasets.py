"""Loading calibration inputs from files into one batch ``[N, ...]``: floats as float32, integers as stored.

A batch is one tensor, or, for a model whose ``forward`` takes several inputs
(``signature``), a dict of them (keyword inputs such as ``input_ids`` and
``attention_mask``, see analysis/inputs.py).

Accepted ``--calib`` specifications:

* ``builtin:digits`` - scikit-learn's 8x8 handwritten digits, ``[N, 1, 8, 8]`` in [0, 1];
* a ``.pt``/``.pth`` file holding a tensor, a dict, ``(inputs, targets, ...)``
  (tensors of one length whose sample shapes or dtypes differ from the
  inputs': the inputs are used) or a list of batches (tensors of one sample
  shape and dtype, three or more, or of different lengths: concatenated);
  two tensors of one shape are refused (batches or (inputs, targets)?);
* a ``.npy`` file, or a ``.npz`` archive (big-endian arrays are converted to
  native byte order);
* a folder of images (searched recursively), read as RGB ``[N, 3, H, W]`` in [0, 1].

Dicts and ``.npz`` archives are keyword inputs when ``signature`` names
several inputs and one of the keys is among them (every other key must be a
label under :data:`TARGET_KEYS`, which is left out:
:func:`egp_export.analysis.batches.keyword_inputs`); otherwise they are
searched for the first of :data:`INPUT_KEYS`.
Every result is checked: at least one sample, and only finite values. Every
conversion a loader makes is stated in ``notes`` when a list is given.

Integer and boolean data keep their dtype (token ids for an ``nn.Embedding``);
the command line converts them for the model
(:func:`egp_export.analysis.batches.fitting_conversion`: narrow integer ids to
int64, bool and integers to float32, uint8 scaled to [0, 1] like an image
folder). A ``.npy`` file is memory-mapped (copy-on-write: the file is never
written): float32 and integer arrays are used in place and read from disk as
the batches are used, so the data need not fit in memory; other float dtypes
and big-endian arrays are converted, which copies them.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from egp_export.analysis import inputs
from egp_export.analysis.batches import (
    INPUT_KEYS,
    TARGET_KEYS,
    count_nonfinite,
    keyword_inputs,
    pick_input,
    tensor_from_array,
)
from egp_export.analysis.inputs import Batch, Signature
from egp_export.errors import CalibrationError

# INPUT_KEYS names where a dict or .npz archive stores the model inputs, TARGET_KEYS the labels (pruning).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
TORCH_SUFFIXES = frozenset({".pt", ".pth"})
BUILTIN_DIGITS = "builtin:digits"
_ACCEPTED = (
    f"{BUILTIN_DIGITS}, a .pt/.pth file (tensor, (inputs, ...) tuple, list of batches, or dict with one of the keys "
    f"{', '.join(INPUT_KEYS)}), a .npy file, a .npz archive, or a folder of images "
    f"({', '.join(sorted(IMAGE_SUFFIXES))})"
)
# sklearn's digits are 4-bit grey levels: 0..16.
_DIGITS_MAX = 16.0


def load_calibration(spec: str, *, input_size: tuple[int, int] | None = None, limit: int | None = None,
                     notes: list[str] | None = None, signature: Signature | None = None) -> Batch:
    """Load the calibration inputs named by ``spec`` as a tensor ``[N, ...]``: float32, or integers and bools as stored.

    ``input_size`` (H, W) resizes images of an image folder and is needed when
    they differ in size; other sources are returned as stored. ``limit`` keeps
    the first ``limit`` samples. Each conversion made (byte order, batches
    concatenated, inputs taken from a pair) is appended to ``notes`` as a
    sentence. With ``signature`` (:func:`egp_export.analysis.inputs.signature`
    of the model) naming several inputs, a dict or ``.npz`` archive whose keys
    name them gives a dict of tensors, one per input, each checked alike and all
    of one length. Raises CalibrationError for unreadable, empty or non-finite data.
    """
    notes = [] if notes is None else notes
    if limit is not None and limit < 1:
        raise CalibrationError(f"calibration limit must be at least 1, got {limit}.")
    if input_size is not None:
        input_size = _check_input_size(input_size)
    if spec.startswith("builtin:"):
        if spec != BUILTIN_DIGITS:
            raise CalibrationError(f"unknown built-in calibration set {spec!r}; the only one is {BUILTIN_DIGITS}.")
        data = _digits()[0]
        source = spec
    else:
        path = Path(spec)
        source = str(path)
        if path.is_dir():
            data = _load_image_folder(path, input_size=input_size, limit=limit)
            notes.append(f"{path}: images read as RGB float32 in [0, 1] (pixel values / 255, as uint8 arrays are)")
        elif not path.exists():
            raise CalibrationError(f"calibration data {path} does not exist; give {_ACCEPTED}.")
        elif path.suffix.lower() in TORCH_SUFFIXES:
            data = _load_torch_file(path, notes, signature)
        elif path.suffix.lower() == ".npy":
            data = _load_npy(path, notes)
        elif path.suffix.lower() == ".npz":
            data = _load_npz(path, notes, signature)
        else:
            raise CalibrationError(f"calibration data {path} has an unsupported type; give {_ACCEPTED}.")
    if limit is not None:
        data = inputs.take(data, slice(0, limit))
    if isinstance(data, dict):
        return _validated_inputs(data, source)
    return _validated(data, source)


def load_digits_split(
    seed: int = 0, test_fraction: float = 0.25
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` from scikit-learn's digits, split deterministically.

    Inputs are float32 ``[N, 1, 8, 8]`` in [0, 1], labels int64. The split is
    stratified by class, so both parts contain every digit.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    from sklearn.model_selection import train_test_split

    images, labels = _digits()
    x_train, x_test, y_train, y_test = train_test_split(
        images.numpy(), labels.numpy(), test_size=test_fraction, random_state=seed, stratify=labels.numpy()
    )
    return (torch.from_numpy(x_train), torch.from_numpy(y_train), torch.from_numpy(x_test), torch.from_numpy(y_test))


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    # Bundled with scikit-learn, so nothing is downloaded.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy((bunch.images / _DIGITS_MAX).astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return images, labels


def _load_torch_file(path: Path, notes: list[str], signature: Signature | None = None) -> Batch:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CalibrationError(
            f"calibration file {path} is corrupt or holds Python objects other than tensors; "
            "save the inputs with torch.save(inputs_tensor, path)."
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CalibrationError(f"cannot read calibration file {path} ({error}); re-save it with torch.save.") from None
    if isinstance(loaded, (tuple, list)):
        loaded = _inputs_of_sequence(loaded, path, notes)
    elif isinstance(loaded, Mapping):
        loaded = _from_mapping(loaded, path, notes, signature)
    if isinstance(loaded, dict):
        return loaded
    if isinstance(loaded, np.ndarray):
        return _from_numpy(loaded, path, notes)
    if not isinstance(loaded, torch.Tensor):
        raise CalibrationError(f"calibration file {path} holds a {type(loaded).__name__}, not a tensor; give {_ACCEPTED}.")
    return loaded


def _inputs_of_sequence(loaded: tuple | list, path: Path, notes: list[str]) -> object:
    """The inputs in a saved tuple/list: a list of batches concatenated, or the first of (inputs, targets, ...)."""
    kind = type(loaded).__name__
    if not loaded:
        raise CalibrationError(f"calibration file {path} holds an empty {kind}.")
    first = loaded[0]
    if len(loaded) == 1 or not isinstance(first, torch.Tensor) or first.dim() == 0:
        return first
    tensors = all(isinstance(item, torch.Tensor) and item.dim() > 0 for item in loaded)
    alike = tensors and all(item.shape[1:] == first.shape[1:] and item.dtype == first.dtype for item in loaded)
    lengths = {len(item) for item in loaded if isinstance(item, torch.Tensor) and item.dim() > 0}
    if alike and (len(loaded) > 2 or len(lengths) > 1):
        # Batches of one sample shape: a pair (inputs, targets) has one length, so 3+ tensors or unequal lengths are
        # batches.
        notes.append(f"{path} holds a {kind} of {len(loaded)} batches of samples {tuple(first.shape[1:])}: "
                     f"concatenated ({sum(map(len, loaded))} samples)")
        return torch.cat(loaded)
    if not alike and lengths == {len(first)}:
        notes.append(f"{path} holds a {kind} (inputs, targets, ...) of {len(loaded)} entries: the first is the inputs")
        return first
    raise CalibrationError(
        f"calibration file {path} holds a {kind} of {len(loaded)} tensors that could be batches or (inputs, targets) "
        f"(sample shapes {', '.join(str(tuple(item.shape[1:])) for item in loaded if isinstance(item, torch.Tensor))}); "
        "save the inputs alone (torch.save(torch.cat(batches), path)) or a dict {'inputs': x, 'targets': y}."
    )


def _load_npy(path: Path, notes: list[str]) -> torch.Tensor:
    try:
        # allow_pickle=False: object arrays would execute code from the file. mmap_mode="c": pages are read as
        # they are used and writes (an inplace first layer) stay private, so the file is never changed.
        array = np.load(path, allow_pickle=False, mmap_mode="c")
    except (ValueError, OSError, EOFError) as error:
        raise CalibrationError(
            f"cannot read {path} as a numeric .npy array ({error}); save it with numpy.save(path, array)."
        ) from None
    return _from_numpy(array, path, notes)


def _load_npz(path: Path, notes: list[str], signature: Signature | None = None) -> Batch:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CalibrationError(
            f"cannot read {path} as a numeric .npz archive ({error}); save it with numpy.savez(path, inputs=array)."
        ) from None
    picked = _from_mapping(arrays, path, notes, signature)
    return picked if isinstance(picked, dict) else _from_numpy(picked, path, notes)


def _from_mapping(mapping: Mapping, path: Path, notes: list[str], signature: Signature | None) -> object:
    """A dict of tensors (the keyword inputs, in ``forward``'s order) when ``signature`` names several inputs and a
    key is among them; otherwise the entry :func:`pick_input` chooses."""
    what = f"calibration data {path}"
    if signature is None or not signature.several or not any(key in signature.names for key in mapping):
        return pick_input(mapping, what)
    converted = {
        key: _from_numpy(value, path, notes) if isinstance(value, np.ndarray) else value for key, value in mapping.items()
    }
    batch, _ = keyword_inputs(converted, signature, what)
    left_out = [str(key) for key in mapping if key not in batch]
    notes.append(
        f"{path} holds the model's keyword inputs {', '.join(batch)}"
        + (f" (left out: {', '.join(left_out)}, labels the model does not take)" if left_out else "")
    )
    return batch


def _from_numpy(array: object, path: Path, notes: list[str]) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        raise CalibrationError(f"calibration data {path} holds a {type(array).__name__}, not an array.")
    if array.dtype.kind not in "biuf":
        raise CalibrationError(
            f"calibration data {path} has dtype {array.dtype}; only boolean, integer and floating data are usable."
        )
    if isinstance(array, np.memmap) and (array.ndim == 0 or not array.flags.c_contiguous):
        array = np.array(array)  # a 0-d or Fortran-ordered file: read it (torch needs C order)
    if not array.dtype.isnative:
        notes.append(f"{path} holds {'big' if array.dtype.byteorder == '>' else 'little'}-endian {array.dtype.name} "
                     "data: converted to this machine's byte order (a copy in memory)")
    return tensor_from_array(array, f"calibration data {path}")


def _load_image_folder(folder: Path, *, input_size: tuple[int, int] | None, limit: int | None) -> torch.Tensor:
    from PIL import Image

    # Sorted by path so the batch (and any calibration derived from it) is reproducible.
    files = sorted(
        (path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()),
        key=lambda path: path.relative_to(folder).as_posix(),
    )
    if not files:
        raise CalibrationError(
            f"the folder {folder} contains no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
            "point --calib at a folder of images or at a .pt/.npy/.npz file."
        )
    if limit is not None:
        files = files[:limit]
    tensors = []
    first_size: tuple[int, int] | None = None
    for file in files:
        try:
            with Image.open(file) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            raise CalibrationError(f"cannot read image {file} ({error}); remove or convert it.") from None
        if input_size is not None:
            height, width = input_size
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        size = (rgb.height, rgb.width)
        if first_size is None:
            first_size = size
        elif size != first_size:
            raise CalibrationError(
                f"images in {folder} differ in size ({files[0].name} is {first_size[0]}x{first_size[1]}, "
                f"{file.name} is {size[0]}x{size[1]}, HxW); pass --input-size H W (input_size=(H, W)) to resize them."
            )
        # HWC uint8 -> CHW float in [0, 1].
        tensors.append(torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1))
    return torch.stack(tensors).to(torch.float32) / 255.0


def _check_input_size(input_size: tuple[int, int]) -> tuple[int, int]:
    size = tuple(input_size)
    if len(size) != 2 or not all(isinstance(side, int) and side > 0 for side in size):
        raise CalibrationError(f"input size must be two positive integers H W, got {input_size!r}.")
    return size  # type: ignore[return-value]


def _validated_inputs(data: dict, source: str) -> dict:
    """Each input checked as :func:`_validated` checks one, and all of one length (one sample per row)."""
    checked = {name: _validated(value, f"{source} ({name})") for name, value in data.items()}
    lengths = {name: len(value) for name, value in checked.items()}
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} {length}" for name, length in lengths.items())
        raise CalibrationError(
            f"calibration data {source} holds inputs of different lengths ({listed}); every input holds the same "
            "samples, one per row."
        )
    return checked


def _validated(data: torch.Tensor, source: str) -> torch.Tensor:
    """Check a loaded batch and return it: floats as float32 (float32 data uncopied), integers as stored."""
    if data.dim() == 0:
        raise CalibrationError(f"calibration data {source} is a single number; it needs a batch dimension [N, ...].")
    if data.shape[0] == 0:
        raise CalibrationError(
            f"calibration data {source} is empty (0 samples, shape {tuple(data.shape)}); give at least one sample."
        )
    if data.is_complex():
        raise CalibrationError(f"calibration data {source} is complex ({data.dtype}); give real-valued inputs.")
    if not data.is_floating_point():
        return data.contiguous()
    data = data.to(torch.float32)
    nan_count, inf_count = count_nonfinite(data)
    if nan_count or inf_count:
        raise CalibrationError(
            f"calibration data {source} contains {nan_count} NaN and {inf_count} Inf values "
            f"(of {data.numel()}); clean or drop those samples."
        )
    return data.contiguous()


# Labelled data (pruning) ------------------------------------------------------------


def _pick(mapping: Mapping, keys: tuple[str, ...], what: str, source: str):
    for key in keys:
        if key in mapping:
            return mapping[key]
    found = ", ".join(repr(str(key)) for key in mapping) or "none"
    raise CalibrationError(f"{source} has no {what} (keys found: {found}); store them under {keys[0]!r}.")


def load_labelled(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` tensors from a ``.pt``/``.pth`` file (a pair, or a dict with one of
    :data:`INPUT_KEYS` and one of :data:`TARGET_KEYS`) or a ``.npz`` archive with such keys."""
    path = Path(spec)
    if not path.is_file():
        raise CalibrationError(f"labelled data {path} does not exist; give {BUILTIN_DIGITS}, a .pt/.pth file or a .npz archive.")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
            raise CalibrationError(
                f"cannot read {path} ({type(error).__name__}); save (inputs, targets) with torch.save."
            ) from None
        if isinstance(loaded, (tuple, list)) and len(loaded) == 2:
            inputs, targets = loaded
        elif isinstance(loaded, Mapping):
            inputs = _pick(loaded, INPUT_KEYS, "inputs", str(path))
            targets = _pick(loaded, TARGET_KEYS, "targets", str(path))
        else:
            raise CalibrationError(
                f"{path} holds a {type(loaded).__name__}; save an (inputs, targets) pair or a dict with 'inputs' and 'targets'."
            )
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise CalibrationError(f"cannot read {path} as a .npz archive ({error}).") from None
        inputs = _pick(arrays, INPUT_KEYS, "inputs", str(path))
        targets = _pick(arrays, TARGET_KEYS, "targets", str(path))
    else:
        raise CalibrationError(
            f"labelled data {path} has an unsupported type; give {BUILTIN_DIGITS}, a .pt/.pth file or a .npz archive."
        )
    try:
        return (tensor_from_array(np.asarray(inputs), f"{path} inputs"),
                tensor_from_array(np.asarray(targets), f"{path} targets"))
    except (TypeError, ValueError) as error:
        raise CalibrationError(f"{path}: inputs and targets must be numeric arrays ({error}).") from None


def load_labelled_splits(data: str, eval_data: str | None = None, *, eval_fraction: float = 0.2, seed: int = 0):
    """(train pair, eval pair) for pruning: ``data`` (``builtin:digits`` or a labelled file) and either
    ``eval_data``, the digits' own test split, or a seeded random ``eval_fraction`` of ``data``."""
    if data == BUILTIN_DIGITS:
        x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
        train, held_out = (x_train, y_train), (x_test, y_test)
    elif data.startswith("builtin:"):
        raise CalibrationError(f"unknown built-in data set {data!r}; the only one is {BUILTIN_DIGITS}.")
    else:
        train, held_out = load_labelled(data), None
    if eval_data is not None:
        return train, load_labelled(eval_data)
    if held_out is not None:
        return train, held_out
    inputs, targets = train
    if len(inputs) != len(targets):
        raise CalibrationError(f"{data}: {len(inputs)} inputs but {len(targets)} targets.")
    count = len(inputs)
    held = max(1, round(count * eval_fraction))
    if held >= count:
        raise CalibrationError(f"{data} has {count} samples: too few to hold {eval_fraction:.0%} out for eval.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    keep, rest = order[: count - held], order[count - held :]
    return (inputs[keep], targets[keep]), (inputs[rest], targets[rest])
