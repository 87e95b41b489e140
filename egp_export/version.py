"""The package version, in a module of its own: the compiler and the CLI record it without importing the package's
public facade (``egp_export/__init__.py``, which sits above every layer)."""

from __future__ import annotations

__version__ = "0.1.0"
