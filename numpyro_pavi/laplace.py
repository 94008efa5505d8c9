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

The Newton iterations start at the site's prior mean given the sampled parents and are
held constant (``stop_gradient``); the last step is differentiated, so ``m`` and ``P`` keep
their dependence on the sampled parents and on the other sites' values, which the
reparameterization gradient needs. At the mode, Newton's update does not depend on its
starting point to first order, so holding the start constant costs little; for a Gaussian
likelihood the last step is exact from any start.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density

__all__ = ["NEWTON_STEPS", "log_joint", "newton_base", "reference_trace", "reference_value"]

#: Newton iterations before the last, differentiated step. Steps are damped to
#: ``MAX_STEP_SDS``, so the mode must lie within ``(NEWTON_STEPS + 1) * MAX_STEP_SDS``
#: posterior sds of the prior mean: with four, groups of the random-effects benchmark 50-70
#: sds away were not reached and the ELBO gap stalled at 0.02-0.03 nats/group; eight reach
#: 90 sds (gap < 0.002), and the damped steps still land on Poisson modes from far below.
NEWTON_STEPS = 8

#: Smallest precision an element gets (unconstrained units): a flat or non-concave log joint
#: then gives an sd of at most 10 instead of an infinite or negative variance.
MIN_PRECISION = 1e-2
#: Largest Newton step, in units of the current sd ``1/sqrt(P)``: an exp-link likelihood far
#: below its mode has a tiny curvature, and an undamped step would overflow.
MAX_STEP_SDS = 10.0


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


def _grad_and_blocks(logp: Callable, z: jax.Array):
    """Gradient ``(*grid, d)`` and per-element Hessian blocks ``(*grid, d, d)`` of a log
    density that is a sum of independent per-element terms."""
    # one linearization of the gradient (one pass through the model) serves all d columns
    g, hvp = jax.linearize(jax.grad(logp), z)
    d = z.shape[-1]
    cols = [hvp(jnp.broadcast_to(jnp.eye(d)[j], z.shape)) for j in range(d)]
    return g, jnp.stack(cols, -1)


def _precision_chol(h: jax.Array) -> jax.Array:
    """Cholesky factor of ``-h``, symmetrized and lifted to at least ``MIN_PRECISION``.

    The lift is a multiple of the identity chosen from the smallest eigenvalue under
    ``stop_gradient``: eigenvector gradients divide by eigenvalue gaps, which vanish for
    repeated eigenvalues, while the Cholesky factor's gradients stay finite.
    """
    p = -0.5 * (h + jnp.swapaxes(h, -1, -2))
    d = p.shape[-1]
    low = jnp.linalg.eigvalsh(jax.lax.stop_gradient(p))[..., 0]
    lift = jnp.maximum(MIN_PRECISION - low, 0.0)
    p = p + lift[..., None, None] * jnp.eye(d)
    return jnp.linalg.cholesky(p)


def _step(g: jax.Array, chol: jax.Array) -> jax.Array:
    """The Newton step ``P^{-1} g``, shortened to at most ``MAX_STEP_SDS`` sds along it."""
    step = jax.scipy.linalg.cho_solve((chol, True), g[..., None])[..., 0]
    # length in sd units: sqrt(step^T P step) = |L^T step|
    sq = jnp.sum(jnp.einsum("...ji,...j->...i", chol, step) ** 2, -1, keepdims=True)
    long = sq > MAX_STEP_SDS**2
    # the inner where keeps sqrt away from 0, whose gradient is infinite (a converged step is 0)
    return step * jnp.where(long, MAX_STEP_SDS / jnp.sqrt(jnp.where(long, sq, 1.0)), 1.0)


def newton_base(logp: Callable, logp_frozen: Callable, z_init: jax.Array, steps: int):
    """Element-wise Laplace base of one site.

    The iterations are damped Newton steps with a per-element trust factor ``t``: a step
    ``s`` (``t`` times the Newton step) is kept only where the slope along it at the new
    point, ``g_new . s``, is no steeper downhill than it was uphill at the start, ``-g . s``
    (the curvature condition of a line search); elsewhere the element stays put and ``t``
    halves, and after a kept step ``t`` doubles back towards 1. Without it an exp-link
    likelihood overshoots: below its mode the curvature is tiny, Newton jumps far above it
    and from there walks back about one unit per step (a Poisson subject started at 0 was
    left at 11.6, its mode near 3, with an sd of 0.005, and the fit diverged). A Gaussian
    likelihood keeps its first step, which is exact (the slope there is zero).

    :param logp: ``z (*grid, d) -> scalar``: the log joint as a function of the site's
        unconstrained values (the other sites at their current values).
    :param logp_frozen: the same with the other sites' values held constant, for the
        Newton iterations.
    :param z_init: ``(*grid, d)`` starting point.
    :param steps: Newton iterations before the last, differentiated one.
    :return: ``m (*grid, d)`` and the Cholesky factor ``L (*grid, d, d)`` of the precision.
    """

    def evaluate(z):
        g, h = _grad_and_blocks(logp_frozen, z)
        return g, _precision_chol(h)

    def body(i, state):
        # iteration 0 only evaluates the start (s = 0, kept): one loop body, so the model is
        # traced once for all the iterations
        z, g, chol, t = state
        s = jnp.where(i > 0, t[..., None] * _step(g, chol), 0.0)
        g_new, chol_new = evaluate(z + s)
        keep = (i == 0) | (jnp.sum(g_new * s, -1) >= -jnp.sum(g * s, -1))
        t = jnp.where(keep, jnp.minimum(2.0 * t, 1.0), 0.5 * t)
        keep_z = keep[..., None]
        return (
            jnp.where(keep_z, z + s, z),
            jnp.where(keep_z, g_new, g),
            jnp.where(keep_z[..., None], chol_new, chol),
            t,
        )

    z_init = jax.lax.stop_gradient(z_init)
    d = z_init.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=z_init.dtype), z_init.shape + (d,))
    start = (z_init, jnp.zeros_like(z_init), eye, jnp.ones(z_init.shape[:-1], z_init.dtype))
    z0, _, _, t = jax.lax.stop_gradient(jax.lax.fori_loop(0, steps + 1, body, start))
    g, h = _grad_and_blocks(logp, z0)
    chol = _precision_chol(h)
    return z0 + t[..., None] * _step(g, chol), chol
