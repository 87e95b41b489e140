"""Entropy-guided pruning (EGP, NEPENTHE, EASIER): ``from egp_export.prune import prune, load_pruned, PruneResult``.

The names load on first access (``egp_export.prune.api``), so importing the
package loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_PUBLIC = ("PruneResult", "load_pruned", "prune")

if TYPE_CHECKING:
    from egp_export.prune.api import PruneResult, load_pruned, prune


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module("egp_export.prune.api"), name)
    raise AttributeError(f"module 'egp_export.prune' has no attribute {name!r}")


__all__ = ["PruneResult", "load_pruned", "prune"]
