"""Reading checkpoints into plain state dicts and loading them into a model.

Checkpoints come in many shapes: a bare ``state_dict()``, a training wrapper
(``{"state_dict": ..., "epoch": ...}``), keys prefixed by DataParallel/DDP
(``module.``) or ``torch.compile`` (``_orig_mod.``), and models pruned with
``torch.nn.utils.prune`` (``X.weight_orig`` + ``X.weight_mask``).
:func:`load_state_dict` turns all of them into ``{name: tensor}`` with the
names the bare architecture expects; :func:`apply_state_dict` loads that into
a model and explains any mismatch.

A checkpoint is more than weights when it holds a whole pickled module (only
with ``allow_pickle``) or was written by ``egp-export prune --method easier``,
whose metadata (key ``"egp_prune"``) names activation call sites EASIER
replaced by the identity. :func:`read_checkpoint` returns all three, and
:func:`apply_identity_sites` rewrites those sites, so that what is compiled is
exactly the network the checkpoint holds, not the architecture it came from.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from egp_export.errors import CheckpointError

# Keys under which training scripts commonly nest the weights, most specific first.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# Prefixes added by wrappers around the model: DataParallel/DDP and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.nn.utils.prune replaces parameter <name> by <name>_orig and a buffer <name>_mask.
_PRUNE_ORIG_SUFFIX = "_orig"
_PRUNE_MASK_SUFFIX = "_mask"
# How many names of each kind of mismatch a message lists before "and N more".
_MAX_LISTED = 8
_ARCH_HINT = "is --arch / --arch-kwargs the architecture this checkpoint was trained with?"
# torch's weights_only unpickler names the class it refused in this form.
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
# Where ``egp-export prune`` writes what pruning did; EASIER's identity sites are under "identity_sites".
PRUNE_METADATA_KEY = "egp_prune"


@dataclass
class Checkpoint:
    """What a checkpoint file holds: weights, or a whole module; and the call sites pruning made identities."""

    state_dict: dict[str, torch.Tensor]
    module: nn.Module | None = None  # a whole pickled nn.Module (allow_pickle only): compile it as it is
    identity_sites: list[str] = field(default_factory=list)
    # Factory arguments that rebuild a pruned architecture (removed residual units, new widths).
    arch_kwargs: dict = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
    """Read the checkpoint at ``path``: its weights (as :func:`load_state_dict`), a whole module if it is one,
    and from the ``"egp_prune"`` metadata EASIER's identity sites and the factory arguments that rebuild a
    pruned architecture (SAP, energy block removal, ITPruner)."""
    path = _existing_file(path)
    loaded = _torch_load(path, allow_pickle=allow_pickle)
    state_dict = _fold_pruning_masks(_strip_wrapper_prefixes(_unwrap(loaded, path)), path)
    return Checkpoint(
        state_dict=state_dict,
        module=_whole_module(loaded),
        identity_sites=_identity_sites(loaded, path),
        arch_kwargs=_arch_kwargs(loaded, path),
    )


def apply_identity_sites(model: nn.Module, sites: Sequence[str], path: str | os.PathLike = "the checkpoint") -> fx.GraphModule:
    """An eval-mode GraphModule of (a copy of) ``model`` with the activation call sites ``sites`` replaced by
    the identity, as EASIER did. Sites are fx node names; one the traced model lacks is a CheckpointError."""
    from egp_export.analysis.trace import trace

    gm = trace(model)
    nodes = {node.name: node for node in gm.graph.nodes}
    unknown = [name for name in sites if name not in nodes or not isinstance(next(iter(nodes[name].args), None), fx.Node)]
    if unknown:
        raise CheckpointError(
            f"{path} says pruning replaced the activation call sites {', '.join(unknown)} by the identity, but the "
            f"model has no such call sites; {_ARCH_HINT}"
        )
    for name in sites:
        node = nodes[name]
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the --checkpoint path.")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the path of a .pt/.pth file.")
    return path


def _whole_module(loaded: object) -> nn.Module | None:
    if isinstance(loaded, nn.Module):
        return loaded
    if isinstance(loaded, Mapping):
        return next((loaded[key] for key in _WRAPPER_KEYS if isinstance(loaded.get(key), nn.Module)), None)
    return None


def _identity_sites(loaded: object, path: Path) -> list[str]:
    metadata = loaded.get(PRUNE_METADATA_KEY) if isinstance(loaded, Mapping) else None
    if metadata is None:
        return []
    sites = metadata.get("identity_sites", []) if isinstance(metadata, Mapping) else None
    if not isinstance(sites, (list, tuple)) or not all(isinstance(site, str) for site in sites):
        raise CheckpointError(
            f"checkpoint {path} has {PRUNE_METADATA_KEY!r} metadata whose 'identity_sites' is not a list of call-site "
            "names; the file was not written by egp-export prune, or is damaged. Re-run the pruning."
        )
    return list(sites)


def _arch_kwargs(loaded: object, path: Path) -> dict:
    metadata = loaded.get(PRUNE_METADATA_KEY) if isinstance(loaded, Mapping) else None
    kwargs = metadata.get("arch_kwargs", {}) if isinstance(metadata, Mapping) else {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise CheckpointError(
            f"checkpoint {path} has {PRUNE_METADATA_KEY!r} metadata whose 'arch_kwargs' is not a dict of factory "
            "arguments; the file was not written by egp-export prune, or is damaged. Re-run the pruning."
        )
    return dict(kwargs)


def load_state_dict(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read the checkpoint at ``path`` and return its weights as ``{name: tensor}`` on the CPU.

    Wrappers are unwrapped, ``module.``/``_orig_mod.`` prefixes stripped and
    pruning reparametrizations folded (``weight = weight_orig * weight_mask``).
    ``allow_pickle`` permits arbitrary pickled objects (e.g. a whole saved
    ``nn.Module``), which executes code from the file; use it only for trusted
    files. Raises CheckpointError for anything that is not a usable state dict.
    """
    return read_checkpoint(path, allow_pickle=allow_pickle).state_dict


