"""Execute every example notebook (notebooks/*.ipynb) and fail on any cell error.

Each notebook runs at its default (small) size in a fresh ``python3`` kernel started from
*this* interpreter, with ``notebooks/`` as working directory. The kernels share a JAX
persistent compilation cache (a temporary directory for this test session), so the
notebooks after the first one do not recompile the many small eager operations they have in
common.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# slow tier: execute the notebooks end to end
pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory):
    """A ``python3`` kernelspec running ``sys.executable``, and the kernels' environment.

    The spec is written to a temporary directory put first on ``JUPYTER_PATH``, so the
    kernel runs in the interpreter running the tests whatever kernelspecs are (or are not)
    installed on the machine.
    """
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (numpyro-pavi tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = {
        "JUPYTER_PATH": os.pathsep.join([str(jupyter_dir), os.environ.get("JUPYTER_PATH", "")]).rstrip(os.pathsep),
        "MPLBACKEND": "Agg",
        "JAX_PLATFORMS": "cpu",
        # numpyro_pavi importable even without an install of the package
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silences the debugger's frozen-modules warning
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield env


def test_notebooks_found():
    assert len(NOTEBOOKS) >= 5, f"expected the example notebooks in {NOTEBOOKS_DIR}"


def test_notebooks_are_built_from_build_script_without_outputs():
    """The committed notebooks are exactly what notebooks/_build.py writes: no outputs, no drift."""
    result = subprocess.run(
        [sys.executable, str(NOTEBOOKS_DIR / "_build.py"), "--check"], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert code and "parameters" in code[0].metadata.get("tags", []), f"{path.name}: no parameters cell first"
        assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    for module in nb.metadata.get("numpyro_pavi", {}).get("requires", []):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{path.name} needs the '{module}' package (pip install {module})")
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    # raises CellExecutionError (with the cell's source and traceback) on the first failing cell
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
