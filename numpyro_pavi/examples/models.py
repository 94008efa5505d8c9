"""Reference hierarchical models in NumPyro syntax, with simulators.

Every scale parameter is a keyword constant (never latent), so each model is linear-Gaussian
and its posterior and log-evidence are known exactly (see :mod:`numpyro_pavi.examples.exact`). The
tests, the demo, the benchmarks and the notebooks all use these models.

Plate conventions
-----------------
Nested plates take increasingly negative dims from the inside out: the innermost plate is at
``dim=-1`` (or right of the event dims), its parent at ``dim=-2`` and so on. A latent site
that lives in the outer plates only therefore keeps size-1 dims at the positions of the inner
plates (NumPyro's broadcasting convention); e.g. ``mu_g`` of :func:`random_effects` has
shape ``(G, 1, K)``. The simulators return latents in exactly these site shapes, so they can
be substituted into the models as they are.

Subsampling
-----------
A ``subsample_size`` argument subsamples the model's outermost local plate. The model itself
slices the observed data with the plate's indices (``x[idx]``), so a guide that opens the same
plate with the same indices sees the matching data, and NumPyro scales the terms inside the
plate by ``size / subsample_size``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.typing import ArrayLike

__all__ = [
    "crossed",
    "nested_three_level",
    "ragged_groups",
    "random_effects",
    "simulate_crossed",
    "simulate_nested_three_level",
    "simulate_ragged_groups",
    "simulate_random_effects",
]

Latents = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------
# 1. Gaussian random effects with a K-dimensional event
# ---------------------------------------------------------------------------------------------


def random_effects(
    x: ArrayLike,
    *,
    s0: float = 0.5,
    s1: float = 0.5,
    s2: float = 0.1,
    subsample_size: int | None = None,
) -> None:
    """Two-level Gaussian random effects model.

    ``mu ~ N(0, s0^2 I_K)``, ``mu_g ~ N(mu, s1^2 I_K)`` for each group ``g``,
    ``x_gm ~ N(mu_g, s2^2 I_K)`` for each observation ``m`` of group ``g``.

    ============ ================= =================================== ================
    site         plates            value shape                         event shape
    ============ ================= =================================== ================
    ``mu``       none              ``(K,)``                            ``(K,)``
    ``mu_g``     groups            ``(B, 1, K)``                       ``(K,)``
    ``x`` (obs)  groups, obs       ``(B, M, K)``                       ``(K,)``
    ============ ================= =================================== ================

    Plates: ``"groups"`` (size ``G``, ``dim=-2``, subsampled to ``B = subsample_size``) and
    ``"obs"`` (size ``M``, ``dim=-1``) nested in it. ``B = G`` when not subsampled.

    :param x: observations, shape ``(G, M, K)``.
    :param s0: prior scale of ``mu``.
    :param s1: scale of the group effects around ``mu``.
    :param s2: observation noise scale.
    :param subsample_size: groups per call (``None``: all ``G``).
    """
    x = jnp.asarray(x)
    G, M, K = x.shape
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(K), s0).to_event(1))
    with numpyro.plate("groups", G, subsample_size=subsample_size, dim=-2) as idx:
        # mu has batch shape (); the groups plate broadcasts it to (B, 1) + event (K,).
        mu_g = numpyro.sample("mu_g", dist.Normal(mu, s1).to_event(1))
        x_b = x[idx]
        with numpyro.plate("obs", M, dim=-1):
            numpyro.sample("x", dist.Normal(mu_g, s2).to_event(1), obs=x_b)


def simulate_random_effects(
    rng_key: jax.Array,
    G: int,
    M: int,
    K: int = 2,
    s0: float = 0.5,
    s1: float = 0.5,
    s2: float = 0.1,
    *,
    return_latents: bool = False,
) -> jax.Array | tuple[jax.Array, Latents]:
    """Draw ``x`` (shape ``(G, M, K)``) from :func:`random_effects`'s prior predictive.

    :param return_latents: also return ``{"mu": (K,), "mu_g": (G, 1, K)}``, the latents
        that generated ``x``, in the model's site shapes.
    :return: ``x`` or ``(x, latents)``.
    """
    k_mu, k_g, k_x = jax.random.split(rng_key, 3)
    mu = s0 * jax.random.normal(k_mu, (K,))
    mu_g = mu + s1 * jax.random.normal(k_g, (G, 1, K))
    x = mu_g + s2 * jax.random.normal(k_x, (G, M, K))
    if return_latents:
        return x, {"mu": mu, "mu_g": mu_g}
    return x


# ---------------------------------------------------------------------------------------------
# 2. Three nested levels: subjects > sessions > observations
# ---------------------------------------------------------------------------------------------


def nested_three_level(
    x: ArrayLike,
    *,
    s0: float = 1.0,
    s1: float = 0.5,
    s2: float = 0.3,
    s3: float = 0.2,
    subsample_size: int | None = None,
) -> None:
    """Three-level nested Gaussian model (scalar event).

    ``mu ~ N(0, s0^2)``, ``mu_s ~ N(mu, s1^2)`` per subject, ``mu_st ~ N(mu_s, s2^2)`` per
    session of a subject, ``x_stm ~ N(mu_st, s3^2)`` per observation of a session.

    ============ ========================= ====================
    site         plates                    value shape
    ============ ========================= ====================
    ``mu``       none                      ``()``
    ``mu_s``     subjects                  ``(B, 1, 1)``
    ``mu_st``    subjects, sessions        ``(B, T, 1)``
    ``x`` (obs)  subjects, sessions, obs   ``(B, T, M)``
    ============ ========================= ====================

    Plates: ``"subjects"`` (size ``S``, ``dim=-3``, subsampled to ``B = subsample_size``),
    ``"sessions"`` (size ``T``, ``dim=-2``), ``"obs"`` (size ``M``, ``dim=-1``).

    :param x: observations, shape ``(S, T, M)``.
    :param subsample_size: subjects per call (``None``: all ``S``).
    """
    x = jnp.asarray(x)
    S, T, M = x.shape
    mu = numpyro.sample("mu", dist.Normal(0.0, s0))
    with numpyro.plate("subjects", S, subsample_size=subsample_size, dim=-3) as idx:
        mu_s = numpyro.sample("mu_s", dist.Normal(mu, s1))
        x_b = x[idx]
        with numpyro.plate("sessions", T, dim=-2):
            mu_st = numpyro.sample("mu_st", dist.Normal(mu_s, s2))
            with numpyro.plate("obs", M, dim=-1):
                numpyro.sample("x", dist.Normal(mu_st, s3), obs=x_b)


def simulate_nested_three_level(
    rng_key: jax.Array,
    S: int,
    T: int,
    M: int,
    s0: float = 1.0,
    s1: float = 0.5,
    s2: float = 0.3,
    s3: float = 0.2,
    *,
    return_latents: bool = False,
) -> jax.Array | tuple[jax.Array, Latents]:
    """Draw ``x`` (shape ``(S, T, M)``) from :func:`nested_three_level`'s prior predictive.

    :param return_latents: also return ``{"mu": (), "mu_s": (S, 1, 1), "mu_st": (S, T, 1)}``.
    :return: ``x`` or ``(x, latents)``.
    """
    k0, k1, k2, k3 = jax.random.split(rng_key, 4)
    mu = s0 * jax.random.normal(k0, ())
    mu_s = mu + s1 * jax.random.normal(k1, (S, 1, 1))
    mu_st = mu_s + s2 * jax.random.normal(k2, (S, T, 1))
    x = mu_st + s3 * jax.random.normal(k3, (S, T, M))
    if return_latents:
        return x, {"mu": mu, "mu_s": mu_s, "mu_st": mu_st}
    return x


# ---------------------------------------------------------------------------------------------
# 3. Ragged groups: flat observations with a group index (the usual real-data layout)
# ---------------------------------------------------------------------------------------------


def ragged_groups(
    y: ArrayLike,
    group: ArrayLike,
    covariate: ArrayLike,
    *,
    num_groups: int,
    s_mu: float = 1.0,
    s_a: float = 0.5,
    s_b: float = 0.5,
    s_y: float = 0.3,
    subsample_size: int | None = None,
) -> None:
    """Varying-intercept, varying-slope regression on flat, ragged data.

    ``mu_a, mu_b ~ N(0, s_mu^2)``; ``a_g ~ N(mu_a, s_a^2)``, ``b_g ~ N(mu_b, s_b^2)`` per
    group; ``y_n ~ N(a[group_n] + b[group_n] * covariate_n, s_y^2)`` per observation.

    ============ ========== =====================
    site         plates     value shape
    ============ ========== =====================
    ``mu_a``     none       ``()``
    ``mu_b``     none       ``()``
    ``a``        groups     ``(num_groups,)``
    ``b``        groups     ``(num_groups,)``
    ``y`` (obs)  obs        ``(B,)``
    ============ ========== =====================

    Plates: ``"groups"`` (size ``num_groups``, ``dim=-1``) and ``"obs"`` (size ``N``,
    ``dim=-1``); they are *not* nested: an observation reaches its group through the index
    array, so groups may have any number of observations (including none).

    :param y: observations, shape ``(N,)``.
    :param group: group of each observation, integers in ``[0, num_groups)``, shape ``(N,)``.
    :param covariate: covariate of each observation, shape ``(N,)``.
    :param num_groups: number of groups (not inferred from ``group``, so that the model
        stays traceable and empty groups are allowed).
    :param subsample_size: observations per call in the ``"obs"`` plate (classic data
        subsampling; ``None``: all ``N``). The ``"groups"`` plate is never subsampled
        because a subset of groups owns a data-dependent number of observations.
    """
    y = jnp.asarray(y)
    group = jnp.asarray(group)
    covariate = jnp.asarray(covariate)
    (N,) = y.shape
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, s_mu))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, s_mu))
    with numpyro.plate("groups", num_groups, dim=-1):
        a = numpyro.sample("a", dist.Normal(mu_a, s_a))
        b = numpyro.sample("b", dist.Normal(mu_b, s_b))
    with numpyro.plate("obs", N, subsample_size=subsample_size, dim=-1) as idx:
        g = group[idx]
        loc = a[g] + b[g] * covariate[idx]
        numpyro.sample("y", dist.Normal(loc, s_y), obs=y[idx])


def simulate_ragged_groups(
    rng_key: jax.Array,
    num_groups: int,
    *,
    min_size: int = 1,
    max_size: int = 10,
    s_mu: float = 1.0,
    s_a: float = 0.5,
    s_b: float = 0.5,
    s_y: float = 0.3,
    return_latents: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array, Latents]:
    """Draw ragged data from :func:`ragged_groups`'s prior predictive.

    Group sizes are uniform integers in ``[min_size, max_size]``; observations are shuffled
    so that ``group`` is not sorted (as in real data). Covariates are standard normal.

    :return: ``(y, group, covariate)``, each of shape ``(N,)`` with ``N`` the total of the
        group sizes (``group`` is int32), plus ``{"mu_a": (), "mu_b": (), "a": (num_groups,),
        "b": (num_groups,)}`` when ``return_latents``.
    """
    if not 0 <= min_size <= max_size:
        raise ValueError(f"Need 0 <= min_size <= max_size, got {min_size} and {max_size}.")
    k_size, k_perm, k_mu, k_a, k_b, k_x, k_y = jax.random.split(rng_key, 7)
    # Sizes must be concrete to build the index array, so they are drawn eagerly.
    sizes = np.asarray(jax.random.randint(k_size, (num_groups,), min_size, max_size + 1))
    group = np.repeat(np.arange(num_groups, dtype=np.int32), sizes)
    if group.size == 0:
        raise ValueError("The simulated data set is empty; raise min_size or max_size.")
    group = jnp.asarray(group)[jax.random.permutation(k_perm, group.size)]
    mu_a, mu_b = s_mu * jax.random.normal(k_mu, (2,))
    a = mu_a + s_a * jax.random.normal(k_a, (num_groups,))
    b = mu_b + s_b * jax.random.normal(k_b, (num_groups,))
    covariate = jax.random.normal(k_x, group.shape)
    y = a[group] + b[group] * covariate + s_y * jax.random.normal(k_y, group.shape)
    if return_latents:
        return y, group, covariate, {"mu_a": mu_a, "mu_b": mu_b, "a": a, "b": b}
    return y, group, covariate


# ---------------------------------------------------------------------------------------------
# 4. Crossed (non-nested) plates: rows x columns
# ---------------------------------------------------------------------------------------------


def crossed(
    y: ArrayLike,
    *,
    s_r: float = 1.0,
    s_c: float = 1.0,
    s_y: float = 0.5,
    subsample_size: int | None = None,
    col_subsample_size: int | None = None,
) -> None:
    """Additive row and column effects on a fully observed table.

    ``r_i ~ N(0, s_r^2)`` per row, ``c_j ~ N(0, s_c^2)`` per column,
    ``y_ij ~ N(r_i + c_j, s_y^2)``.

    ============ ============ =================
    site         plates       value shape
    ============ ============ =================
    ``r``        rows         ``(Br, 1)``
    ``c``        cols         ``(Bc,)``
    ``y`` (obs)  rows, cols   ``(Br, Bc)``
    ============ ============ =================

    Plates: ``"rows"`` (size ``R``, ``dim=-2``, subsampled to ``Br = subsample_size``) and
    ``"cols"`` (size ``C``, ``dim=-1``, subsampled to ``Bc = col_subsample_size``). Neither
    plate is nested in the other: ``r`` is outside ``"cols"`` and ``c`` outside ``"rows"``.

    :param y: observations, shape ``(R, C)``.
    :param subsample_size: rows per call (``None``: all ``R``).
    :param col_subsample_size: columns per call (``None``: all ``C``).
    """
    y = jnp.asarray(y)
    R, C = y.shape
    # The plate objects are reused so that "y" sees the same indices as "r" and "c".
    rows = numpyro.plate("rows", R, subsample_size=subsample_size, dim=-2)
    cols = numpyro.plate("cols", C, subsample_size=col_subsample_size, dim=-1)
    with rows as i:
        r = numpyro.sample("r", dist.Normal(0.0, s_r))
    with cols as j:
        c = numpyro.sample("c", dist.Normal(0.0, s_c))
    with rows, cols:
        numpyro.sample("y", dist.Normal(r + c, s_y), obs=y[i][:, j])


def simulate_crossed(
    rng_key: jax.Array,
    R: int,
    C: int,
    s_r: float = 1.0,
    s_c: float = 1.0,
    s_y: float = 0.5,
    *,
    return_latents: bool = False,
) -> jax.Array | tuple[jax.Array, Latents]:
    """Draw ``y`` (shape ``(R, C)``) from :func:`crossed`'s prior predictive.

    :param return_latents: also return ``{"r": (R, 1), "c": (C,)}``.
    :return: ``y`` or ``(y, latents)``.
    """
    k_r, k_c, k_y = jax.random.split(rng_key, 3)
    r = s_r * jax.random.normal(k_r, (R, 1))
    c = s_c * jax.random.normal(k_c, (C,))
    y = r + c + s_y * jax.random.normal(k_y, (R, C))
    if return_latents:
        return y, {"r": r, "c": c}
    return y
