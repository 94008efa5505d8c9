"""Element-wise Laplace bases: what the likelihood says about each plate element.

A local latent ``z_n`` (one element of a plate) usually has a posterior, given the values
of the other sites, that a few Newton steps on the model's log joint locate well: its mode
``m_n`` and the curvature there, a precision ``P_n``. Both come from the model itself by
autodiff, whatever the likelihood (covariates, gathers such as ``a[group]``, crossed
designs, non-Gaussian families), and they add over observations, so set size and
subsampled observations come out right. With ``AutoPAVI(laplace=True)`` every local site
is sampled as ``x = m + L^{-T} u`` (``P = L L^T``), where ``u`` is the output of the site's
shared flow, which starts as a standard normal and learns what the Gaussian misses.

For a plate of conditionally independent elements one backward pass gives the gradient of
every element at once, and ``d`` Hessian-vector products give every element's ``d x d``
curvature block (``d`` is an element's size, small here).

The Newton iterations (:func:`newton_iterate`: trust-region steps, stopped once every
element has converged) start at the site's prior mean given the sampled parents (posterior
draws of a site whose log joint is quadratic, where one step from there lands on the mode:
at :func:`draw_start`) and are held constant (``stop_gradient``). The base is then given the derivative of the mode it
approximates (implicit function theorem) and the curvature at itself
(:func:`newton_base`), so the gradient is that of the map actually sampled; an element
whose iterations did not converge sits on its prior location instead. Every element
reports how its problem ended (:class:`NewtonReport`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density

from .data import site_mask

__all__ = [
    "NEWTON_STEPS",
    "LaplaceWarning",
    "NewtonReport",
    "at_least",
    "canonical_values",
    "constrain_group",
    "draw_start",
    "finite_cotangent",
    "flat_unscored",
    "grad_and_blocks",
    "group_log_joint",
    "log_joint",
    "newton_base",
    "higher_modes",
    "in_pieces",
    "newton_iterate",
    "one_step_base",
    "precision",
    "precision_chol",
    "reference_trace",
    "reference_value",
    "unscored_group_coordinates",
]

class LaplaceWarning(UserWarning):
    """A site's Laplace base did not converge for many of its elements."""


@jax.custom_vjp
def finite_cotangent(x: jax.Array) -> jax.Array:
    """The identity, whose gradient drops the non-finite entries of the incoming cotangent.

    A Laplace base differentiates the model's log likelihood three times (the mode's
    derivative and the precision's, through the parents). Some of NumPyro's log densities
    are right in value and slope but not beyond: ``TruncatedNormal``'s third derivative is NaN
    in float32 once the location is 8 scales past the truncation point (its log normalizer's
    tail branch), which a group's mode given a wide early draw of its parents can reach, and
    one NaN turned a whole SVI step's gradient, and every parameter after it, into NaN (the
    likelihood matrix's truncated normal with a random slope, step 56; 2 of 2,000 steps).
    Applied to a base's inputs (the parents' sampled values), it removes that element's
    contribution through the base for that step only; the rest of the gradient is kept.
    """
    return x


def _finite_cotangent_fwd(x):
    return x, None


def _finite_cotangent_bwd(_, g):
    return (jnp.where(jnp.isfinite(g), g, jnp.zeros_like(g)),)


finite_cotangent.defvjp(_finite_cotangent_fwd, _finite_cotangent_bwd)


#: Most Newton iterations before the last, differentiated step; they stop earlier once
#: every element has converged (one for a Gaussian likelihood). Heavy-tailed likelihoods
#: started in the tails (StudentT(3), Cauchy) needed 10-20 in the likelihood matrix
#: (``benchmarks/likelihoods.py``).
NEWTON_STEPS = 24

#: Smallest precision an element's base gets (unconstrained units): a flat or non-concave log
#: joint then gives an sd of at most 10 instead of an infinite or negative variance.
MIN_PRECISION = 1e-2
#: Smallest precision the Newton steps of a concave element use: a wide one (an sd above 10,
#: a wide prior and little data) is stepped with its own curvature, not the lifted one,
#: whose steps fell short of its mode while counting it converged (a prior N(-40, 100)
#: from -80: a last iterate of -71); the floor only keeps a near-flat one's steps finite.
MIN_STEP_PRECISION = 1e-6
#: Largest last (differentiated) step, in sds ``1/sqrt(P)`` at the last iterate.
MAX_STEP_SDS = 10.0
#: Trust radius of the Newton iterations, in sds of the curvature at the start: after a
#: rejected first step (which is the full Newton step, up to the largest radius: a Gaussian
#: likelihood's group 50-90 sds from its start is then solved at once), smallest and
#: largest. Doubling from 4, eight iterations reach a mode about 1,000 start sds away.
INITIAL_RADIUS_SDS = 4.0
MIN_RADIUS_SDS = 1e-3
MAX_RADIUS_SDS = 512.0
#: Newton decrement (remaining step in posterior sds) under which an element counts as
#: converged (see :class:`NewtonReport`), and the one the iterations stop at: Newton
#: converges quadratically, so the step after 0.05 is usually below 1e-3, where the mode's
#: derivative (used for the base's) is off by about as much.
DECREMENT_TOL = 0.05
STOP_TOL = 1e-3
#: Posterior draws (no derivative) stop at this decrement instead (``DECREMENT_TOL``, what
#: counts as converged), then take the Newton step at the last iterate, whose gradient and
#: curvature the iterations already hold: Newton converges quadratically, so the base's
#: location lies about its square (0.0025 sds) from the mode; its width is the curvature at
#: that last iterate (draws agree with training's tolerance to 0.02 sd in
#: tests/test_laplace.py). One or two evaluations of the model fewer per draw, started at
#: the guide's center (``GuidePlan.warm_start``): crossed Bernoulli draws 29% faster.
DRAW_TOL = DECREMENT_TOL
#: Where a converged element looks for a higher mode (:func:`higher_modes`), in sds of
#: its curvature at the mode, on both sides of each standardized axis.
PROBE_RADII_SDS = (1.0, 2.0, 4.0)
#: Gauss-Legendre rule that integrates the slope between two modes (:func:`_rise`)
_GAUSS_LEGENDRE = tuple(tuple(float(v) for v in a) for a in np.polynomial.legendre.leggauss(8))


