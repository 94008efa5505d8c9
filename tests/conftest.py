"""Fixtures shared by the test files.

Fits stay in their own files as module-scoped fixtures: ``pytest-xdist --dist loadfile``
runs each file in one worker, so a file's fits compile once there and would not be shared
across files anyway.
"""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test in float64 (exact derivatives against finite differences)."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
