"""Every pass test runs seeded and single-threaded (see ``tiny_model_runtime`` in tests/conftest.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _tiny_model_runtime(tiny_model_runtime):
    yield