def reference_value(fn) -> jax.Array:
    """A finite point in the support of ``fn``: its mean where finite, else the image of
    unconstrained zero (distributions with no mean, e.g. Cauchy, or improper ones)."""
    fallback = None
    try:
        transform = biject_to(fn.support)
        shape = transform.inverse_shape(fn.shape())
        fallback = transform(jnp.zeros(shape))
    except Exception:  # noqa: BLE001 - a support without a bijection: only the mean is left
        fallback = None
    try:
        mean = jnp.broadcast_to(fn.mean, fn.shape())
    except Exception:  # noqa: BLE001 - NotImplementedError and friends: no mean to use
        return fallback
    if fallback is None:
        return mean
    return jnp.where(jnp.isfinite(mean), mean, fallback)


def _at_references(model: Callable, values: Mapping) -> Callable:
    """``model`` with ``values`` substituted and every other latent at its reference value."""

    def value(msg):
        if msg["name"] in values:
            return values[msg["name"]]
        if msg["type"] == "sample" and not msg["is_observed"]:
            return reference_value(msg["fn"])
        return None

    return handlers.substitute(handlers.seed(model, 0), substitute_fn=value)


@contextlib.contextmanager
def _quiet():
    with handlers.block(), warnings.catch_warnings():
        # full-plate indices in a subsampled plate are intended (posterior over full plates)
        warnings.filterwarnings("ignore", message="subsample_size does not match")
        yield


def reference_trace(model: Callable, values: Mapping, args: tuple, kwargs: dict) -> dict:
    """A blocked trace of the model with ``values`` substituted and every other latent site
    at :func:`reference_value` of its prior given the values before it."""
    with _quiet():
        return handlers.trace(_at_references(model, values)).get_trace(*args, **kwargs)


def draw_start(model: Callable, group, plates: Mapping, args: tuple, kwargs: dict) -> jax.Array:
    """The start ``(*grid, sum of d)`` of posterior draws' one Newton step for a site whose
    log joint is quadratic (``group``: the site and its later siblings, as in
    :func:`~numpyro_pavi.sampling.laplace_base`): each at its reference value with every
    latent of the model at its own, only the plates' ``indices`` given.

    It does not depend on the draw, so the likelihood's gradient and curvature there do not
    either where the likelihood reads no other sampled site (a Gaussian random effect with a
    fixed noise scale): XLA computes them once for all the draws of a ``lax.map`` (loop
    invariants) instead of once per draw. Training keeps the prior location given the
    sampled parents, nearer the mode (less round-off); one step from either is the mode up
    to float32 round-off, which the setup probe checks from both
    (``GuidePlan.reference_start``: the sites whose draws start here).
    """
    return jax.lax.stop_gradient(canonical_values(reference_trace(model, dict(plates), args, kwargs), group))


def canonical_values(trace: Mapping, group) -> jax.Array:
    """The values of the sites ``group`` in ``trace``, unconstrained and in canonical layout,
    concatenated: ``(*grid, sum of d)``, a Newton problem's start."""
    return jnp.concatenate([g.to_canonical(biject_to(g.support).inv(trace[g.name]["value"])) for g in group], -1)


def log_joint(
    model: Callable, values: Mapping, args: tuple, kwargs: dict, per_element_of: str | None = None
) -> jax.Array:
    """The model's log joint (scaled and masked as in training) with ``values`` (site or plate
    name -> value) substituted and every other latent site at :func:`reference_value` of its
    prior given the values before it.

    With ``per_element_of=site``, the joint is divided by that site's own scale (``N / B``
    of its subsampled plates): the terms of one element are then counted once, as in its
    posterior, while observations subsampled further keep their extra factor.
    """

    with _quiet():
        lp, trace = log_density(_at_references(model, values), args, kwargs, {})
    if per_element_of is not None:
        scale = trace[per_element_of]["scale"]
        lp = lp if scale is None else lp / scale
    return lp


def unscored_coordinates(site, trace_site: dict | None) -> jax.Array | None:
    """``(*grid, d)``: True at the unconstrained coordinates of ``site``'s cells that the
    model does not score (``handlers.mask``, ``fn.mask``, an ``obs_mask`` imputation site at
    its observed cells), or None where it scores them all (or the mask does not line up)."""
    mask = site_mask(trace_site)
    if mask is None:
        return None
    n_batch = len(site.batch_shape)
    batch = jnp.shape(trace_site["value"])[:n_batch]
    try:
        mask = jnp.broadcast_to(mask, batch)
    except ValueError:
        return None
    out = jnp.reshape(~mask, batch + (1,) * len(site.unconstrained_event_shape))
    return site.to_canonical(jnp.broadcast_to(out, batch + tuple(site.unconstrained_event_shape)))


def constrain_group(group, z: jax.Array) -> tuple[dict, jax.Array]:
    """A Newton group's site-layout values ``{name: value}`` from its canonical
    unconstrained ``z (*grid, sum of d)``, and their summed ``log|det|``."""
    cuts = np.cumsum([g.dim for g in group])[:-1].tolist()
    vals, logdet = {}, 0.0
    for g, part in zip(group, jnp.split(z, cuts, axis=-1) if cuts else [z]):
        vals[g.name], ld = g.constrain(part)
        logdet = logdet + jnp.sum(ld)
    return vals, logdet


