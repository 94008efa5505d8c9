"""Sphinx configuration of the numpyro-pavi documentation.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html

The example notebooks are copied from ``notebooks/`` and rendered as saved (without
outputs); ``PAVI_DOCS_EXECUTE=1`` executes them during the build instead (minutes).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import numpyro_pavi  # noqa: E402

project = "numpyro-pavi"
author = "numpyro-pavi developers"
copyright = "2026, numpyro-pavi developers"
release = numpyro_pavi.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
# the pages quote the repository's files by path (``benchmarks/RESULTS.md``) as text
suppress_warnings = ["myst.xref_missing"]

nb_execution_mode = "force" if os.environ.get("PAVI_DOCS_EXECUTE") == "1" else "off"
nb_execution_timeout = 900

autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = False
napoleon_numpy_docstring = False

html_theme = "alabaster"
html_title = f"numpyro-pavi {release}"
html_static_path: list[str] = []


def _copy_notebooks() -> None:
    """The notebooks live in ``notebooks/`` (built by ``notebooks/_build.py``); Sphinx reads
    sources below ``docs/`` only, so a copy goes to ``docs/notebooks/`` (not committed)."""
    target = HERE / "notebooks"
    target.mkdir(exist_ok=True)
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        shutil.copyfile(nb, target / nb.name)


_copy_notebooks()
