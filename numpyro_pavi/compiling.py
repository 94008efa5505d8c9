"""Compiling the guide's programs.

The one-shot ones (:func:`run_once`: the init strategy's values, the Laplace probe, the
parameters' initial values and the draw of the guide's first, eager call: one program
each) run once per guide, so on small data their compilation, not their run, is what a
user waits for. Below :data:`SMALL_DATA` they are compiled with XLA's backend optimizations
off and its older CPU loop emitters (results equal to round-off, a slower run), above it as
usual; either way the arrays they close over are their inputs (:func:`hoisted`).

The repeated ones (``fit``'s step, the posterior programs) take the model's data as inputs
above :data:`SMALL_DATA` and close over it below (:func:`as_inputs`).

The repeated and set-up programs compiled for a CPU also keep XLA from handing reductions
to YNNPACK (:func:`compiler_options`); a step the user compiles (``svi.run``,
``jax.jit(svi.update)``) can pass the same options, or set ``XLA_FLAGS``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend.core import ClosedJaxpr, jaxpr_as_fun

__all__ = [
    "HOST_VALUE_ERRORS",
    "SMALL_DATA",
    "array_leaves",
    "as_inputs",
    "compiler_options",
    "data_size",
    "hoisted",
    "jit",
    "primitives_in",
    "run_once",
    "uses_linalg",
]

#: Number of array elements above which a one-shot program's run may cost more than what
#: a cheap compilation saves (such programs compile as usual), and above which the model's
#: data are inputs of the repeated programs rather than constants (:func:`as_inputs`).
SMALL_DATA = 1_000_000

_CHEAP = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
#: XLA's older CPU loop emitters: they compile a one-shot program about twice as fast (on
#: epil, svi.init's four programs 4.1 -> 2.1 s), where its run does not matter. A jaxlib that
#: does not know the option compiles without it (:func:`_cheap_options`).
_OLDER_EMITTERS = {"xla_cpu_use_fusion_emitters": False}


#: Which of XLA's CPU operations go to YNNPACK kernels: matrix products only. From jaxlib
#: 0.10.2 XLA also hands it every reduction together with the elementwise work feeding it
#: (``__ynn_fusion`` kernels), which runs 3-35x slower than XLA's own loops on this 2-core
#: CPU (a sum over 26,698 elements of a chain of products and quotients: 1.25 ms against
#: 35 us; jax-ml/jax#37465). The guide's steps are full of such sums (its gradients with
#: respect to the globals, over every element of a plate), NumPyro's mean-field ones much
#: less: on a crossed table of 2.77e6 rows the default guide's step took 5.5 ms with them
#: and 1.85 ms without, AutoNormal's 1.1-1.2 ms either way (benchmarks/RESULTS.md, section 28).
_YNN_PRODUCTS_ONLY = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def _accepted(options: dict) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=options)
    except Exception:  # noqa: BLE001 - "No such compile option" on jaxlibs without it
        return False
    return True


def compiler_options() -> dict:
    """XLA options for the programs the package compiles: on a CPU backend whose jaxlib
    knows the option, reductions stay out of YNNPACK (:data:`_YNN_PRODUCTS_ONLY`); ``{}``
    elsewhere, and where ``XLA_FLAGS`` already sets ``xla_cpu_experimental_ynn_fusion_type``
    (the user's choice stands). The same results to round-off (a sum's order).

    Pass them where you compile a step yourself::

        step = jax.jit(svi.update, compiler_options=numpyro_pavi.compiling.compiler_options())

    or, for every program of a process (``svi.run`` included), start it with
    ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``.
    """
    return dict(_compiler_options())  # a copy: a caller's edit stays out of every later program


def jit(fun: Callable, **kwargs: Any) -> Callable:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`: how the package compiles its
    repeated programs (``fit``'s step, the posterior summaries, calibration)."""
    return jax.jit(fun, compiler_options=compiler_options(), **kwargs)


@functools.cache
def _compiler_options() -> dict:
    if jax.default_backend() != "cpu" or "xla_cpu_experimental_ynn_fusion_type" in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(_YNN_PRODUCTS_ONLY) if _accepted(_YNN_PRODUCTS_ONLY) else {}


@functools.cache
def _cheap_options() -> dict:
    """:data:`_CHEAP`, with :data:`_OLDER_EMITTERS` where this jaxlib accepts them, and
    :func:`compiler_options`."""
    options = {**_CHEAP, **_OLDER_EMITTERS}
    return {**(options if _accepted(options) else _CHEAP), **compiler_options()}


def run_once(fun: Callable, *args: Any) -> Any:
    """``jax.jit(fun)(*args)``, with the arrays ``fun`` closes over (the model's data, a
    trace of it) passed to the compiled program as inputs rather than embedded as constants
    (see :func:`array_leaves`), and compiled cheaply where ``args`` and those arrays hold at
    most :data:`SMALL_DATA` elements in all.

    Where ``args`` or the closed-over values are tracers of an outer transformation
    (``jit``, ``eval_shape``, ``vmap`` over the data) it is a plain jitted call.
    """
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
        return jax.jit(fun)(*args)
    program, inputs = hoisted(fun, *args)
    leaves = jax.tree.leaves(inputs)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return program(*inputs)
    size = sum(int(np.size(x)) for x in leaves if hasattr(x, "shape"))
    options = compiler_options() if size > SMALL_DATA else _cheap_options()
    return program.lower(*inputs).compile(compiler_options=options)(*inputs)


