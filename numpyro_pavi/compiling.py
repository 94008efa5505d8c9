"""Compiling the guide's one-shot programs: the set-up probes, the flows' initial values and
the draw of the guide's first (eager) call.

Each runs once per guide, so on small data its compilation, not its run, is what a user waits
for: ``svi.init`` on epil spent 2.8 s compiling its first draw, 1.1 s the flows'
initializers, 0.9 s the Laplace probe. Below :data:`SMALL_DATA` such programs are compiled
with XLA's backend optimizations off (results equal to round-off, a slower run), above it
as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["SMALL_DATA", "array_leaves", "run_once"]

#: Number of array elements (arguments and data together) above which a one-shot program's
#: run may cost more than what a cheap compilation saves; such programs compile as usual.
SMALL_DATA = 1_000_000

_CHEAP = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fun: Callable, *args: Any, data: Any = ()) -> Any:
    """``jax.jit(fun)(*args)``, compiled cheaply where ``args`` and ``data`` (the model's
    arguments ``fun`` closes over) hold at most :data:`SMALL_DATA` elements in all.

    Under an outer trace (``jax.eval_shape``, ``jit``) it is a plain ``jax.jit`` call.
    """
    leaves = jax.tree.leaves((args, data))
    jitted = jax.jit(fun)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return jitted(*args)
    if sum(int(np.size(x)) for x in leaves if hasattr(x, "shape")) > SMALL_DATA:
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options=_CHEAP)(*args)


def array_leaves(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """The array leaves of ``tree`` (the model's arguments) and ``arrays -> tree`` rebuilding
    it with new ones, every other leaf (sizes, flags, callables) kept as it is.

    A compiled program that closes over arrays holds them as constants: its compilation
    copies them and XLA may evaluate whatever depends on them alone at compile time (a set
    encoder's first layer on 655,360 rows took over a second to fold). Passed as arguments
    (``jax.jit(lambda arrays: f(*rebuild(arrays)))(arrays)``) they are inputs.
    """
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

    def rebuild(arrays: list) -> Any:
        new = list(leaves)
        for i, x in zip(where, arrays, strict=True):
            new[i] = x
        return jax.tree.unflatten(treedef, new)

    return [leaves[i] for i in where], rebuild
