"""The documentation's contracts that need no Sphinx run (CI builds the site itself with
warnings as errors): every public name has a docstring, every module is in the API
reference, and the README stays a front page."""

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest

import numpyro_pavi

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.iter_modules(numpyro_pavi.__path__) if not m.name.startswith("_"))


@pytest.mark.parametrize("name", MODULES)
def test_public_names_have_docstrings(name):
    module = importlib.import_module(f"numpyro_pavi.{name}")
    assert inspect.getdoc(module), f"numpyro_pavi.{name} has no module docstring"
    public = getattr(module, "__all__", None)
    if public is None:
        public = [
            n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
        ]
    objects = {n: getattr(module, n) for n in public}
    missing = [n for n, v in objects.items() if callable(v) and not inspect.getdoc(v)]
    assert not missing, f"numpyro_pavi.{name}: no docstring for {missing}"


def test_every_module_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    absent = [m for m in MODULES if f".. automodule:: numpyro_pavi.{m}\n" not in api]
    assert not absent, f"add {absent} to docs/api.md"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= 10_000