def group_log_joint(
    model: Callable, group, args: tuple, kwargs: dict, trace: Mapping | None = None, flat: Collection[str] | None = None
) -> Callable:
    """``logp(z, known)`` of a Newton group: a site and its later siblings of the same
    plates (``z``: their canonical unconstrained values concatenated, ``(*grid, sum of
    d)``), the rest of the joint at ``known`` (site or plate name -> value) and reference
    values (:func:`log_joint`, per element of the group's first site).

    A sibling's cells the model does not score (read from ``trace``, a trace of the model on
    these elements) may add nothing to the joint (``obs_mask``'s imputed cells at the
    observed ones): their coordinates are then flat directions of it, no element with one
    converges, and each would fall back to its prior location. The siblings in ``flat``
    (``GuidePlan.flat_unscored``: the setup probe found their unscored coordinates flat;
    None: every sibling, as under tracing) get a unit quadratic there instead, which leaves
    the site's curvature, its Schur complement, unchanged: nothing the model scores reads
    them. A masked sibling that a scored term still reads (``d.mask(False)`` plus a
    ``factor``) is not flat, and must not get it: the site's base would come out too tight.
    """
    out = unscored_group_coordinates(group, trace, flat)

    def logp(z, known):
        vals, logdet = constrain_group(group, z)
        extra = 0.0 if out is None else -0.5 * jnp.sum(jnp.where(out, z, 0.0) ** 2)
        return log_joint(model, {**known, **vals}, args, kwargs, per_element_of=group[0].name) + logdet + extra

    return logp


def unscored_group_coordinates(group, trace: Mapping | None, flat) -> jax.Array | None:
    """``(*grid, sum of d)``: True at the unscored coordinates of the group's later siblings
    that ``flat`` names (a collection of names, or ``{name: bool}``, possibly traced; None:
    all), or None where there are none."""
    if trace is None:
        return None
    outs = [None]
    for g in group[1:]:
        o = None if flat is not None and g.name not in flat else unscored_coordinates(g, trace.get(g.name))
        if o is not None and isinstance(flat, Mapping):
            o = o & jnp.asarray(flat[g.name], bool)
        outs.append(o)
    if all(o is None for o in outs):
        return None
    grid = next(o for o in outs if o is not None).shape[:-1]
    return jnp.concatenate([jnp.zeros(grid + (g.dim,), bool) if o is None else o for g, o in zip(group, outs)], -1)


def flat_unscored(model: Callable, group, args: tuple, kwargs: dict, trace: Mapping, known: Mapping, z: jax.Array) -> dict:
    """``{later sibling: flag}`` of a Newton group, for each sibling with cells the model
    does not score (see :func:`group_log_joint`): True where the model's log joint neither
    slopes nor curves along any of those coordinates at ``z`` nor one unit away (nothing
    the model scores reads them: ``obs_mask``'s imputed cells), False where it does (a
    ``factor`` reads a ``d.mask(False)`` site). The transforms' log-dets are left out: a
    positive sibling's is linear in its unconstrained value (``exp``), flat cells or not.
    ``known``: the rest of the joint, as for the log joint's ``logp``; ``z`` ``(*grid, sum
    of d)``. Traceable: flags are arrays. All or nothing per sibling, on exact zeros: one
    read cell (or a non-finite derivative) leaves the sibling without the quadratic at
    every cell, the way that cannot bias a base that was exact without it."""
    masks = {g.name: unscored_coordinates(g, trace.get(g.name)) for g in group[1:]}
    masks = {name: o for name, o in masks.items() if o is not None}
    if not masks:
        return {}

    def model_only(v):
        return log_joint(model, {**known, **constrain_group(group, v)[0]}, args, kwargs, per_element_of=group[0].name)

    offsets = dict(zip([g.name for g in group], np.cumsum([0] + [g.dim for g in group])[:-1].tolist()))
    dims = {g.name: g.dim for g in group}
    flags = {name: jnp.array(True) for name in masks}
    for point in (z, z + 1.0):
        grad, blocks = grad_and_blocks(model_only, point)
        for name, o in masks.items():
            cut = slice(offsets[name], offsets[name] + dims[name])
            still = (grad[..., cut] == 0) & jnp.all(blocks[..., cut, :] == 0, -1)
            flags[name] = flags[name] & jnp.all(still | ~o)
    return flags


#: Largest element size ``d`` whose ``d`` Hessian-vector products in :func:`grad_and_blocks`
#: run as ``d`` passes; larger elements take vectorized passes of up to
#: ``COLUMNS_PER_PASS`` columns (compiled once, not ``d`` times), one after the other: the
#: intermediates hold that many tangents of the model at once, not ``d`` (68 on the HCP-like
#: model, whose full-plate vertex arrays hold 1e8 numbers).
LOOPED_COLUMNS_UP_TO = 2
COLUMNS_PER_PASS = 8


def grad_and_blocks(logp: Callable, z: jax.Array):
    """Gradient ``(*grid, d)`` and per-element Hessian blocks ``(*grid, d, d)`` of a log
    density that is a sum of independent per-element terms."""
    # one linearization of the gradient (one pass through the model) serves all d columns
    g, hvp = jax.linearize(jax.grad(logp), z)
    d = z.shape[-1]
    if d <= LOOPED_COLUMNS_UP_TO:
        cols = [hvp(jnp.broadcast_to(jnp.eye(d)[j], z.shape)) for j in range(d)]
        return g, jnp.stack(cols, -1)
    basis = jnp.broadcast_to(jnp.eye(d)[:, None], (d, math.prod(z.shape[:-1]), d)).reshape((d, *z.shape))
    cols = jax.vmap(hvp)(basis) if d <= COLUMNS_PER_PASS else jax.lax.map(hvp, basis, batch_size=COLUMNS_PER_PASS)
    return g, jnp.moveaxis(cols, 0, -1)


def precision(h: jax.Array) -> jax.Array:
    """The precision ``-h``, symmetrized, of Hessian blocks ``h (*grid, d, d)`` (a Hessian
    assembled from ``d`` Hessian-vector products is symmetric up to round-off only)."""
    return -0.5 * (h + jnp.swapaxes(h, -1, -2))


def precision_chol(h: jax.Array, with_concave: bool = False, for_steps: bool = False):
    """Cholesky factor of :func:`precision` ``(h)``, lifted to at least ``MIN_PRECISION``.

    The lift is a multiple of the identity chosen from the smallest eigenvalue under
    ``stop_gradient``: eigenvector gradients divide by eigenvalue gaps, which vanish for
    repeated eigenvalues, while the Cholesky factor's gradients stay finite. With
    ``with_concave``, also whether ``h`` was negative definite (``(*grid)`` booleans). With
    ``for_steps`` (the Newton iterations' metric), a concave element is lifted only to
    :data:`MIN_STEP_PRECISION`: its steps, decrement and mode derivative then follow its own
    curvature (:func:`lift_chol` gives the base's width from it).
    """
    p = precision(h)
    low, lift, step_lift = _lifts(p)
    chol = _lifted_cholesky(p, step_lift if for_steps else lift)
    return (chol, low > 0) if with_concave else chol


