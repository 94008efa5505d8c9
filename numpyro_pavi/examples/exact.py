"""Closed-form posteriors and log-evidence of the reference models in :mod:`numpyro_pavi.examples.models`.

All computations are in numpy float64, independent of JAX's precision setting.

Two routes are provided:

* :func:`random_effects_posterior`: the per-coordinate closed form of the two-level random
  effects model (O(G M K)).
* The *dense* route for any linear-Gaussian hierarchy: a builder (``*_dense``) writes the
  model as ``z ~ N(m0, C0)``, ``y = A z + e``, ``e ~ N(0, noise_var I)`` in a
  :class:`DenseLinearGaussian`, :func:`linear_gaussian_posterior` solves it, and
  :func:`posterior_from_dense` maps the flat answer back to the model's sites in a
  :class:`SitePosterior`. Sizes up to a few hundred latents are cheap.

Latent ordering of the dense builders
-------------------------------------
The flat latent vector ``z`` is the concatenation, in the order of
:attr:`DenseLinearGaussian.layout`, of each site's value in its *site shape* (the shape the
model gives it, see :mod:`numpyro_pavi.examples.models`) flattened in C order. The flat observation
vector is the observed site's value flattened in C order. For instance
:func:`random_effects_dense` uses ``z = [mu (K), mu_g (G, 1, K) -> G*K]`` and
``y = x.ravel()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "DenseLinearGaussian",
    "SitePosterior",
    "crossed_dense",
    "crossed_posterior",
    "linear_gaussian_posterior",
    "nested_three_level_dense",
    "nested_three_level_posterior",
    "posterior_from_dense",
    "ragged_groups_dense",
    "ragged_groups_posterior",
    "random_effects_dense",
    "random_effects_posterior",
]

_LOG_2PI = math.log(2.0 * math.pi)

Layout = tuple[tuple[str, tuple[int, ...]], ...]


# ---------------------------------------------------------------------------------------------
# Closed form: two-level random effects
# ---------------------------------------------------------------------------------------------


def random_effects_posterior(
    x: ArrayLike, s0: float = 0.5, s1: float = 0.5, s2: float = 0.1
) -> dict[str, np.ndarray | float]:
    """Exact posterior of :func:`numpyro_pavi.examples.models.random_effects` given ``x``.

    The K coordinates are independent a posteriori. Within a coordinate, the posterior
    couples every ``mu_g`` to ``mu`` only: ``mu_g | mu, x`` are independent Gaussians with
    mean ``mu_g_mean + (cov_mu_mu_g / mu_sd**2) * (mu - mu_mean)`` and variance
    ``mu_g_sd**2 - cov_mu_mu_g**2 / mu_sd**2``, which is all that is needed to evaluate the
    joint posterior density.

    :param x: observations, shape ``(G, M, K)``.
    :return: ``mu_mean`` (K,), ``mu_sd`` (K,), ``mu_g_mean`` (G, K), ``mu_g_sd`` (G, K),
        ``cov_mu_mu_g`` (G, K) (posterior covariance of ``mu[k]`` and ``mu_g[g, k]``),
        ``log_evidence`` (float, ``log p(x)``). Note the model's ``mu_g`` site has shape
        ``(G, 1, K)``: use ``mu_g_mean[:, None, :]`` to align with it.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"x must have shape (G, M, K), got {x.shape}.")
    G, M, K = x.shape
    s0_2, s1_2, s2_2 = float(s0) ** 2, float(s1) ** 2, float(s2) ** 2

    xbar = x.mean(axis=1)  # (G, K)
    # xbar_g is sufficient for mu_g; v is its marginal variance around mu.
    v = s1_2 + s2_2 / M
    P = 1.0 / s0_2 + G / v  # posterior precision of mu
    m = (xbar.sum(axis=0) / v) / P  # (K,)

    a = 1.0 / (M / s2_2 + 1.0 / s1_2)  # variance of mu_g given mu and x
    w = a / s1_2  # regression coefficient of mu_g on mu given x
    mu_g_mean = a * (M / s2_2) * xbar + w * m
    mu_g_var = np.full((G, K), a + w**2 / P)
    cov = np.full((G, K), w / P)

    ss_within = ((x - xbar[:, None, :]) ** 2).sum(axis=(0, 1))  # (K,)
    # log p(x | xbar) part: the within-group residuals do not depend on any latent.
    within = -0.5 * ss_within / s2_2 - 0.5 * G * (M - 1) * math.log(2.0 * math.pi * s2_2) - 0.5 * G * math.log(M)
    # log p(xbar): xbar_g | mu ~ N(mu, v) independently, mu integrated out.
    between = (
        -0.5 * G * math.log(2.0 * math.pi * v)
        - 0.5 * (xbar**2).sum(axis=0) / v
        + 0.5 * P * m**2
        - 0.5 * math.log(s0_2 * P)
    )
    return {
        "mu_mean": m,
        "mu_sd": np.full(K, math.sqrt(1.0 / P)),
        "mu_g_mean": mu_g_mean,
        "mu_g_sd": np.sqrt(mu_g_var),
        "cov_mu_mu_g": cov,
        "log_evidence": float(np.sum(within + between)),
    }


