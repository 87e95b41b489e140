"""Resolving ``--arch`` specifications to freshly built (untrained) models.

Three forms are accepted:

* ``torchvision:NAME`` builds ``torchvision.models.get_model(NAME, weights=None)``;
  pretrained weights are never downloaded, the checkpoint supplies them.
* ``transformers:CLASS`` (e.g. ``transformers:BertModel``) builds the Hugging
  Face model class from its config class, ``CLASS(CLASS.config_class(**kwargs))``:
  random weights, nothing downloaded (the checkpoint supplies the weights);
  the optional ``transformers`` package must be installed.
* ``package.module:factory`` imports ``package.module`` and calls ``factory``
  (an attribute path such as ``Net.create`` is allowed).

Keyword arguments for the factory come from ``--arch-kwargs k=v ...`` via
:func:`parse_kwargs`.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from egp_export.errors import ArchitectureError

_TORCHVISION = "torchvision"
_TRANSFORMERS = "transformers"
_SPEC_FORMS = (
    "'torchvision:NAME' (e.g. torchvision:resnet18), 'transformers:CLASS' (e.g. transformers:BertModel) or "
    "'package.module:factory' (e.g. mypkg.models:make_net)"
)
# Builder arguments that would fetch pretrained weights from the internet.
_DOWNLOADING_ARGUMENTS = ("weights", "weights_backbone")
# Spellings common on command lines that ast.literal_eval does not know.
_LOWERCASE_BOOLS = {"true": True, "false": False}


def build_model(spec: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build the model named by ``spec`` with ``kwargs``; raise ArchitectureError if it cannot be built."""
    kwargs = dict(kwargs or {})
    source, _, name = spec.partition(":")
    if not source.strip() or not name.strip():
        raise ArchitectureError(f"--arch {spec!r} is not of the form {_SPEC_FORMS}.")
    source, name = source.strip(), name.strip()
    if source == _TORCHVISION:
        factory = _torchvision_builder(name, kwargs)
    elif source == _TRANSFORMERS:
        factory = _transformers_builder(name, kwargs)
    else:
        factory = _import_factory(source, name)
    try:
        model = factory(**kwargs)
    except Exception as error:  # any failure of user code is reported with its text
        raise ArchitectureError(
            f"--arch {spec} raised {type(error).__name__}: {error} when called with {_describe(kwargs)}; "
            "check --arch-kwargs against the factory's parameters."
        ) from None
    if not isinstance(model, nn.Module):
        raise ArchitectureError(
            f"--arch {spec} returned a {type(model).__name__}, not a torch.nn.Module; "
            "point --arch at a function or class that builds the model."
        )
    return model


def parse_kwargs(items: list[str]) -> dict[str, Any]:
    """Turn ``["k=v", ...]`` into a dict, reading each value as a Python literal where possible.

    ``num_classes=10`` gives an int, ``dropout=0.1`` a float, ``bias=False`` or
    ``bias=false`` a bool, ``size=(3,32,32)`` a tuple, ``norm=None`` None;
    anything else (``act=relu``) stays a string.
    """
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ArchitectureError(
                f"--arch-kwargs item {item!r} is not KEY=VALUE with KEY a Python identifier (e.g. num_classes=10)."
            )
        if key in parsed:
            raise ArchitectureError(f"--arch-kwargs gives {key!r} more than once; keep one {key}=VALUE.")
        parsed[key] = _parse_value(text.strip())
    return parsed


def _parse_value(text: str) -> Any:
    if text in _LOWERCASE_BOOLS:
        return _LOWERCASE_BOOLS[text]
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        # Not a literal (e.g. a bare word such as relu): the factory gets the string.
        return text