def _lifts(p: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(low, lift, step_lift)`` of precisions ``p (*grid, d, d)``: ``min(smallest
    eigenvalue, MIN_PRECISION)`` (``> 0``: concave), the multiple of the identity that lifts
    ``p`` to ``MIN_PRECISION`` (a base's width), and the one the Newton steps take (a
    concave element floored at :data:`MIN_STEP_PRECISION` only)."""
    low = _smallest_eigenvalue_below(jax.lax.stop_gradient(p), jnp.full(p.shape[:-2], MIN_PRECISION, p.dtype))
    lift = jnp.maximum(MIN_PRECISION - low, 0.0)
    return low, lift, jnp.where(low > 0, jnp.maximum(MIN_STEP_PRECISION - low, 0.0), lift)


def _lifted_cholesky(p: jax.Array, lift: jax.Array) -> jax.Array:
    """Cholesky factor of ``p + lift I``."""
    if p.shape[-1] == 1:
        # a lifted scalar is the floor itself: a constant, whose gradient is 0 (not p's)
        p = jnp.where(lift[..., None, None] > 0, jax.lax.stop_gradient(p), p)
    return _cholesky(p + lift[..., None, None] * jnp.eye(p.shape[-1], dtype=p.dtype))


def lift_chol(chol: jax.Array) -> jax.Array:
    """The base's width from a Newton iteration's factor ``chol (*grid, d, d)``
    (:func:`precision_chol` with ``for_steps``): its precision lifted to ``MIN_PRECISION``.
    """
    return precision_chol(-(chol @ jnp.swapaxes(chol, -1, -2)))


#: Most floating-point operations (jaxlib's estimate, ``d^3`` times a constant of a few) one
#: batched LAPACK call on a CPU may get (:func:`in_pieces`).
LAPACK_INLINE_FLOPS = 20_000


def in_pieces(fn: Callable, a: jax.Array, *rest: jax.Array):
    """``fn(a, *rest)`` for ``a (*grid, d, d)`` and ``rest (*grid, ...)``, a batched LAPACK
    routine (an eigensolver, a Cholesky factorization, a triangular solve), applied to pieces
    of the grid small enough that jaxlib runs each call on the thread that makes it.

    Above about 2e5 flops, jaxlib's CPU kernels split a batch across XLA's intra-op thread
    pool and wait for the pieces without running any: once as many such calls run at once as
    the pool has threads, none ever finishes. On this 2-core machine the setup probe of the
    HCP-like model (68-dimensional elements, two independent Newton problems in one program)
    hung that way, forever and at no CPU. Pieces of ``LAPACK_INLINE_FLOPS / d^3`` elements
    go one after the other (``lax.map``); a smaller grid is one call, as before. A
    right-hand side of ``K > d`` columns (``rest`` of shape ``(*grid, d, K)``) counts
    ``d^2 K`` per element, as jaxlib does. Only where the default backend is a CPU (decided
    when traced): GPU solvers batch without that pool, and pieces would only serialize them.
    Under ``vmap`` (``Trace_ELBO(num_particles > 1)`` vectorizes its particles) each piece
    is batched again, by the mapped size: see the guide's docs.
    """
    d = a.shape[-1]
    grid = a.shape[:-2]
    for x in rest:
        if x.shape[: len(grid)] != grid:
            raise ValueError(f"in_pieces: an operand's leading shape {x.shape[: len(grid)]} is not the grid {grid}")
    width = max([d] + [math.prod(x.shape[len(grid) + 1 :]) for x in rest])
    n, k = math.prod(grid), max(1, LAPACK_INLINE_FLOPS // (d * d * width))
    if n <= k or jax.default_backend() != "cpu":
        return fn(a, *rest)
    flat = [jnp.reshape(x, (n, *x.shape[len(grid) :])) for x in (a, *rest)]
    out = jax.lax.map(lambda xs: fn(*xs), flat, batch_size=k)
    return jax.tree.map(lambda y: jnp.reshape(y, (*grid, *y.shape[1:])), out)


# Scalar and 2 x 2 elements (random intercepts; an intercept with a slope) take closed forms:
# LAPACK's batched eigensolver and Cholesky run one small call per element on a CPU, which
# made them a large share of a step on small models.
def _smallest_eigenvalue(p: jax.Array) -> jax.Array:
    """Smallest eigenvalue of symmetric ``p (*grid, d, d)``."""
    d = p.shape[-1]
    if d == 1:
        return p[..., 0, 0]
    if d == 2:
        a, b, c = p[..., 0, 0], p[..., 1, 0], p[..., 1, 1]
        # the floor keeps the derivative finite at repeated eigenvalues (an isotropic block)
        return 0.5 * (a + c) - jnp.sqrt(jnp.maximum(0.25 * (a - c) ** 2 + b**2, 1e-30))
    return in_pieces(lambda x: jnp.linalg.eigvalsh(x)[..., 0], p)


def _smallest_eigenvalue_below(p: jax.Array, level: jax.Array) -> jax.Array:
    """``min(smallest eigenvalue of p, level)`` for symmetric ``p (*grid, d, d)`` and
    ``level (*grid)``: what a lift of ``p`` to at least ``level`` needs, and whether ``p`` is
    positive definite where ``level > 0``.

    For ``d > 2`` a Cholesky factorization of ``p - level I`` first tells which elements
    are above ``level`` (it succeeds); the eigensolver, several times a Cholesky's cost,
    then runs only when some element is not: the usual case, a log-concave likelihood
    under its prior, needs none. On the 68-coordinate elements of ``benchmarks/neuro.py``
    the eigensolver was half of a training step.
    """
    d = p.shape[-1]
    if d <= 2:
        return jnp.minimum(_smallest_eigenvalue(p), level)
    above = jnp.all(jnp.isfinite(_cholesky(p - level[..., None, None] * jnp.eye(d, dtype=p.dtype))), (-2, -1))

    def exact(_):
        return jnp.where(above, level, jnp.minimum(_smallest_eigenvalue(p), level))

    return jax.lax.cond(jnp.all(above), lambda _: level, exact, None)


def _smallest_eigenvalue_of_floor(f: jax.Array) -> jax.Array:
    """Smallest eigenvalue of a prior precision ``f (*grid, d, d)``: its smallest diagonal
    entry where every block is diagonal (independent coordinates, the usual prior), else
    the eigensolver's."""
    off = f * (1.0 - jnp.eye(f.shape[-1], dtype=f.dtype))
    diagonal = jnp.min(jnp.diagonal(f, axis1=-2, axis2=-1), -1)
    return jax.lax.cond(jnp.all(off == 0), lambda _: diagonal, lambda _: _smallest_eigenvalue(f), None)


def _cholesky(p: jax.Array) -> jax.Array:
    """Lower Cholesky factor of positive definite ``p (*grid, d, d)``."""
    d = p.shape[-1]
    if d == 1:
        return jnp.sqrt(p)
    if d == 2:
        l11 = jnp.sqrt(p[..., 0, 0])
        l21 = p[..., 1, 0] / l11
        l22 = jnp.sqrt(jnp.maximum(p[..., 1, 1] - l21**2, 0.0))
        zero = jnp.zeros_like(l11)
        return jnp.stack([jnp.stack([l11, zero], -1), jnp.stack([l21, l22], -1)], -2)
    return in_pieces(jnp.linalg.cholesky, p)


def at_least(chol: jax.Array, floor: jax.Array) -> jax.Array:
    """The Cholesky factor of ``P + max(0, lmin(F) - lmin(P)) I``, where ``P = L L^T``
    (``chol (*grid, d, d)``) and ``F`` is ``floor (*grid, d, d)``: a precision whose every
    direction is at least as tight as ``F``'s loosest. ``chol`` itself where no lift is needed.

    Used with ``F`` the element's prior precision given its parents: a base is then never
    wider than the prior. Under a log-concave likelihood ``P >= F`` already (the log joint's
    curvature is the prior's plus the likelihood's), so this changes nothing there; at a
    shoulder or a point between two modes of a mixture or heavy-tailed likelihood the
    likelihood's curvature is positive and ``P`` can be near zero, and a base there put
    posterior draws up to 16 posterior sds off and single draws' losses about 1,000 nats
    down. For ``d > 2`` the lift is held constant for gradients (an eigenvalue's
    derivative is not finite at repeated eigenvalues), as for :data:`MIN_PRECISION`'s lift.
    """
    d = chol.shape[-1]
    p = jnp.einsum("...ij,...kj->...ik", chol, chol)
    if d > 2:  # held: no eigenvectors computed for a derivative that is dropped
        floor, p_held = jax.lax.stop_gradient(floor), jax.lax.stop_gradient(p)
    else:
        p_held = p
    level = _smallest_eigenvalue(floor) if d <= 2 else _smallest_eigenvalue_of_floor(floor)
    lift = jnp.maximum(level - _smallest_eigenvalue_below(p_held, level), 0.0)
    lifted = _cholesky(p + lift[..., None, None] * jnp.eye(d, dtype=p.dtype))
    return jnp.where((lift > 0)[..., None, None], lifted, chol)


def solve_lower(chol: jax.Array, v: jax.Array, transpose: bool = False) -> jax.Array:
    """``L^{-1} v`` (or ``L^{-T} v``) for lower triangular ``L (*grid, d, d)``, ``v (*grid, d)``."""
    d = chol.shape[-1]
    if d == 1:
        return v / chol[..., 0]
    if d == 2:
        l11, l21, l22 = chol[..., 0, 0], chol[..., 1, 0], chol[..., 1, 1]
        if transpose:  # L^T = [[l11, l21], [0, l22]]
            x2 = v[..., 1] / l22
            return jnp.stack([(v[..., 0] - l21 * x2) / l11, x2], -1)
        x1 = v[..., 0] / l11
        return jnp.stack([x1, (v[..., 1] - l21 * x1) / l22], -1)
    solve = lambda c, b: jax.scipy.linalg.solve_triangular(c, b, lower=True, trans=1 if transpose else 0)  # noqa: E731
    return in_pieces(solve, chol, v[..., None])[..., 0]


def _newton_step(g: jax.Array, chol: jax.Array) -> jax.Array:
    """The Newton step ``P^{-1} g = L^{-T} L^{-1} g``."""
    return solve_lower(chol, solve_lower(chol, g), transpose=True)


def _length(s: jax.Array, chol: jax.Array) -> jax.Array:
    """Length of ``s`` in the metric ``P = L L^T``: ``sqrt(s^T P s) = |L^T s|``."""
    # |L^T s|_i = sum_j L_ji s_j, written elementwise: a batched dot of tiny blocks is one
    # small matrix product per element on a CPU (a third of a Newton loop at 65,536 groups)
    return jnp.sqrt(jnp.sum(jnp.sum(chol * s[..., :, None], -2) ** 2, -1))


def _clip(s: jax.Array, length: jax.Array, radius: jax.Array) -> jax.Array:
    # the inner where keeps the division away from 0 (a converged step has length 0)
    long = length > radius
    return s * jnp.where(long, radius / jnp.where(long, length, 1.0), 1.0)[..., None]


class NewtonReport(NamedTuple):
    """How an element's Newton problem ended, per element ``(*grid)``.

    :ivar decrement: Newton decrement ``sqrt(g^T P^{-1} g)`` at the last iterate: the
        step that remains, in posterior sds (0 at the mode).
    :ivar concave: whether the log joint's curvature there was negative definite (no
        lift was needed).
    :ivar higher_mode: whether a higher mode lies next to the element's (filled only when
        asked for, see :func:`higher_modes`; else None).
    :ivar mode: the base's location before marginalizing later siblings, canonical
        ``(*grid, sum of d)``: the last iterate (for posterior draws, plus the held last
        step), or the fallback where the iterations did not converge (filled by
        :func:`~numpyro_pavi.sampling.laplace_base`: posterior draws start there, see
        :func:`~numpyro_pavi.sampling.draw_starts`; else None).
    """

    decrement: jax.Array
    concave: jax.Array
    higher_mode: jax.Array | None = None
    mode: jax.Array | None = None

    def converged(self, tol: float = DECREMENT_TOL) -> jax.Array:
        return (self.decrement <= tol) & self.concave


def newton_iterate(
    logp_frozen: Callable,
    z_init: jax.Array,
    max_steps: int = NEWTON_STEPS,
    tol: float = STOP_TOL,
    with_gradient: bool = False,
):
    """Trust-region Newton iterations per element, all held constant for gradients; they
    stop as soon as every element has converged (:meth:`NewtonReport.converged`), so a
    Gaussian likelihood, exact after one step, costs two evaluations, and a start where
    every element has already converged (a warm start: posterior draws from the guide's
    center, stored modes) one: the caller takes the last Newton step from there.

    Each element has a trust radius, measured in the sds of its curvature at the start
    (the metric is frozen there, so a region where the log joint is convex, whose lifted
    curvature is tiny, cannot license a huge step). A step is the Newton step with the
    precision (lifted only where it is not concave, :func:`precision_chol`'s ``for_steps``),
    clipped to the radius. It is kept when the gain in log joint it
    achieves, estimated per element by the trapezoid rule on the slopes at both ends
    (``(g + g_new) . s / 2``, exact on quadratics, needing no per-element values), is at
    least a quarter of the gain the quadratic model promised (``g . s - s^T P s / 2``);
    then the radius doubles if the step reached it. Otherwise the element stays and the
    radius shrinks to a quarter of the step. The first step is the full Newton step (radius
    ``MAX_RADIUS_SDS``): exact for a Gaussian likelihood from any start; rejected, the
    region restarts at ``INITIAL_RADIUS_SDS``. The start's evaluation is the loop's first
    iteration, so the model's derivatives are traced and compiled once. Heavy tails
    (StudentT, Cauchy) are not log-concave: from a start in the tails, length-damped Newton steps were thrown tens of
    units past the mode and bounced between the tails (a StudentT(30) group started 5
    scales from its data ended 30 units off after eight iterations).

    :param logp_frozen: ``z (*grid, d) -> scalar``, the other sites' values held constant.
    :param z_init: ``(*grid, d)`` start.
    :param max_steps: most iterations.
    :param tol: the iterations stop once every element's decrement is below it (and its
        curvature concave), or has not converged after ``max_steps``.
    :param with_gradient: also return the gradient at the last iterate ``(*grid, d)``.
    :return: the last iterate ``z``, the Cholesky factor of the precision there (lifted as
        for the steps; :func:`lift_chol` gives a base's width from it)
        and a :class:`NewtonReport` (and the gradient).
    """

    def evaluate(z):
        g, h = grad_and_blocks(logp_frozen, z)
        chol, concave = precision_chol(h, with_concave=True, for_steps=True)
        return g, concave, chol

    def report(g, concave, chol):
        return NewtonReport(_length(_newton_step(g, chol), chol), concave)

    def cond(state):
        i, z, g, concave, chol, _, _ = state
        return (i == 0) | ((i <= max_steps) & ~jnp.all(report(g, concave, chol).converged(tol)))

    def body(state):
        # iteration 0 only evaluates the start (s = 0, kept): one loop body, so the model is
        # traced once for all the iterations
        i, z, g, concave, chol, radius, metric = state
        newton = _newton_step(g, chol)
        s = jnp.where(i > 0, _clip(newton, _length(newton, metric), radius), 0.0)
        g_new, concave_new, chol_new = evaluate(z + s)
        metric = jnp.where(i > 0, metric, chol_new)
        predicted = jnp.sum(g * s, -1) - 0.5 * _length(s, chol) ** 2
        achieved = 0.5 * jnp.sum((g + g_new) * s, -1)
        keep = (i == 0) | (achieved >= 0.25 * predicted)
        size = _length(s, metric)
        grown = jnp.where(size >= 0.99 * radius, 2.0 * radius, radius)
        # the first step is the full Newton step (exact for a Gaussian likelihood, whose
        # start may lie tens of sds away); rejected, the region starts at INITIAL_RADIUS_SDS
        # (a rejected first step shorter than that: a quarter of it, not the same step again)
        shrunk = jnp.where(i == 1, jnp.minimum(INITIAL_RADIUS_SDS, 0.25 * size), 0.25 * size)
        radius = jnp.where(i == 0, radius, jnp.where(keep, grown, shrunk))
        radius = jnp.clip(radius, MIN_RADIUS_SDS, MAX_RADIUS_SDS)
        keep_z = keep[..., None]
        return (
            i + 1,
            jnp.where(keep_z, z + s, z),
            jnp.where(keep_z, g_new, g),
            jnp.where(keep, concave_new, concave),
            jnp.where(keep_z[..., None], chol_new, chol),
            radius,
            metric,
        )

    z_init = jax.lax.stop_gradient(z_init)
    d = z_init.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=z_init.dtype), z_init.shape + (d,))
    radius = jnp.full(z_init.shape[:-1], MAX_RADIUS_SDS, z_init.dtype)
    flags = jnp.zeros(z_init.shape[:-1], bool)
    state = (jnp.array(0), z_init, jnp.zeros_like(z_init), flags, eye, radius, eye)
    # all iterations, the start's evaluation included, in one loop body: the model's second
    # derivatives are compiled once. Two of them as straight-line code before the loop made
    # small models' `svi.init` and compiling slower, and their steps (and a 65,536-group
    # Poisson intercept's) no faster (RESULTS section 21)
    _, z, g, concave, chol, _, _ = jax.lax.stop_gradient(jax.lax.while_loop(cond, body, state))
    out = (z, chol, report(g, concave, chol))
    return out + (g,) if with_gradient else out


