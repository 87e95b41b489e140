"""Turning what a user calls "calibration data" into validated batches, and splitting them (seeded) three ways.

A batch is what analysis/inputs.py says: a tensor, a tuple of tensors
(positional inputs) or a dict of tensors (keyword inputs). Which form a
calibration item takes depends on the model's ``forward`` (its
:class:`~egp_export.analysis.inputs.Signature`), see :func:`as_batches`.
"""

from __future__ import annotations

import hashlib
import itertools
import numbers
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from egp_export.analysis import inputs
from egp_export.analysis.inputs import Batch, Signature
from egp_export.errors import CalibrationError

DEFAULT_BATCH_SIZE = 64
# Seeds the permutation that splits the calibration samples (compile's split_seed, the CLI's --split-seed).
DEFAULT_SPLIT_SEED = 0
# Samples per chunk of the NaN/Inf check of a tensor source.
_CHECK_CHUNK = 256
# Names under which a dict item, a dict saved to a file or a .npz archive commonly stores the model inputs, in order
# of preference.
INPUT_KEYS = ("inputs", "input", "x", "data", "images")
# Names under which a dict commonly stores labels: a dict of keyword inputs may carry them (a Hugging Face dataset's
# "labels"); they are left out unless the model's forward takes that name.
TARGET_KEYS = ("targets", "target", "labels", "label", "y")
# Python and NumPy scalars: a list of them is one sample (a tokenizer's ids), never (input, target).
_NUMBER = (numbers.Number, np.number, np.bool_)


