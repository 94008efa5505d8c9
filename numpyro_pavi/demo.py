"""``python -m numpyro_pavi.demo``: the demo of :mod:`numpyro_pavi.examples.demo` (AutoPAVI
and AutoNormal on a synthetic random-effects data set, beside the exact posterior).

Importing names from this module is deprecated (they moved to
:mod:`numpyro_pavi.examples.demo`, and this path stops re-exporting them in 0.3); running
it stays the demo's command.
"""

import sys
import warnings

from .examples import demo as _demo
from .examples.demo import *  # noqa: F401,F403
from .examples.demo import __all__  # noqa: F401

if __name__ == "__main__":
    sys.exit(_demo.main())

warnings.warn(
    "numpyro_pavi.demo moved to numpyro_pavi.examples.demo; importing it from the old path is "
    "deprecated and stops working in 0.3 (`python -m numpyro_pavi.demo` keeps running the demo).",
    DeprecationWarning,
    stacklevel=2,
)