def _rise(logp_frozen: Callable, a: jax.Array, b: jax.Array) -> jax.Array:
    """Per element, ``log p(b) - log p(a)`` ``(*grid)``: the slope integrated along the
    segment (Gauss-Legendre), since the model gives per-element gradients, not values."""
    nodes, weights = (jnp.asarray(v, a.dtype) for v in _GAUSS_LEGENDRE)
    delta = b - a

    def node(total, tw):  # one traced gradient for all the nodes: a scan, not an unrolled loop
        t, w = tw
        g = jax.grad(logp_frozen)(a + 0.5 * (t + 1.0) * delta)
        return total + 0.5 * w * jnp.sum(g * delta, -1), None

    return jax.lax.scan(node, jnp.zeros(a.shape[:-1], a.dtype), (nodes, weights))[0]


def higher_modes(
    logp_frozen: Callable, z: jax.Array, chol: jax.Array, rep: NewtonReport, max_steps: int = NEWTON_STEPS
) -> jax.Array:
    """Which converged elements sit on a mode below another one nearby ``(*grid)`` bool.

    A log joint that is not log-concave (a location mixture, Cauchy data with outliers, a
    random slope under heavy tails) can have a second mode or a shoulder next to the start,
    where the iterations stop; and as the sampled parents move, an element's base then
    jumps between the two, a jump the reparameterization gradient does not see (on the
    likelihood matrix's normal mixture, a group stopped on a shoulder 4 nats below its
    mode at some draws of the globals, and 78 of 20,000 posterior draws put it 6 posterior
    sds off). Along a line through a unimodal log joint the slope points back to the mode
    everywhere; so each converged element's slope is read at ``PROBE_RADII_SDS`` sds (of
    its curvature) on both sides of each standardized axis, and where it points away the
    iterations restart from the first such probe: the element is flagged if they converge
    to a higher point (:func:`_rise`). A mode further than the last probe goes unseen.
    ``6 d`` gradient passes, and the restart only when a probe points away: a diagnostic
    (:meth:`~numpyro_pavi.AutoPAVI.check_bases`), not run in training steps.

    :param logp_frozen: ``z (*grid, d) -> scalar``.
    :param z: ``(*grid, d)`` last iterates; ``chol`` ``(*grid, d, d)`` their precision
        factors; ``rep`` their :class:`NewtonReport`.
    """
    d = z.shape[-1]
    eye = jnp.eye(d, dtype=z.dtype)
    ok = rep.converged()
    # (probes, *grid, d), in order of radius: the first probe pointing away is the restart
    deltas = jnp.stack(
        [
            solve_lower(chol, jnp.broadcast_to(sign * r * eye[j], z.shape), transpose=True)
            for r in PROBE_RADII_SDS
            for sign in (1.0, -1.0)
            for j in range(d)
        ]
    )

    def probe(carry, delta):  # one traced gradient for all the probes (compile time)
        start, found = carry
        g = jax.grad(logp_frozen)(z + delta)
        away = ok & ~found & (jnp.sum(g * delta, -1) > 0)
        return (jnp.where(away[..., None], z + delta, start), found | away), None

    (start, found), _ = jax.lax.scan(probe, (z, jnp.zeros(z.shape[:-1], bool)), deltas)

    def restart(_):
        z1, _, rep1 = newton_iterate(logp_frozen, start, max_steps)
        return found & rep1.converged() & (_rise(logp_frozen, z, z1) > 0)

    return jax.lax.cond(jnp.any(found), restart, lambda _: found, None)