def apply_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` strictly (this mutates ``model``).

    Missing keys, unexpected keys and shape mismatches are all collected first
    and reported together in one CheckpointError, so the user sees the whole
    difference at once rather than torch's first complaint.
    """
    expected = model.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (old checkpoints lack it).
    missing = [key for key in expected if key not in state_dict and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: checkpoint {_shape(state_dict[key])} vs model {_shape(expected[key])}"
        for key in expected
        if key in state_dict and _shapes_conflict(state_dict[key], expected[key])
    ]
    if missing or unexpected or mismatched:
        parts = [f"the checkpoint does not fit the model ({type(model).__name__}):"]
        parts += _listing("missing keys (in the model, not in the checkpoint)", missing)
        parts += _listing("unexpected keys (in the checkpoint, not in the model)", unexpected)
        parts += _listing("shape mismatches", mismatched)
        parts.append(_ARCH_HINT)
        raise CheckpointError("\n".join(parts))
    try:
        # A copy, because BatchNorm's loader inserts num_batches_tracked into the dict it is given.
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"loading the checkpoint into {type(model).__name__} failed: {error}\n{_ARCH_HINT}") from None


def _torch_load(path: Path, *, allow_pickle: bool) -> object:
    """``torch.load`` with every failure turned into a CheckpointError that says what to do."""
    if allow_pickle:
        warnings.warn(
            f"loading {path} with allow_pickle (--unsafe-pickle): arbitrary code in the file is executed; "
            "use this only for checkpoints from a source you trust.",
            UserWarning,
            stacklevel=3,
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        if not allow_pickle and _refused_by_weights_only(path, error):
            if main_names := _names_from_main(path):
                raise _pickled_by_script(path, main_names) from None
            refused = _REFUSED_GLOBAL.search(str(error))
            what = refused.group(1) if refused else "objects torch.load(weights_only=True) does not allow"
            raise CheckpointError(
                f"checkpoint {path} contains pickled Python objects ({what}), not only tensors, "
                "so it is not loaded by default. Re-save it with torch.save(model.state_dict(), path), "
                "or, if you trust the file, pass --unsafe-pickle (allow_pickle=True)."
            ) from None
        raise _corrupt(path, error) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise _corrupt(path, error) from None
    except (AttributeError, ImportError) as error:
        # Only reachable with allow_pickle: the pickle names a class that cannot be imported here.
        if main_names := _names_from_main(path):
            raise _pickled_by_script(path, main_names) from None
        raise CheckpointError(
            f"checkpoint {path} refers to Python code that is not available here ({error}); "
            "install the package that defined the model, or re-save the file with "
            "torch.save(model.state_dict(), path)."
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}.") from None
    except Exception as error:  # noqa: BLE001 - random bytes make the unpickler fail in any way (IndexError, KeyError...)
        raise _corrupt(path, error) from None


def _refused_by_weights_only(path: Path, error: pickle.UnpicklingError) -> bool:
    """Tell "well-formed file holding objects weights_only refuses" from "damaged file".

    Both raise UnpicklingError. A refused class is named in the message; a
    readable zip archive (torch.save's format) that still fails is also a
    refusal, whereas damaged bytes show up as an unsupported pickle operand.
    """
    message = str(error)
    if _REFUSED_GLOBAL.search(message):
        return True
    return zipfile.is_zipfile(path) and "Unsupported operand" not in message


def _names_from_main(path: Path) -> list[str]:
    """The classes and functions the pickle in ``path`` takes from ``__main__`` (read without running it)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - an unreadable archive simply names nothing
        return []
    return [name for name in names if name.startswith("__main__.")]


def _pickled_by_script(path: Path, names: list[str]) -> CheckpointError:
    # EGP's reference code saves torch.save(deepcopy(model)): a whole module whose forward hooks are
    # instances of a class defined in the training script, which only that script can unpickle.
    return CheckpointError(
        f"checkpoint {path} is a whole model pickled by its training script (torch.save(model)), holding objects "
        f"defined in that script's __main__ ({', '.join(names[:_MAX_LISTED])}), such as forward hooks; nothing "
        "but that script can unpickle them. In the script's environment, re-save the weights as a state dict: "
        "torch.save(model.state_dict(), path)."
    )


def _corrupt(path: Path, error: BaseException) -> CheckpointError:
    # torch's messages are long; the first line says enough about what went wrong.
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(
        f"checkpoint {path} is not a readable PyTorch file ({detail}); "
        "it may be truncated or corrupt, or not written by torch.save. Re-download or re-save it."
    )


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the ``{name: tensor}`` mapping inside whatever the file held."""
    if isinstance(loaded, nn.Module):
        return dict(loaded.state_dict())
    if not isinstance(loaded, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict; "
            "save the weights with torch.save(model.state_dict(), path)."
        )
    for key in _WRAPPER_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, nn.Module):
            return dict(inner.state_dict())
        # The wrapper's other entries (epoch, optimizer, config) are metadata and dropped.
        if isinstance(inner, Mapping) and inner and any(isinstance(value, torch.Tensor) for value in inner.values()):
            return _require_tensors(inner, path, where=f"under the key {key!r}")
    return _require_tensors(loaded, path, where="at the top level")


def _require_tensors(mapping: Mapping, path: Path, *, where: str) -> dict[str, torch.Tensor]:
    if not mapping:
        raise CheckpointError(f"checkpoint {path} holds an empty dict; it contains no weights.")
    others = [str(key) for key, value in mapping.items() if not isinstance(value, torch.Tensor)]
    if others:
        keys = ", ".join(repr(key) for key in list(mapping)[:_MAX_LISTED])
        raise CheckpointError(
            f"checkpoint {path} is not a state dict: {where} it has {len(others)} non-tensor entries "
            f"({', '.join(others[:_MAX_LISTED])}); keys found: {keys}. Save the weights with "
            "torch.save(model.state_dict(), path) or nest them under 'state_dict'."
        )
    return {str(key): value for key, value in mapping.items()}


def _strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove ``module.``/``_orig_mod.`` while every key carries one (they can nest)."""
    while True:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(key.startswith(p) for key in state_dict)), None)
        if prefix is None:
            return state_dict
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}


def _fold_pruning_masks(state_dict: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Replace each ``<name>_orig``/``<name>_mask`` pair by ``<name> = <name>_orig * <name>_mask``.

    Order is kept: the folded tensor takes the place of ``<name>_orig``. A
    ``_mask`` without an ``_orig`` partner is an ordinary buffer and kept.
    """
    folded: dict[str, torch.Tensor] = {}
    mask_keys = set()
    for key, value in state_dict.items():
        if not key.endswith(_PRUNE_ORIG_SUFFIX):
            continue
        name = key[: -len(_PRUNE_ORIG_SUFFIX)]
        mask_key = name + _PRUNE_MASK_SUFFIX
        if mask_key not in state_dict:
            continue
        mask = state_dict[mask_key]
        if mask.shape != value.shape:
            raise CheckpointError(
                f"checkpoint {path}: pruning mask {mask_key} has shape {_shape(mask)} but {key} has "
                f"{_shape(value)}; the file is inconsistent, re-save it after torch.nn.utils.prune.remove()."
            )
        if name in state_dict:
            raise CheckpointError(
                f"checkpoint {path} has {name} as well as {key} and {mask_key}; it is unclear which "
                "is the weight. Re-save it after torch.nn.utils.prune.remove()."
            )
        folded[key] = value * mask.to(value.dtype)
        mask_keys.add(mask_key)
    result: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in mask_keys:
            continue
        if key in folded:
            result[key[: -len(_PRUNE_ORIG_SUFFIX)]] = folded[key]
        else:
            result[key] = value
    return result


def _shapes_conflict(loaded: object, expected: object) -> bool:
    # Lazy (uninitialized) parameters take their shape from the checkpoint; extra state has none.
    if not isinstance(loaded, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return False
    if nn.parameter.is_lazy(expected):
        return False
    return loaded.shape != expected.shape


def _shape(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    return type(value).__name__


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):"]
    lines += [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
    return lines