class Batches(Sequence[Batch]):
    """Batches of at most ``size`` samples, gathered from a source through an index array when they are used.

    ``order`` lists sample indices of the source (None: 0, 1, 2, ...); these
    batches hold its positions [start, stop). A source is a tensor (a batch
    gathers its rows with index_select: a memory-mapped array is read only
    for them), a map-style Dataset (a batch is stacked from its items), or a
    list of batches read from an iterable. Every batch is a fresh tensor:
    a model that writes into its input (``x.sub_(mean)``) never changes the
    caller's data, and only the batch in use is held, so memory does not grow
    with the number of samples for the first two (an iterable has to be held,
    since it may not be iterable twice). Re-iterable, with ``len`` and
    indexing, so the compiler can pass over a part several times. With
    ``digests`` every sample read is hashed once (:class:`SampleDigests`).
    Batches of several inputs (a tuple or dict) are gathered input by input.
    """

    def __init__(self, source: _Source, start: int = 0, stop: int | None = None, size: int = DEFAULT_BATCH_SIZE,
                 transform: Callable[[Batch], Batch] | None = None, *, order: torch.Tensor | None = None,
                 digests: SampleDigests | None = None) -> None:
        self.source, self.start, self.order = source, start, order
        self.stop = (source.samples if order is None else len(order)) if stop is None else stop
        self.size, self.transform, self.digests = size, transform, digests

    @property
    def samples(self) -> int:
        return self.stop - self.start

    @property
    def indices(self) -> torch.Tensor:
        """The source's sample indices these batches hold, in the order they are read (int64)."""
        return self._indices(self.start, self.stop)

    def _indices(self, start: int, stop: int) -> torch.Tensor:
        return torch.arange(start, stop) if self.order is None else self.order[start:stop]

    def batch_indices(self, index: int) -> torch.Tensor:
        """The source's sample indices batch ``index`` holds."""
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} of {len(self)}")
        first = self.start + index * self.size
        return self._indices(first, min(first + self.size, self.stop))

    def __len__(self) -> int:
        return -(-self.samples // self.size)

    def __getitem__(self, index: int) -> Batch:
        indices = self.batch_indices(index)
        batch = self.source.take(indices)
        if self.digests is not None:
            self.digests.record(indices, batch)
        return self.transform(batch) if self.transform is not None else batch

    def __iter__(self) -> Iterator[Batch]:
        return (self[i] for i in range(len(self)))

    def _like(self, start: int, stop: int, transform=None, order=None, digests=None) -> Batches:
        return Batches(self.source, start, stop, self.size, transform or self.transform,
                       order=self.order if order is None else order, digests=digests or self.digests)

    def part(self, start: int, stop: int) -> Batches:
        """The samples at positions [start, stop) of these (relative to them), batched alike."""
        return self._like(self.start + start, self.start + stop)

    def shard(self, rank: int, world_size: int) -> Batches:
        """Rank ``rank``'s contiguous share of these samples (shares differ by at most one sample)."""
        return self.part(self.samples * rank // world_size, self.samples * (rank + 1) // world_size)

    def map(self, transform: Callable[[Batch], Batch]) -> Batches:
        """The same batches with ``transform`` applied to each as it is made."""
        inner = self.transform
        combined = transform if inner is None else (lambda batch: transform(inner(batch)))
        return self._like(self.start, self.stop, transform=combined)

    def select(self, indices: torch.Tensor, digests: SampleDigests | None = None) -> Batches:
        """The source's samples ``indices`` (int64, e.g. a compile's held-out samples), batched alike."""
        return self._like(0, len(indices), order=torch.as_tensor(indices, dtype=torch.int64), digests=digests)


def _rows(batch: Batch, indices: torch.Tensor) -> Batch:
    """Samples ``indices`` of every input of ``batch`` (index_select: a memory-mapped array is read for them only)."""
    return inputs.structured(batch, lambda tensor: tensor.index_select(0, indices.to(tensor.device)))


class _Source:
    """Samples 0 .. samples-1, gathered by index; every batch a source returns is a fresh, checked batch."""

    samples: int

    def take(self, indices: torch.Tensor) -> Batch:
        raise NotImplementedError


class _TensorSource(_Source):
    """One batch (a tensor, or a tuple or dict of them), samples along dim 0: a batch gathers its rows."""

    def __init__(self, batch: Batch) -> None:
        self.batch, self.samples = batch, inputs.batch_size(batch)

    def take(self, indices: torch.Tensor) -> Batch:
        return _rows(self.batch, indices)


class _ListSource(_Source):
    """Batches already read (from an iterable); a batch gathers its rows from the held batches they lie in."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.offsets = torch.tensor(list(itertools.accumulate((inputs.batch_size(b) for b in batches), initial=0)))
        self.samples = int(self.offsets[-1])

    def take(self, indices: torch.Tensor) -> Batch:
        held = torch.searchsorted(self.offsets, indices, right=True) - 1
        runs, counts = torch.unique_consecutive(held, return_counts=True)
        pieces, first = [], 0
        for which, count in zip(runs.tolist(), counts.tolist()):
            pieces.append(_rows(self.batches[which], indices[first : first + count] - self.offsets[which]))
            first += count
        return pieces[0] if len(pieces) == 1 else inputs.concat(pieces)


class _DatasetSource(_Source):
    """A map-style Dataset read by index; a batch is stacked from its items (inputs of (input, target)) on use."""

    def __init__(self, dataset: Dataset, signature: Signature | None) -> None:
        self.dataset, self.samples, self.signature = dataset, len(dataset), signature
        self.form = _sample_form(self._item(0))

    def _item(self, index: int) -> Batch:
        item, _ = _input_of(self.dataset[index], index, signature=self.signature)
        return inputs.structured(item, lambda leaf: leaf.reshape(1) if leaf.dim() == 0 else leaf)

    def take(self, indices: torch.Tensor) -> Batch:
        indices = indices.tolist()
        items = [self._item(i) for i in indices]
        for index, item in zip(indices, items):
            if _sample_form(item) != self.form:
                raise CalibrationError(
                    f"calibration sample {index} has {_described(item)}, but sample 0 has "
                    f"{_described_form(self.form)}; all samples must share one shape and dtype."
                )
        return _checked(inputs.stack(items), f"calibration samples {_named(indices)}")


def _sample_form(sample: Batch) -> tuple:
    """The form of one sample (no batch dimension): structure, each input's shape and dtype."""
    return inputs.form(inputs.structured(sample, lambda leaf: leaf.unsqueeze(0)))


def _described(sample: Batch) -> str:
    return _described_form(_sample_form(sample))


def _described_form(form: tuple) -> str:
    """"shape (8,) and dtype torch.int64" for one input; "input_ids (8,) torch.int64, ..." for several."""
    kind, entries = form
    if kind == "tensor":
        return f"shape {entries[0][1]} and dtype {entries[0][2]}"
    return ", ".join(f"{name} of shape {shape} and dtype {dtype}" for name, shape, dtype in entries)


def _named(indices: list[int]) -> str:
    """'8..11' for a run of consecutive indices, else the indices (the first eight)."""
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")


def _checked(batch: Batch, what: str) -> Batch:
    """``batch`` when each of its inputs is a real-valued batch [B, ...] of finite values, all of one B, else a
    CalibrationError naming ``what``."""
    if isinstance(batch, torch.Tensor):
        return _checked_tensor(batch, what)
    for name, leaf in zip(inputs.names(batch), inputs.leaves(batch)):
        _checked_tensor(leaf, f"{what} ({name})")
    sizes = {name: int(leaf.shape[0]) for name, leaf in zip(inputs.names(batch), inputs.leaves(batch))}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name} {size}" for name, size in sizes.items())
        raise CalibrationError(
            f"{what} holds inputs of different lengths along dim 0 ({listed}); every input of a batch holds the same "
            "samples, one per row."
        )
    return inputs.structured(batch, torch.Tensor.detach)


def _checked_tensor(tensor: torch.Tensor, what: str) -> torch.Tensor:
    if tensor.dim() == 0:
        raise CalibrationError(f"{what} is a scalar; each item must be a batch [B, ...].")
    if tensor.is_complex():
        raise CalibrationError(f"{what} is complex ({tensor.dtype}); give real-valued inputs.")
    bad = sum(count_nonfinite(tensor))
    if bad:
        raise CalibrationError(f"{what} has {bad} NaN/Inf values; clean or drop those samples first.")
    return tensor.detach()


def count_nonfinite(tensor: torch.Tensor) -> tuple[int, int]:
    """(NaN count, Inf count) of ``tensor``, in chunks of samples: a whole-set mask would cost as much memory as the
    data (and a memory-mapped file is read once)."""
    if not tensor.is_floating_point():
        return 0, 0
    nans = infs = 0
    for chunk in torch.split(tensor, _CHECK_CHUNK):
        nans += int(torch.isnan(chunk).sum())
        infs += int(torch.isinf(chunk).sum())
    return nans, infs


class SampleDigests:
    """One digest per sample of a source, filled in as batches are read: duplicated samples told apart cheaply.

    A digest is 62 bits of the SHA-1 hash of the sample's bytes (never 0,
    which marks a sample not read yet); each sample is hashed once, when its
    batch is first read, before any model sees it. One int64 per sample is
    held, never the samples. SHA-1 only tells samples apart here, it protects
    nothing: it is hashlib's fastest digest on CPUs with SHA extensions
    (about twice blake2b's speed).
    """

    def __init__(self, samples: int) -> None:
        self.values = torch.zeros(samples, dtype=torch.int64)

    def record(self, indices: torch.Tensor, batch: Batch) -> None:
        """Hash the samples of ``batch`` (the source's ``indices``) not hashed yet: every input's bytes, in order."""
        missing = (self.values[indices] == 0).nonzero().flatten().tolist()
        if not missing:
            return
        leaves = [leaf.detach().cpu().contiguous() for leaf in inputs.leaves(batch)]
        rows = [leaf.reshape(len(leaf), -1).view(torch.uint8).numpy() for leaf in leaves]
        for row in missing:
            digest = hashlib.sha1(usedforsecurity=False)
            for leaf in rows:
                digest.update(leaf[row])
            self.values[indices[row]] = (int.from_bytes(digest.digest()[:8], "little") >> 2) + 1

    def of(self, part: Batches) -> torch.Tensor:
        """The digests of ``part``'s samples (a ``Batches`` recording into these), reading any batch not read yet."""
        for index in range(len(part)):
            if bool((self.values[part.batch_indices(index)] == 0).any()):
                part[index]
        return self.values[part.indices]

    def merge(self, runtime, part: Batches) -> None:
        """Every rank's digests of ``part`` (ranks read disjoint shares of it): the union, by a max over ranks."""
        indices = part.indices
        self.values[indices] = runtime.max(self.values[indices])


@dataclass(frozen=True)
class SplitIndices:
    """Which calibration samples (indices into the data as given) each part of a compile's split holds."""

    seed: int
    decide: torch.Tensor
    validate: torch.Tensor
    holdout: torch.Tensor


@dataclass
class CalibrationSplit:
    """The calibration samples in three disjoint parts, each with one job.

    ``calibrate`` (decide): the activation statistics every rewrite is planned
    on. ``validate``: run only to withdraw rewrites whose neurons leave their
    region there; it never adds one. ``holdout`` (verify): never used to
    decide anything; the final check runs on it. ``digests`` hash every
    sample the parts read, so duplicates count once as evidence.
    """

    calibrate: Batches
    holdout: Batches
    validate: Batches
    seed: int = DEFAULT_SPLIT_SEED
    digests: SampleDigests | None = None

    @property
    def calibration_samples(self) -> int:
        """Samples the compile learned from: decided on or validated on."""
        return self.decide_samples + self.validation_samples

    @property
    def decide_samples(self) -> int:
        return self.calibrate.samples

    @property
    def validation_samples(self) -> int:
        return self.validate.samples

    @property
    def holdout_samples(self) -> int:
        return self.holdout.samples

    def indices(self) -> SplitIndices:
        held = self.holdout.indices if self.holdout is not self.calibrate else torch.zeros(0, dtype=torch.int64)
        return SplitIndices(self.seed, self.calibrate.indices, self.validate.indices, held)

    def distinct_decide_samples(self) -> int:
        return int(self.digests.of(self.calibrate).unique().numel())

    def distinct_holdout_samples(self) -> tuple[int, int]:
        """(distinct held-out samples, those of them not among the decide samples: what verifies something new)."""
        held = self.digests.of(self.holdout).unique()
        unseen = torch.isin(held, self.digests.of(self.calibrate), invert=True)
        return int(held.numel()), int(unseen.sum())


def _input_of(item, index: int, *, where: str = "item", signature: Signature | None = None) -> tuple[Batch, bool]:
    """The model input in one calibration item, and whether it was written as Python numbers (then it is one sample).

    The item contract, in one place (documented in :func:`as_batches`):

    * a tensor or array is the input;
    * a dict is keyword inputs when ``signature`` names several inputs and one of its keys is among them
      (:func:`keyword_inputs`); otherwise it is read by key: the first of ``INPUT_KEYS`` it holds, else its only entry;
    * when ``forward`` requires two or more inputs, a tuple/list whose first element is a tuple/list of tensors is
      ``(inputs, target, ...)``, and one whose first that many elements are tensors or arrays is those positional
      inputs followed by targets;
    * a tuple/list whose first element is a tensor, an array or a dict is ``(input, target, ...)``: the input is first;
    * a tuple/list of Python numbers (or of such lists, nested) is one sample, e.g. a tokenizer's token ids;
    * anything else (numbers mixed with tensors or lists, an empty tuple) is refused, saying how to wrap it.
    """
    what = f"calibration {where} {index}"
    several = signature is not None and signature.several
    if isinstance(item, Mapping):
        if several and any(key in signature.names for key in item):
            return keyword_inputs(item, signature, what)
        return _input_of(pick_input(item, what), index, where=where)
    if isinstance(item, (tuple, list)):
        if not item:
            raise CalibrationError(f"{what} is an empty {type(item).__name__}; expected a tensor or (input, target).")
        if len(item) > 1 and all(isinstance(element, torch.Tensor) and element.dim() == 0 for element in item):
            raise CalibrationError(
                f"{what} is a {type(item).__name__} of {len(item)} one-number tensors: one sample or (input, target)? "
                "Give one sample as one tensor (torch.stack(item)), or (input, target) with the input of shape [1]."
            )
        required = len(signature.required) if several else 1
        if required > 1 and isinstance(item[0], (tuple, list)) and item[0] and all(map(_is_array, item[0])):
            return _positional_inputs(item[0], what)
        if required > 1 and len(item) >= required and all(map(_is_array, item[:required])):
            return _positional_inputs(item[:required], what)
        if isinstance(item[0], (torch.Tensor, np.ndarray, Mapping)):
            # A dict of Python number lists is one sample, in a pair too.
            return _input_of(item[0], index, where=where, signature=signature)
        if not _numbers_only(item):
            raise CalibrationError(
                f"{what} is a {type(item).__name__} that mixes numbers, lists and other values, so neither one sample "
                "nor (input, target) can be read from it; give each sample as a tensor (torch.tensor(ids)), "
                "or (input, target) with the input as a tensor."
            )
        try:
            return torch.tensor(item), True
        except (TypeError, ValueError) as error:
            raise CalibrationError(
                f"{what} is a nested list of numbers that is not rectangular ({error}); pad its rows to one length."
            ) from None
    if isinstance(item, np.ndarray):
        return tensor_from_array(item, what), False
    if isinstance(item, torch.Tensor):
        return item, False
    if isinstance(item, _NUMBER):
        return torch.tensor(item), True
    raise CalibrationError(
        f"{what} is a {type(item).__name__}, not a tensor; "
        "pass a tensor batch, an iterable of tensors or (input, target) tuples, or a DataLoader."
    )


def _is_array(value) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _leaf(value, what: str) -> tuple[torch.Tensor, bool]:
    """One input of a several-input item as a tensor, and whether it was written as Python numbers (one sample)."""
    if isinstance(value, torch.Tensor):
        return value, False
    if isinstance(value, np.ndarray):
        return tensor_from_array(value, what), False
    if isinstance(value, _NUMBER) or (isinstance(value, (tuple, list)) and value and _numbers_only(value)):
        try:
            return torch.tensor(value), True
        except (TypeError, ValueError) as error:
            raise CalibrationError(f"{what} is a nested list of numbers that is not rectangular ({error}).") from None
    raise CalibrationError(
        f"{what} is a {type(value).__name__}; give each input as a tensor, an array or a list of numbers (one sample)."
    )


def _one_sample(values: list[tuple[torch.Tensor, bool]], what: str) -> bool:
    """Whether the inputs of one item were all written as Python numbers (one sample); numbers beside tensors are
    refused (one sample or a batch?)."""
    kinds = {one_sample for _, one_sample in values}
    if len(kinds) > 1:
        raise CalibrationError(
            f"{what} mixes inputs written as Python numbers with tensors or arrays; give every input alike "
            "(each a tensor, or each a list of numbers for one sample)."
        )
    return kinds == {True}


def _positional_inputs(values, what: str) -> tuple[tuple, bool]:
    read = [_leaf(value, f"{what} input {i}") for i, value in enumerate(values)]
    return tuple(tensor for tensor, _ in read), _one_sample(read, what)


def keyword_inputs(mapping: Mapping, signature: Signature, what: str) -> tuple[dict, bool]:
    """``mapping`` as the keyword inputs of a ``forward`` with ``signature``, in its parameters' order, and whether
    they were written as Python numbers (one sample).

    Every key must name an input of ``forward``, except labels (:data:`TARGET_KEYS`) that it does not take, which
    are left out; every input without a default must be there. Anything else is refused naming the keys.
    """
    keys = [str(key) for key in mapping]
    unknown = [key for key in keys if key not in signature.names and key not in TARGET_KEYS]
    missing = [name for name in signature.required if name not in mapping]
    if unknown or missing:
        if unknown:
            problem = f"{', '.join(map(repr, unknown))} {'names' if len(unknown) == 1 else 'name'} none of its inputs"
        else:
            problem = f"{', '.join(map(repr, missing))} (no default) {'is' if len(missing) == 1 else 'are'} missing"
        raise CalibrationError(
            f"{what} has the keys {', '.join(map(repr, keys))} and the model's forward takes "
            f"{', '.join(map(repr, signature.names))}: {problem}. Give one entry per input of forward, under its "
            f"parameter name (labels may stay under one of {', '.join(TARGET_KEYS)})."
        )
    read = {name: _leaf(mapping[name], f"{what} entry {name!r}") for name in signature.names if name in mapping}
    return {name: tensor for name, (tensor, _) in read.items()}, _one_sample(list(read.values()), what)


def as_model_input(data, signature: Signature | None, what: str) -> Batch:
    """``data`` (a tensor, or a dict or tuple of tensors or arrays: a whole loaded file) as one checked batch of the
    form the model takes (the item contract of :func:`as_batches`)."""
    batch, one_sample = _input_of(data, 0, signature=signature)
    if one_sample:
        batch = inputs.structured(batch, lambda leaf: leaf.unsqueeze(0))
    return _checked(batch, what)


def _numbers_only(item) -> bool:
    """Whether ``item`` is a number or a (nested) list/tuple of numbers only."""
    if isinstance(item, (tuple, list)):
        return all(_numbers_only(element) for element in item)
    return isinstance(item, _NUMBER)


def pick_input(mapping: Mapping, what: str) -> object:
    """The entry of ``mapping`` under the first of INPUT_KEYS, else its only entry, else a CalibrationError naming
    the keys (several tensors under other names, e.g. a tokenizer's input_ids and attention_mask, are ambiguous)."""
    for key in INPUT_KEYS:
        if key in mapping:
            return mapping[key]
    if len(mapping) == 1:
        return next(iter(mapping.values()))
    keys = ", ".join(repr(str(key)) for key in mapping) or "none"
    raise CalibrationError(
        f"{what} has the keys {keys} and none of them is one of {', '.join(INPUT_KEYS)}; store the model input under "
        "'inputs', or pass the input alone (e.g. [item['input_ids'] for item in data])."
    )


def tensor_from_array(array: np.ndarray, what: str) -> torch.Tensor:
    """``array`` as a tensor (sharing its memory where torch can), in native byte order: a big-endian array (saved on
    another machine) is converted, which copies it."""
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    # order="C" copies only arrays torch cannot view (negative strides); unlike ascontiguousarray it keeps 0-d.
    try:
        return torch.from_numpy(np.asarray(array, order="C"))
    except TypeError as error:
        raise CalibrationError(f"{what} has dtype {array.dtype}, which torch cannot hold ({error}).") from None


def as_batches(calibration, *, batch_size: int = DEFAULT_BATCH_SIZE, signature: Signature | None = None) -> Batches:
    """Checked batches ``[B, ...]`` from a tensor, a map-style Dataset, an iterable of tensors / (x, y), or a DataLoader.

    Samples keep their dtype (integer token ids stay integers). A tensor is
    gathered ``batch_size`` rows at a time and a map-style Dataset (or a DataLoader over
    one that gives every sample once with the default collate function: a
    sequential or shuffling sampler, no drop_last; it is read in index order)
    is read a batch at a time, so neither is copied or held whole; any other
    iterable (a loader with its own sampler or collate function, a generator)
    is read once and held. Tensors and iterables are
    checked up front (shape, NaN/Inf), a Dataset's batches as they are read.

    What an item (of a Dataset, or a batch of a DataLoader or iterable) may be:

    * a tensor or NumPy array: the input (one sample of a Dataset; a batch
      ``[B, ...]`` of an iterable);
    * a tuple/list whose first element is a tensor, an array or a dict:
      ``(input, target, ...)``, the input is the first;
    * a dict, when ``signature`` (the model's ``forward``, from
      :func:`egp_export.analysis.inputs.signature`) names several inputs and
      one of the dict's keys is among them: keyword inputs
      (``input_ids``, ``attention_mask``, ...; every key must name an input,
      labels under :data:`TARGET_KEYS` are left out, inputs without a default
      must be there; :func:`keyword_inputs`);
    * any other dict: the entry under the first of :data:`INPUT_KEYS` (``inputs``,
      ``input``, ``x``, ``data``, ``images``), else its only entry; several
      entries under other names are refused: pass the input alone;
    * when ``forward`` requires two or more inputs: a tuple/list of that many
      tensors or arrays (then targets), or ``((input_0, input_1, ...), target)``:
      positional inputs. A model with one required input reads a tuple as
      ``(input, target)``: give its optional inputs in a dict;
    * a list/tuple of Python numbers (or nested lists of them): **one
      sample**, e.g. a tokenizer's token ids, in a Dataset and in an
      iterable alike (an iterable's tensors are batches, its lists of
      numbers single samples).

    Anything else (numbers mixed with tensors, several one-number tensors,
    ragged lists) is refused with a message saying how to wrap it. A
    DataLoader with the default collate function over a Dataset of number
    lists is refused unless it is read through its Dataset (the collate
    function turns each sample's ids into one tensor per position); over an
    IterableDataset this cannot be seen without reading it: give such a
    loader ``collate_fn=torch.tensor``.

    The calibration may also be one batch of several inputs: a dict of
    tensors, or (for a ``forward`` requiring several inputs) a tuple of them.
    Every input of a batch must hold the same number of samples.
    """
    if isinstance(calibration, (str, bytes)):
        raise CalibrationError("calibration must be tensors, not a path; load the file first (egp_export.io.datasets).")
    if isinstance(calibration, Batches):
        return calibration
    several = signature is not None and len(signature.required) > 1
    if isinstance(calibration, torch.Tensor) or isinstance(calibration, Mapping) or (
        several and isinstance(calibration, tuple) and all(map(_is_array, calibration))
    ):
        batch = as_model_input(calibration, signature, "calibration item 0")
        return _nonempty(Batches(_TensorSource(batch), size=batch_size))
    dataset = _map_style_dataset(calibration)
    if dataset is None:
        _refuse_transposing_collate(calibration)
    if dataset is not None:
        if not len(dataset):
            raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
        return Batches(_DatasetSource(dataset, signature), size=batch_size)
    try:
        items = iter(calibration)
    except TypeError:
        raise CalibrationError(
            f"calibration of type {type(calibration).__name__} is not iterable; pass a tensor batch, "
            "a Dataset, an iterable of tensors or (input, target) tuples, or a DataLoader."
        ) from None
    batches: list[Batch] = []
    form: tuple | None = None
    for index, item in enumerate(items):
        batch, one_sample = _input_of(item, index, signature=signature)
        # An iterable yields batches, except that Python numbers (a list of token ids) are one sample.
        if one_sample:
            batch = inputs.structured(batch, lambda leaf: leaf.unsqueeze(0))
        batch = _checked(batch, f"calibration item {index}")
        if form is None:
            form = _batch_form(batch)
        elif _batch_form(batch) != form:
            raise CalibrationError(
                f"calibration item {index} has samples of {_shapes(batch)}, but earlier items have "
                f"{_shapes_of(form)}; all samples must share one shape."
            )
        if inputs.batch_size(batch):
            batches.append(batch)
    if not batches:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    return Batches(_ListSource(batches), size=batch_size)


def _batch_form(batch: Batch) -> tuple:
    """Structure and each input's sample shape (an iterable's batches may differ in dtype, as before)."""
    kind, entries = inputs.form(batch)
    return kind, tuple((name, shape) for name, shape, _ in entries)


def _shapes(batch: Batch) -> str:
    return _shapes_of(_batch_form(batch))


def _shapes_of(form: tuple) -> str:
    kind, entries = form
    if kind == "tensor":
        return f"shape {entries[0][1]}"
    return ", ".join(f"{name} of shape {shape}" for name, shape in entries)


def _nonempty(batches: Batches) -> Batches:
    if not batches.samples:
        raise CalibrationError("calibration data is empty; pass at least a few representative samples.")
    return batches


def _refuse_transposing_collate(calibration) -> None:
    """A CalibrationError when ``calibration`` is a DataLoader whose default collate function would turn each item's
    list of numbers (one sample by the item contract) into one tensor per position, read as (input, target, ...)."""
    if not isinstance(calibration, DataLoader) or calibration.collate_fn is not default_collate:
        return
    dataset = calibration.dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__") or not len(dataset):
        return
    item = dataset[0]
    if isinstance(item, (tuple, list)) and len(item) > 1 and _numbers_only(item):
        raise CalibrationError(
            f"the DataLoader's items are lists of {len(item)} numbers (one sample each), which its default collate "
            "function turns into one tensor per position; pass the Dataset itself, or give the loader "
            "collate_fn=torch.tensor (one batch [B, ...] of the lists)."
        )


def _map_style_dataset(calibration) -> Dataset | None:
    """The map-style Dataset to read by index: the object itself, or a plain DataLoader's dataset."""
    if isinstance(calibration, DataLoader):
        from torch.utils.data import RandomSampler, SequentialSampler

        dataset, sampler = calibration.dataset, calibration.sampler
        # Read in index order only when the loader would give every sample once, collated the default way.
        every_sample = isinstance(sampler, SequentialSampler) or (
            isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None
        )
        plain = (
            every_sample and calibration.collate_fn is default_collate and calibration.batch_size is not None
            and not calibration.drop_last
        )
        return dataset if plain and not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__") else None
    if isinstance(calibration, Dataset) and not isinstance(calibration, IterableDataset) and hasattr(calibration, "__len__"):
        return calibration
    return None


def split_holdout(
    batches: Batches | list[torch.Tensor], holdout: float, validation: float = 0.0, *, seed: int = DEFAULT_SPLIT_SEED
) -> CalibrationSplit:
    """Split the samples three ways by a seeded permutation: the ``holdout`` fraction (at least one) for
    verification, the ``validation`` fraction (at least one when asked for) for validation, the rest to decide on.

    The permutation is ``torch.randperm`` under a generator seeded with
    ``seed``: the same split on every run and every process (of one torch
    version). Data sorted by class (an image folder) give every part samples
    of every class, where the tail in index order held out the last class
    only. Each part reads its samples in index order, through its index array
    (nothing is copied up front), and hashes each one it reads
    (:class:`SampleDigests`). ``holdout=0`` verifies on the decide samples
    themselves, which only checks the rewrite, not the claim that
    activations stay linear on unseen inputs.
    """
    for name, fraction in (("holdout", holdout), ("validation", validation)):
        if not 0.0 <= fraction < 1.0:
            raise CalibrationError(f"{name} fraction must be in [0, 1), got {fraction}.")
    if not isinstance(batches, Batches):
        batches = Batches(_ListSource(list(batches)), size=max(inputs.batch_size(b) for b in batches))
    total = batches.samples
    held = max(1, round(total * holdout)) if holdout > 0 else 0
    validated = max(1, round(total * validation)) if validation > 0 else 0
    if held + validated >= total:
        raise CalibrationError(
            f"only {total} calibration sample(s): too few to keep {holdout:.0%} for verification and "
            f"{validation:.0%} for validation and still decide on the rest; pass more samples or smaller fractions."
        )
    decide_end = total - held - validated
    shuffled = batches.indices[torch.randperm(total, generator=torch.Generator().manual_seed(seed))]
    parts = (shuffled[:decide_end], shuffled[decide_end : total - held], shuffled[total - held :])
    digests = SampleDigests(batches.source.samples)
    ordered = batches.select(torch.cat([part.sort().values for part in parts]), digests)
    calibrate = ordered.part(0, decide_end)
    return CalibrationSplit(
        calibrate=calibrate,
        holdout=ordered.part(total - held, total) if held else calibrate,
        validate=ordered.part(decide_end, total - held),
        seed=seed,
        digests=digests,
    )


@dataclass(frozen=True)
class InputConversion:
    """How calibration samples are converted before the model sees them, and what states it ("<data> " + note).

    Each step converts the inputs of one dtype: ``(from, to, divided by)``; inputs of other dtypes stay as they are.
    """

    steps: tuple[tuple[torch.dtype, torch.dtype, float], ...]
    note: str

    def __call__(self, batch: Batch) -> Batch:
        return inputs.structured(batch, self._convert)

    def _convert(self, tensor: torch.Tensor) -> torch.Tensor:
        for source, dtype, scale in self.steps:
            if tensor.dtype == source:
                converted = tensor.to(dtype)
                return converted / scale if scale != 1.0 else converted
        return tensor


# Integer dtypes an nn.Embedding (and most index ops) refuse; ids in them widen to int64 without changing a value.
_NARROW_INTEGERS = frozenset({torch.uint8, torch.int8, torch.int16, torch.uint16, torch.uint32})
# uint8 data a model takes as floats are images: scaled to [0, 1], the scale of an image folder.
_UINT8_IMAGE_SCALE = 255.0


def fitting_conversion(model, sample: Batch, *, images: bool = False) -> InputConversion | None:
    """None when ``model`` accepts ``sample`` (one sample ``[1, ...]``) as it is; else the first of these it accepts:

    1. narrow integers (uint8, int8, int16, uint16, uint32) as int64: token ids, values unchanged;
    2. bool as float32 (0 and 1), tried only after the model refused bool;
    3. with ``images`` (data from a file, the command line): uint8 as float32 scaled to [0, 1] (divided by 255,
       the scale of an image folder) and other integers as float32, values as stored.

    A sample of several inputs converts the inputs of each such dtype alike; the combinations are tried fewest
    conversions first. None too when nothing is accepted: the compile then names the dtype the model rejects. The
    model runs on a copy of the sample (a model that writes into its input changes nothing).
    """
    dtypes = list(dict.fromkeys(leaf.dtype for leaf in inputs.leaves(sample) if not leaf.dtype.is_floating_point))
    if not dtypes or _accepts(model, sample):
        return None
    options = [[None, *_candidates(dtype, images)] for dtype in dtypes]
    combinations = sorted(itertools.product(*options), key=lambda chosen: sum(step is not None for step in chosen))
    for chosen in combinations:
        steps = [step for step in chosen if step is not None]
        if not steps:
            continue
        conversion = InputConversion(tuple(step[:3] for step in steps), "; ".join(step[3] for step in steps))
        if _accepts(model, conversion(sample)):
            return conversion
    return None


def _candidates(dtype: torch.dtype, images: bool) -> list[tuple[torch.dtype, torch.dtype, float, str]]:
    """The conversions tried for inputs of ``dtype``, in order: (from, to, divided by, what states it)."""
    name = str(dtype).removeprefix("torch.")
    candidates = []
    if dtype in _NARROW_INTEGERS:
        candidates.append((dtype, torch.int64, 1.0, f"holds {name} integers, which the model rejects: "
                                                     "widened to int64 (token ids: values unchanged)"))
    if dtype == torch.bool:
        candidates.append((dtype, torch.float32, 1.0, "holds bool data, which the model rejects: "
                                                      "converted to float32 (0 and 1)"))
    elif images and dtype == torch.uint8:
        candidates.append((dtype, torch.float32, _UINT8_IMAGE_SCALE, "holds uint8 data and the model takes floats: "
                           "converted to float32 and scaled to [0, 1] (divided by 255, as an image folder is)"))
    elif images:
        candidates.append((dtype, torch.float32, 1.0, f"holds {name} data and the model takes floats: converted to "
                                                      "float32 (values as stored, not rescaled)"))
    return candidates


def _accepts(model, sample: Batch) -> bool:
    try:
        with torch.no_grad():
            inputs.call_on_copy(model, sample)
    except Exception:  # noqa: BLE001 - any failure means "not this input"; the compile reports the real error
        return False
    return True


def fitted_to(model, batches: Batches) -> Batches:
    """``batches`` converted by :func:`fitting_conversion` (narrow integer ids to int64, bool to float32) where
    ``model`` rejects them as they are, with a UserWarning stating it; ``batches`` themselves otherwise."""
    conversion = fitting_conversion(model, inputs.take(batches[0], slice(0, 1)))
    if conversion is None:
        return batches
    warnings.warn(f"egp-export: the calibration data {conversion.note}", UserWarning, stacklevel=3)
    return batches.map(conversion)