def newton_base(
    logp: Callable,
    logp_frozen: Callable,
    z_init: jax.Array,
    max_steps: int = NEWTON_STEPS,
    fallback: jax.Array | None = None,
    floor: Callable | None = None,
    report: bool = False,
    differentiate: bool = True,
    probe_modes: bool = False,
    quadratic: bool = False,
):
    """Element-wise Laplace base of one site: :func:`newton_iterate` from ``z_init``, then
    the base at the last iterate with the mode's derivative (:func:`_differentiated_base`);
    or, for a log joint known to be quadratic in the site, one Newton step
    (:func:`one_step_base`).

    An element whose iterations did not converge (non-smooth likelihoods such as Laplace,
    whose curvature says nothing; several modes under a flat prior) has no mode whose
    derivative could stand for its base's: it is placed at ``fallback`` instead (the
    site's prior location given its parents, a differentiable function of them), with the
    curvature there, so the gradient is the gradient of what is sampled either way.

    :param logp: ``z (*grid, d) -> scalar``: the log joint as a function of the site's
        unconstrained values (the other sites at their current values).
    :param logp_frozen: the same with the other sites' values held constant, for the
        Newton iterations.
    :param z_init: ``(*grid, d)`` starting point.
    :param max_steps: most Newton iterations before the differentiated step.
    :param fallback: ``(*grid, d)`` base of non-converged elements (default: ``z_init``,
        whose gradient is then zero).
    :param floor: ``m (*grid, d) -> (*grid, d, d)``, a precision the base's may not be
        looser than (:func:`at_least`): the element's prior precision given its parents,
        so that a base is never wider than the prior. None: no floor.
    :param report: also return the :class:`NewtonReport`.
    :param differentiate: False for posterior draws, which need no gradient: the
        iterations stop at ``DRAW_TOL`` and the base is the Newton step from the last
        iterate, held (about ``DRAW_TOL**2`` sds from the mode), with the curvature there:
        two or three passes through the model fewer.
    :param probe_modes: fill the report's ``higher_mode`` (:func:`higher_modes`), for
        diagnostics: the base itself is unchanged.
    :param quadratic: the log joint is quadratic in the site (a likelihood Gaussian in it,
        found at setup by the plan's probe, ``GuidePlan.quadratic``), so one Newton step
        from any start is its mode and the curvature is the same everywhere. Ignored with
        ``probe_modes``: the diagnostics iterate and probe for other modes.
    :return: ``m (*grid, d)`` and the Cholesky factor ``L (*grid, d, d)`` of the precision
        (and the report).
    """
    if quadratic and not probe_modes:
        # diagnostics (probe_modes) iterate and probe as for any site: the setup probe looks
        # near the mode only, and a far second mode (a location mixture) is what they look for
        m, chol, rep = one_step_base(logp if differentiate else logp_frozen, z_init, fallback)
        if floor is not None:
            chol = at_least(chol, floor(m))
        return (m, chol, rep) if report else (m, chol)
    # draws stop earlier and take the last step held (DRAW_TOL); the diagnostics look at
    # the iterations themselves, training differentiates its own last step
    draw = not (differentiate or probe_modes)
    z0, chol0, rep, g0 = newton_iterate(
        logp_frozen, z_init, max_steps, tol=DRAW_TOL if draw else STOP_TOL, with_gradient=True
    )
    if probe_modes:
        rep = rep._replace(higher_mode=jax.lax.stop_gradient(higher_modes(logp_frozen, z0, chol0, rep, max_steps)))
    fallback = jax.lax.stop_gradient(z_init) if fallback is None else fallback
    if differentiate:
        m, chol = _differentiated_base(logp, z0, chol0, rep.converged(), fallback)
    else:
        if draw:
            s = _newton_step(g0, chol0)
            z0 = z0 + _clip(s, _length(s, chol0), MAX_STEP_SDS)
        m, chol = _held_base(logp_frozen, z0, chol0, rep.converged(), fallback)
    if floor is not None:
        chol = at_least(chol, floor(m))
    return (m, chol, rep) if report else (m, chol)


