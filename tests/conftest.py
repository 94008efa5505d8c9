"""Fixtures shared by the test files.

Fits stay in their own files as module-scoped fixtures: ``pytest-xdist --dist loadfile``
runs each file in one worker, so a file's fits compile once there and would not be shared
across files anyway.
"""

import os
import subprocess
import sys

import jax
import pytest

#: XLA's older CPU loop emitters: the quick tier is compile-bound, and they compile the
#: guide's programs about 30% faster (epil: compiling the step 8.4 -> 6.0 s, which then runs
#: 12% slower; the guide's set-up programs use them anyway). Only in the README's test
#: command (pyproject's ``-m 'not slow'``): the slow tier and any other selection keep XLA's
#: defaults, what users run; so does any run with ``PAVI_TEST_XLA_DEFAULTS=1``.
_QUICK_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"


def _jaxlib_accepts(flags: str) -> bool:
    # an XLA_FLAGS entry this jaxlib does not know aborts the process: try it in a child
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    code = "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"
    try:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def pytest_configure(config):
    flags = os.environ.get("XLA_FLAGS", "")
    quick = " ".join((config.getoption("markexpr") or "").split()) == "not slow"
    if not quick or os.environ.get("PAVI_TEST_XLA_DEFAULTS") == "1" or "xla_cpu_use_fusion_emitters" in flags:
        return  # xdist workers inherit the controller's XLA_FLAGS
    candidate = f"{flags} {_QUICK_XLA_FLAG}".strip()
    if _jaxlib_accepts(candidate):
        os.environ["XLA_FLAGS"] = candidate


@pytest.fixture
def x64():
    """Run the test in float64 (exact derivatives against finite differences)."""
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