# ---------------------------------------------------------------------------------------------
# Dense linear-Gaussian solver
# ---------------------------------------------------------------------------------------------


def _chol_inverse(L: np.ndarray) -> np.ndarray:
    """Inverse of ``L @ L.T`` from its lower Cholesky factor ``L`` (d, d)."""
    L_inv = np.linalg.solve(L, np.eye(L.shape[0]))
    return L_inv.T @ L_inv


def linear_gaussian_posterior(
    A: ArrayLike,
    m0: ArrayLike,
    C0: ArrayLike,
    y: ArrayLike,
    noise_var: float | ArrayLike,
) -> dict[str, np.ndarray | float]:
    """Posterior and log-evidence of ``z ~ N(m0, C0)``, ``y = A z + e``, ``e ~ N(0, D)``.

    ``D = noise_var * I`` for a scalar ``noise_var``, ``diag(noise_var)`` for a vector.
    Works in the latent dimension: posterior precision ``C0^-1 + A^T D^-1 A`` by Cholesky,
    and the evidence ``log N(y; A m0, A C0 A^T + D)`` by the matrix determinant lemma and
    Woodbury's identity, so the cost is ``O(d^3 + n d^2)`` rather than ``O(n^3)``.

    :param A: design matrix, shape ``(n, d)``.
    :param m0: prior mean, shape ``(d,)``.
    :param C0: prior covariance, shape ``(d, d)``, positive definite.
    :param y: observations, shape ``(n,)``.
    :param noise_var: noise variance, scalar or shape ``(n,)``, positive.
    :return: ``mean`` (d,), ``cov`` (d, d), ``log_evidence`` (float).
    """
    A = np.asarray(A, dtype=np.float64)
    m0 = np.asarray(m0, dtype=np.float64)
    C0 = np.asarray(C0, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = A.shape
    if m0.shape != (d,) or C0.shape != (d, d) or y.shape != (n,):
        raise ValueError(
            f"Shapes do not agree: A {A.shape}, m0 {m0.shape}, C0 {C0.shape}, y {y.shape}; "
            "expected A (n, d), m0 (d,), C0 (d, d), y (n,)."
        )
    noise = np.broadcast_to(np.asarray(noise_var, dtype=np.float64), (n,))
    if np.any(noise <= 0):
        raise ValueError("noise_var must be positive.")
    prec_w = 1.0 / noise  # (n,)

    L0 = np.linalg.cholesky(C0)
    C0_inv = _chol_inverse(L0)
    precision = C0_inv + A.T @ (prec_w[:, None] * A)
    L = np.linalg.cholesky(precision)
    cov = _chol_inverse(L)
    mean = cov @ (C0_inv @ m0 + A.T @ (prec_w * y))

    r = y - A @ m0
    u = A.T @ (prec_w * r)
    L_inv_u = np.linalg.solve(L, u)
    # r^T S^-1 r with S = A C0 A^T + D, by Woodbury.
    quad = float(np.sum(prec_w * r**2) - L_inv_u @ L_inv_u)
    # log|S| = log|D| + log|C0| + log|precision| (matrix determinant lemma).
    logdet = (
        float(np.sum(np.log(noise)))
        + 2.0 * float(np.sum(np.log(np.diag(L0))))
        + 2.0 * float(np.sum(np.log(np.diag(L))))
    )
    log_evidence = -0.5 * (n * _LOG_2PI + logdet + quad)
    return {"mean": mean, "cov": cov, "log_evidence": log_evidence}


class DenseLinearGaussian(NamedTuple):
    """A model written as ``z ~ N(m0, C0)``, ``y = A z + e``, ``e ~ N(0, noise_var I)``.

    ``linear_gaussian_posterior(*dense[:5])`` solves it. ``layout`` lists ``(site name,
    site shape)`` in the order the sites are concatenated in ``z`` (each flattened in C
    order); ``d`` is the sum of the sizes of these shapes.
    """

    A: np.ndarray  # (n, d)
    m0: np.ndarray  # (d,)
    C0: np.ndarray  # (d, d)
    y: np.ndarray  # (n,)
    noise_var: float
    layout: Layout


@dataclass(frozen=True)
class SitePosterior:
    """Exact Gaussian posterior of a model's latent sites.

    ``post.mean[site]`` and ``post.sd[site]`` are arrays in the site's shape (as the model
    gives it, e.g. ``(G, 1, K)``); ``post[site]`` returns ``(mean, sd)``.
    ``post.log_evidence`` is ``log p(data)``. The full joint posterior is
    ``N(flat_mean, flat_cov)`` over the flat vector described by ``layout``.
    """

    mean: dict[str, np.ndarray]
    sd: dict[str, np.ndarray]
    log_evidence: float
    flat_mean: np.ndarray  # (d,)
    flat_cov: np.ndarray  # (d, d)
    layout: Layout

    def __getitem__(self, site: str) -> tuple[np.ndarray, np.ndarray]:
        return self.mean[site], self.sd[site]

    def flatten(self, values: Mapping[str, ArrayLike]) -> np.ndarray:
        """Concatenate site values (site shapes, optional leading sample dims) into ``(..., d)``."""
        parts = []
        for name, shape in self.layout:
            value = np.asarray(values[name], dtype=np.float64)
            lead = value.shape[: value.ndim - len(shape)]
            if value.shape[len(lead) :] != shape:
                raise ValueError(f"Site '{name}' has shape {value.shape}; expected (..., *{shape}).")
            parts.append(value.reshape(lead + (-1,)))
        return np.concatenate(parts, axis=-1)

    def unflatten(self, z: ArrayLike) -> dict[str, np.ndarray]:
        """Split ``z`` of shape ``(..., d)`` into site values of shape ``(..., *site_shape)``."""
        return _unflatten(z, self.layout)

    def log_prob(self, values: Mapping[str, ArrayLike]) -> np.ndarray | float:
        """Joint posterior log density ``log p(z | data)`` at site values (batched over lead dims)."""
        z = self.flatten(values)
        L = np.linalg.cholesky(self.flat_cov)
        diff = z - self.flat_mean
        sol = np.linalg.solve(L, diff.reshape(-1, diff.shape[-1]).T).T.reshape(diff.shape)
        d = diff.shape[-1]
        out = -0.5 * (d * _LOG_2PI + np.sum(sol**2, axis=-1)) - np.sum(np.log(np.diag(L)))
        return float(out) if np.ndim(out) == 0 else out

    def sample(self, rng: np.random.Generator, num_samples: int) -> dict[str, np.ndarray]:
        """Draw ``num_samples`` joint posterior samples, shape ``(num_samples, *site_shape)``."""
        L = np.linalg.cholesky(self.flat_cov)
        eps = rng.standard_normal((num_samples, self.flat_mean.shape[0]))
        return self.unflatten(self.flat_mean + eps @ L.T)


def _unflatten(z: ArrayLike, layout: Layout) -> dict[str, np.ndarray]:
    z = np.asarray(z)
    out, start = {}, 0
    for name, shape in layout:
        size = math.prod(shape)
        out[name] = z[..., start : start + size].reshape(z.shape[:-1] + shape)
        start += size
    return out


def posterior_from_dense(dense: DenseLinearGaussian) -> SitePosterior:
    """Solve a :class:`DenseLinearGaussian` and reshape the answer to its sites."""
    sol = linear_gaussian_posterior(*dense[:5])
    mean, cov = sol["mean"], sol["cov"]
    return SitePosterior(
        mean=_unflatten(mean, dense.layout),
        sd=_unflatten(np.sqrt(np.diag(cov)), dense.layout),
        log_evidence=sol["log_evidence"],
        flat_mean=mean,
        flat_cov=cov,
        layout=dense.layout,
    )


class _Builder:
    """Accumulates the tree prior ``z = B eps`` (``eps ~ N(0, diag(var))``) site by site."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.offsets: dict[str, int] = {}
        start = 0
        for name, shape in layout:
            self.offsets[name] = start
            start += math.prod(shape)
        self.d = start
        self.B = np.zeros((start, start))
        self.var = np.zeros(start)

    def index(self, name: str, shape_index: np.ndarray | tuple) -> np.ndarray:
        """Flat positions of site ``name`` at (broadcast) multi-indices into its site shape."""
        shape = dict(self.layout)[name]
        return self.offsets[name] + np.ravel_multi_index(shape_index, shape)

    def add(self, child: np.ndarray, parent: np.ndarray | None, var: float) -> None:
        """``z[child] = z[parent] + N(0, var)`` elementwise (``parent=None``: zero-mean root)."""
        child = np.ravel(child)
        # A child inherits its parent's whole row of B: its noise plus all ancestors' noises.
        self.B[child, child] = 1.0
        if parent is not None:
            parent = np.broadcast_to(np.ravel(parent), child.shape)
            self.B[child] += self.B[parent]
        self.var[child] = var

    def prior(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.d), (self.B * self.var) @ self.B.T


# ---------------------------------------------------------------------------------------------
# Dense builders, one per model of numpyro_pavi.examples.models
# ---------------------------------------------------------------------------------------------


def random_effects_dense(x: ArrayLike, s0: float = 0.5, s1: float = 0.5, s2: float = 0.1) -> DenseLinearGaussian:
    """:func:`~numpyro_pavi.examples.models.random_effects` as a linear-Gaussian model.

    Latent order: ``mu`` (K,), then ``mu_g`` (G, 1, K). Observations: ``x.ravel()``.
    """
    x = np.asarray(x, dtype=np.float64)
    G, M, K = x.shape
    b = _Builder((("mu", (K,)), ("mu_g", (G, 1, K))))
    g, k = np.meshgrid(np.arange(G), np.arange(K), indexing="ij")
    b.add(b.index("mu", (np.arange(K),)), None, s0**2)
    b.add(b.index("mu_g", (g, 0 * g, k)), b.index("mu", (k,)), s1**2)
    gg, _, kk = np.meshgrid(np.arange(G), np.arange(M), np.arange(K), indexing="ij")
    A = np.zeros((G * M * K, b.d))
    A[np.arange(G * M * K), b.index("mu_g", (gg, 0 * gg, kk)).ravel()] = 1.0
    m0, C0 = b.prior()
    return DenseLinearGaussian(A, m0, C0, x.ravel(), float(s2) ** 2, b.layout)


def nested_three_level_dense(
    x: ArrayLike, s0: float = 1.0, s1: float = 0.5, s2: float = 0.3, s3: float = 0.2
) -> DenseLinearGaussian:
    """:func:`~numpyro_pavi.examples.models.nested_three_level` as a linear-Gaussian model.

    Latent order: ``mu`` (), ``mu_s`` (S, 1, 1), ``mu_st`` (S, T, 1). Observations:
    ``x.ravel()``. The prior covariance follows the tree: ``cov(mu_s, mu_s') = s0^2`` for
    ``s != s'``, ``cov(mu_st, mu_st') = s0^2 + s1^2`` within a subject, and so on.
    """
    x = np.asarray(x, dtype=np.float64)
    S, T, M = x.shape
    b = _Builder((("mu", ()), ("mu_s", (S, 1, 1)), ("mu_st", (S, T, 1))))
    s_idx = np.arange(S)
    st_s, st_t = np.meshgrid(np.arange(S), np.arange(T), indexing="ij")
    b.add(np.array([b.offsets["mu"]]), None, s0**2)
    b.add(b.index("mu_s", (s_idx, 0 * s_idx, 0 * s_idx)), np.array([b.offsets["mu"]]), s1**2)
    b.add(
        b.index("mu_st", (st_s, st_t, 0 * st_s)),
        b.index("mu_s", (st_s, 0 * st_s, 0 * st_s)),
        s2**2,
    )
    xs, xt, _ = np.meshgrid(np.arange(S), np.arange(T), np.arange(M), indexing="ij")
    A = np.zeros((S * T * M, b.d))
    A[np.arange(S * T * M), b.index("mu_st", (xs, xt, 0 * xs)).ravel()] = 1.0
    m0, C0 = b.prior()
    return DenseLinearGaussian(A, m0, C0, x.ravel(), float(s3) ** 2, b.layout)


def ragged_groups_dense(
    y: ArrayLike,
    group: ArrayLike,
    covariate: ArrayLike,
    num_groups: int,
    s_mu: float = 1.0,
    s_a: float = 0.5,
    s_b: float = 0.5,
    s_y: float = 0.3,
) -> DenseLinearGaussian:
    """:func:`~numpyro_pavi.examples.models.ragged_groups` as a linear-Gaussian model.

    Latent order: ``mu_a`` (), ``mu_b`` (), ``a`` (num_groups,), ``b`` (num_groups,).
    Observations: ``y``.
    """
    y = np.asarray(y, dtype=np.float64)
    group = np.asarray(group)
    covariate = np.asarray(covariate, dtype=np.float64)
    if not (y.ndim == 1 and y.shape == group.shape == covariate.shape):
        raise ValueError(
            f"y, group and covariate must share one shape (N,); got {y.shape}, {group.shape}, {covariate.shape}."
        )
    if group.size and (group.min() < 0 or group.max() >= num_groups):
        raise ValueError(f"group indices must lie in [0, {num_groups}).")
    G = int(num_groups)
    b = _Builder((("mu_a", ()), ("mu_b", ()), ("a", (G,)), ("b", (G,))))
    g = np.arange(G)
    b.add(np.array([b.offsets["mu_a"]]), None, s_mu**2)
    b.add(np.array([b.offsets["mu_b"]]), None, s_mu**2)
    b.add(b.index("a", (g,)), np.array([b.offsets["mu_a"]]), s_a**2)
    b.add(b.index("b", (g,)), np.array([b.offsets["mu_b"]]), s_b**2)
    N = y.shape[0]
    A = np.zeros((N, b.d))
    A[np.arange(N), b.index("a", (group,))] = 1.0
    A[np.arange(N), b.index("b", (group,))] = covariate
    m0, C0 = b.prior()
    return DenseLinearGaussian(A, m0, C0, y, float(s_y) ** 2, b.layout)


def crossed_dense(y: ArrayLike, s_r: float = 1.0, s_c: float = 1.0, s_y: float = 0.5) -> DenseLinearGaussian:
    """:func:`~numpyro_pavi.examples.models.crossed` as a linear-Gaussian model.

    Latent order: ``r`` (R, 1), ``c`` (C,). Observations: ``y.ravel()``.
    """
    y = np.asarray(y, dtype=np.float64)
    R, C = y.shape
    b = _Builder((("r", (R, 1)), ("c", (C,))))
    b.add(b.index("r", (np.arange(R), np.zeros(R, dtype=int))), None, s_r**2)
    b.add(b.index("c", (np.arange(C),)), None, s_c**2)
    i, j = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
    rows = np.arange(R * C)
    A = np.zeros((R * C, b.d))
    A[rows, b.index("r", (i, 0 * i)).ravel()] = 1.0
    A[rows, b.index("c", (j,)).ravel()] = 1.0
    m0, C0 = b.prior()
    return DenseLinearGaussian(A, m0, C0, y.ravel(), float(s_y) ** 2, b.layout)


# ---------------------------------------------------------------------------------------------
# Convenience: exact per-site posteriors
# ---------------------------------------------------------------------------------------------


def nested_three_level_posterior(
    x: ArrayLike, s0: float = 1.0, s1: float = 0.5, s2: float = 0.3, s3: float = 0.2
) -> SitePosterior:
    """Exact posterior of :func:`~numpyro_pavi.examples.models.nested_three_level` given ``x`` (S, T, M).

    Sites: ``mu`` (), ``mu_s`` (S, 1, 1), ``mu_st`` (S, T, 1).
    """
    return posterior_from_dense(nested_three_level_dense(x, s0, s1, s2, s3))


def ragged_groups_posterior(
    y: ArrayLike,
    group: ArrayLike,
    covariate: ArrayLike,
    num_groups: int,
    s_mu: float = 1.0,
    s_a: float = 0.5,
    s_b: float = 0.5,
    s_y: float = 0.3,
) -> SitePosterior:
    """Exact posterior of :func:`~numpyro_pavi.examples.models.ragged_groups`.

    Sites: ``mu_a`` (), ``mu_b`` (), ``a`` (num_groups,), ``b`` (num_groups,).
    """
    return posterior_from_dense(ragged_groups_dense(y, group, covariate, num_groups, s_mu, s_a, s_b, s_y))


def crossed_posterior(y: ArrayLike, s_r: float = 1.0, s_c: float = 1.0, s_y: float = 0.5) -> SitePosterior:
    """Exact posterior of :func:`~numpyro_pavi.examples.models.crossed` given ``y`` (R, C).

    Sites: ``r`` (R, 1), ``c`` (C,).
    """
    return posterior_from_dense(crossed_dense(y, s_r, s_c, s_y))