def one_step_base(logp: Callable, z_init: jax.Array, fallback: jax.Array | None = None):
    """The base of a log joint quadratic in the site: one Newton step from the held start,
    ``m = z + P^{-1} g`` with ``g`` and ``P`` differentiable in the parents, is the mode and
    its derivative (exact for a quadratic, whatever the start), and ``P`` is the curvature
    at ``m`` too. One pass through the model where the iterations and the differentiated
    step take four (the start, the first step, the gradient and curvature at the end). An
    element whose curvature is not negative definite (no mode) sits at ``fallback``. The
    step takes the precision as it is (the mode), the width its lift to ``MIN_PRECISION``
    as the iterations' base does. The report's decrement is 0: the step is exact.

    :param logp: ``z (*grid, d) -> scalar``, differentiable in the parents.
    :param z_init: ``(*grid, d)`` start (held constant).
    :param fallback: ``(*grid, d)`` base of elements without a mode (default: the start).
    :return: ``m (*grid, d)``, the Cholesky factor ``L (*grid, d, d)`` and a
        :class:`NewtonReport`.
    """
    z0 = jax.lax.stop_gradient(z_init)
    g, h = grad_and_blocks(logp, z0)
    p = precision(h)
    low, lift, step_lift = _lifts(p)
    concave = low > 0
    chol = _lifted_cholesky(p, lift)
    # an element wider than the lift (sd > 10): its own precision gives its mode
    m = z0 + _newton_step(g, _lifted_cholesky(p, step_lift))
    fallback = jax.lax.stop_gradient(z_init) if fallback is None else fallback
    m = jnp.where(concave[..., None], m, fallback)
    return m, chol, NewtonReport(jnp.zeros(concave.shape, m.dtype), jax.lax.stop_gradient(concave))


