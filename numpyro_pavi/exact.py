"""Deprecated path of :mod:`numpyro_pavi.examples.exact` (moved with the other reference
models, simulators, exact posteriors and data loaders to :mod:`numpyro_pavi.examples`);
it re-exports that module's public names until 0.3."""

import warnings

from .examples.exact import *  # noqa: F401,F403
from .examples.exact import __all__  # noqa: F401

warnings.warn(
    "numpyro_pavi.exact moved to numpyro_pavi.examples.exact; the old path is deprecated and stops "
    "working in 0.3.",
    DeprecationWarning,
    stacklevel=2,
)