def hoisted(fun: Callable, *args: Any) -> tuple[Callable, tuple]:
    """``(program, inputs)`` with ``program(*inputs) == fun(*args)``: ``program`` is jitted
    and takes the arrays ``fun`` closes over (its jaxpr's constants) as inputs too, so its
    compilation neither copies them nor folds what depends on them alone (see
    :func:`array_leaves`). Traces ``fun`` once."""
    closed, shape = jax.make_jaxpr(fun, return_shape=True)(*args)
    out_tree = jax.tree.structure(shape)

    @jax.jit
    def program(consts, flat):
        return jax.tree.unflatten(out_tree, jaxpr_as_fun(ClosedJaxpr(closed.jaxpr, consts))(*flat))

    return program, (list(closed.consts), jax.tree.leaves(args))


#: What tracing raises where a model reads its data's values on the host (``np.asarray(x)``,
#: ``int(x.max())`` for a plate size, ``if mask.any():``).
HOST_VALUE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerArrayConversionError,
    jax.errors.TracerIntegerConversionError,
)


def _numeric(x: Any) -> bool:
    if isinstance(x, jax.Array):
        return True
    return isinstance(x, np.ndarray) and x.dtype.kind in "biufc"


def data_size(tree: Any) -> int:
    """Number of elements in the numeric array leaves of ``tree`` (the model's arguments),
    to compare with :data:`SMALL_DATA`."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree) if _numeric(x))


def array_leaves(tree: Any) -> tuple[list, Callable[[list], Any]]:
    """The numeric array leaves of ``tree`` (the model's arguments), NumPy ones put on the
    device once, and ``arrays -> tree`` rebuilding it with new ones, every other leaf
    (sizes, flags, callables, string arrays) kept as it is.

    A compiled program that closes over arrays holds them as constants: its compilation
    copies them and XLA may evaluate whatever depends on them alone at compile time (a set
    encoder's first layer on 655,360 rows took over a second to fold). Passed as arguments
    (``jax.jit(lambda arrays: f(*rebuild(arrays)))(arrays)``) they are inputs. A model that
    reads its data's values on the host cannot take them as tracers: see :func:`as_inputs`.
    """
    leaves, treedef = jax.tree.flatten(tree)
    where = [i for i, x in enumerate(leaves) if _numeric(x)]

    def rebuild(arrays: list) -> Any:
        new = list(leaves)
        for i, x in zip(where, arrays, strict=True):
            new[i] = x
        return jax.tree.unflatten(treedef, new)

    # a NumPy argument of a jitted call is copied to the device at every call
    arrays = [jax.device_put(leaves[i]) if isinstance(leaves[i], np.ndarray) else leaves[i] for i in where]
    return arrays, rebuild


def as_inputs(
    tree: Any, check: Callable[[Callable[[list], Any], list], Any] | None = None
) -> tuple[list, Callable[[list], Any]]:
    """:func:`array_leaves` of ``tree`` where its numeric arrays hold more than
    :data:`SMALL_DATA` elements and ``check(rebuild, arrays)`` (a trace of the program that
    will take them, e.g. under ``jax.eval_shape``) runs with them as tracers; else
    ``([], lambda _: tree)``, the arrays closed over as ``svi.run`` does.

    Small data stay constants: XLA specializes the program to them (epil's step, 236 rows,
    15% faster) and they compile quickly. A model that reads its data's values on the host
    cannot take them as tracers at all.
    """
    if data_size(tree) <= SMALL_DATA:
        return [], lambda _: tree
    arrays, rebuild = array_leaves(tree)
    try:
        if check is not None:
            check(rebuild, arrays)
    except HOST_VALUE_ERRORS:
        return [], lambda _: tree
    return arrays, rebuild


#: ``jax.lax.linalg`` primitives: on a CPU, LAPACK calls (see
#: :func:`~numpyro_pavi.laplace.in_pieces` for what a batch of them can do there).
LINALG_PRIMITIVES = frozenset(
    {"cholesky", "eig", "eigh", "geqp3", "geqrf", "hessenberg", "householder_product", "lu", "ormqr", "qr",
     "schur", "svd", "triangular_solve", "tridiagonal", "tridiagonal_solve"}
)  # fmt: skip


def primitives_in(jaxpr: Any) -> set[str]:
    """Names of the primitives of a (closed) jaxpr, its sub-jaxprs included (loops,
    branches, calls)."""
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    names = set()
    for eqn in inner.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    names |= primitives_in(sub)
    return names


def uses_linalg(jaxpr: Any) -> bool:
    """Whether a (closed) jaxpr, its sub-jaxprs included, holds a :data:`LINALG_PRIMITIVES`
    operation."""
    return not LINALG_PRIMITIVES.isdisjoint(primitives_in(jaxpr))