def _held_base(logp_frozen: Callable, z0, chol0, converged, fallback):
    """The base without its derivative (posterior draws): ``z0`` (the Newton step from the
    last iterate, see :func:`newton_base`) and the curvature at that iterate, which the
    iterations already computed; the non-converged elements at ``fallback`` with the
    curvature there (evaluated only when there is one). The training base evaluates the
    gradient and curvature again at the end of its last step: two passes through the model,
    whose only use is the derivative."""
    ok = converged[..., None]
    fallback = jax.lax.stop_gradient(fallback)

    # the iterations' factor follows a wide element's own curvature: the width is lifted,
    # as the training base's (its curvature at the mode, precision_chol)
    width = lift_chol(chol0)

    def with_fallback(_):
        _, h = grad_and_blocks(logp_frozen, fallback)
        return jnp.where(ok[..., None], width, precision_chol(h))

    chol = jax.lax.cond(jnp.all(converged), lambda _: width, with_fallback, None)
    return jnp.where(ok, z0, fallback), chol


def _differentiated_base(logp: Callable, z0, chol0, converged, fallback):
    """The base's value ``m = z0 + s`` (``s`` the Newton step from the last iterate, clipped
    to ``MAX_STEP_SDS``) with the derivative of the mode, ``dm/dtheta = P^{-1} dg/dtheta``
    (implicit function theorem), and ``L`` the precision's Cholesky factor *at* ``m``, with
    its dependence on ``m`` kept.

    Differentiating a damped step instead gives ``t P^{-1} dg/dtheta``: a line search that
    ended with ``t = 1/2`` (round-off at the mode rejects steps at random) halved every
    parent's pull on the element, the global locations' gradients were wrong by tens of
    percent, and a StudentT(30) random-intercept model ended 4 posterior sds off.
    Holding ``L`` at the frozen iterate dropped ``dL/dm dm/dtheta`` (zero only for Gaussian
    likelihoods, whose curvature does not depend on ``m``).
    """
    # a non-converged element's last iterate may lie where the log joint's higher
    # derivatives overflow (a Newton trial far in a tail): differentiate at its fallback
    # instead, so no inf or NaN reaches the gradient through the branch that is not taken
    ok = converged[..., None]
    z0 = jnp.where(ok, z0, jax.lax.stop_gradient(fallback))
    g = jax.grad(logp)(z0)
    # the Newton step with the precision held: its derivative at g = 0 is P^{-1} dg/dtheta
    s = _newton_step(g, chol0)
    value = z0 + jax.lax.stop_gradient(_clip(s, _length(s, chol0), MAX_STEP_SDS))
    m = value + s - jax.lax.stop_gradient(s)
    m = jnp.where(ok, jnp.where(ok, m, 0.0), fallback)
    _, h = grad_and_blocks(logp, m)
    return m, precision_chol(h)
