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
#: old paths of the modules that moved to numpyro_pavi.examples (deprecation shims)
SHIMS = {"models", "glmms", "exact", "demo"}
MODULES = sorted(
    m.name.removeprefix("numpyro_pavi.")
    for m in pkgutil.walk_packages(numpyro_pavi.__path__, "numpyro_pavi.")
    if not m.name.rsplit(".", 1)[-1].startswith("_") and m.name.removeprefix("numpyro_pavi.") not in SHIMS
)
CORE = [m for m in MODULES if not m.startswith("examples")]


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


def test_core_holds_no_example_model_or_loader():
    """The core modules import nothing from the examples (models, simulators, loaders)."""
    for name in CORE:
        source = (ROOT / "numpyro_pavi" / f"{name}.py").read_text()
        assert "from .examples" not in source and "numpyro_pavi.examples import" not in source, name


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_old_example_paths_still_import_with_a_warning(name):
    import sys
    import warnings

    sys.modules.pop(f"numpyro_pavi.{name}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module(f"numpyro_pavi.{name}")
    new = importlib.import_module(f"numpyro_pavi.examples.{name}")
    assert any(issubclass(w.category, DeprecationWarning) and "examples" in str(w.message) for w in caught)
    assert all(getattr(old, n) is getattr(new, n) for n in new.__all__)


def test_no_module_calls_a_private_guide_method():
    """Other modules go through the guide's public methods (plate_inputs, check_params, ...)."""
    import re

    for path in sorted((ROOT / "numpyro_pavi").rglob("*.py")):
        if path.name == "autoguide.py":
            continue
        hits = re.findall(r"\bguide\._[a-z]\w*", path.read_text())
        assert not hits, f"{path.relative_to(ROOT)} calls {sorted(set(hits))}"


def test_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_bytes()) <= 10_000