def _torchvision_builder(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """Return a torchvision builder with every weight download switched off."""
    from torchvision import models

    available = models.list_models()
    # get_model looks names up in lower case, so do the same here.
    if name.lower() not in available:
        close = difflib.get_close_matches(name.lower(), available, n=5, cutoff=0.5)
        suggestion = f"close names: {', '.join(close)}" if close else "no close names"
        raise ArchitectureError(
            f"torchvision has no model {name!r} ({suggestion}); torchvision.models.list_models() lists all of them."
        )
    builder = models.get_model_builder(name)
    parameters = inspect.signature(builder).parameters
    for argument in _DOWNLOADING_ARGUMENTS:
        if kwargs.get(argument) is not None:
            raise ArchitectureError(
                f"--arch-kwargs {argument}={kwargs[argument]!r}: egp-export never downloads pretrained weights; "
                "drop it and give the trained weights with --checkpoint."
            )
        if argument in parameters:
            kwargs[argument] = None
    return builder


def _transformers_builder(name: str, kwargs: dict[str, Any]) -> Callable[..., Any]:
    """A builder of Hugging Face model class ``name`` from its config (random weights, nothing downloaded).

    A config accepts any keyword silently (a misspelt ``hiden_size`` would be
    stored and ignored), so every keyword must be one of the config's own.
    """
    try:
        import transformers
    except ImportError:
        raise ArchitectureError(
            f"--arch transformers:{name} needs Hugging Face transformers, which is not installed: "
            "pip install 'egp-export[transformers]' (or pip install transformers)."
        ) from None
    model_class = getattr(transformers, name, None)
    config_class = getattr(model_class, "config_class", None)
    if not isinstance(model_class, type) or not issubclass(model_class, nn.Module) or not isinstance(config_class, type):
        public = [n for n in dir(transformers) if n.endswith("Model") or "For" in n]
        close = difflib.get_close_matches(name, public, n=5, cutoff=0.6)
        suggestion = f" (close names: {', '.join(close)})" if close else ""
        raise ArchitectureError(
            f"transformers has no model class {name!r} built from a config{suggestion}; give a class such as "
            "BertModel, ViTModel or BertForSequenceClassification."
        )
    defaults = config_class()
    unknown = [key for key in kwargs if not hasattr(defaults, key)]
    if unknown:
        generic = set(transformers.PretrainedConfig().to_dict())
        known = [key for key in defaults.to_dict() if key not in generic] or list(defaults.to_dict())
        close = sorted({c for key in unknown for c in difflib.get_close_matches(key, known, n=3, cutoff=0.6)})
        raise ArchitectureError(
            f"--arch-kwargs {', '.join(unknown)}: not a field of {config_class.__name__}, which would store and ignore "
            f"it{' (close names: ' + ', '.join(close) + ')' if close else ''}; fields include "
            f"{', '.join(known[:12])}, ..."
        )

    def build(**config) -> nn.Module:
        return model_class(config_class(**config))

    return build


def _import_factory(module_name: str, attribute_path: str) -> Callable[..., Any]:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ArchitectureError(f"cannot import {module_name!r} ({error}); install it or add its folder to PYTHONPATH.") from None
    except Exception as error:  # its own import-time failure, reported with its text
        raise ArchitectureError(f"importing {module_name!r} raised {type(error).__name__}: {error}.") from None
    target: Any = module
    for part in attribute_path.split("."):
        if not hasattr(target, part):
            public = [name for name in dir(module) if not name.startswith("_")]
            close = difflib.get_close_matches(attribute_path, public, n=5, cutoff=0.5)
            hint = f" (close names: {', '.join(close)})" if close else ""
            raise ArchitectureError(f"module {module_name!r} has no attribute {attribute_path!r}{hint}.")
        target = getattr(target, part)
    if not callable(target):
        raise ArchitectureError(
            f"{module_name}:{attribute_path} is a {type(target).__name__}, not a function or class; "
            "point --arch at something that builds the model."
        )
    return target


def _describe(kwargs: dict[str, Any]) -> str:
    if not kwargs:
        return "no arguments"
    return ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
