"""Hierarchical models with latent scales and non-Gaussian likelihoods, with simulators.

Unlike :mod:`numpyro_pavi.models` (linear-Gaussian, exact posteriors), these have no closed
form: their references are NUTS runs. They are the models users write most (item-response
GLMMs, overdispersed counts, correlated random slopes) and the ones on which a guide's
stability at constant learning rates is tested (``benchmarks/stress.py``).

Every simulator returns ``(args, truth)``: ``model(*args)`` is the model on the simulated data
and ``truth`` holds the values the data were drawn with.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import numpy as jnp

__all__ = [
    "correlated_slopes",
    "crossed_bernoulli",
    "poisson_glmm",
    "simulate_correlated_slopes",
    "simulate_crossed_bernoulli",
    "simulate_poisson_glmm",
]


def crossed_bernoulli(subj, item, X, y, num_subjects: int, num_items: int) -> None:
    """Crossed item-response GLMM: ``y ~ Bernoulli(logit = b0 + X beta + u[subj] + v[item])``.

    ``u ~ N(0, s_subj)`` per subject, ``v ~ N(0, s_item)`` per item, half-normal scales,
    ``b0, beta ~ N(0, 2.5)``. Long format: one row per response.

    :param subj, item: ``(N,)`` int indices; :param X: ``(N, P)`` covariates; :param y: ``(N,)``.
    """
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    s_subj = numpyro.sample("s_subj", dist.HalfNormal(1.0))
    s_item = numpyro.sample("s_item", dist.HalfNormal(1.0))
    with numpyro.plate("subjects", num_subjects):
        u = numpyro.sample("u", dist.Normal(0.0, s_subj))
    with numpyro.plate("items", num_items):
        v = numpyro.sample("v", dist.Normal(0.0, s_item))
    with numpyro.plate("responses", y.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=b0 + X @ beta + u[subj] + v[item]), obs=y)


def simulate_crossed_bernoulli(seed: int = 0, num_subjects: int = 316, num_items: int = 24):
    """Every subject answers every item; X = one standard normal and five 0/1 columns;
    subject sd 1.3, item sd 0.45, b0 0.5, beta (0.3, 0.3, -1, -2, -1, -0.7)."""
    rng = np.random.default_rng(seed)
    S, I = num_subjects, num_items
    subj, item = np.repeat(np.arange(S), I), np.tile(np.arange(I), S)
    X = np.concatenate([rng.normal(size=(S * I, 1)), rng.integers(0, 2, size=(S * I, 5))], 1).astype(np.float32)
    truth = {
        "b0": 0.5,
        "beta": np.array([0.3, 0.3, -1.0, -2.0, -1.0, -0.7]),
        "s_subj": 1.3,
        "s_item": 0.45,
        "u": 1.3 * rng.normal(size=S),
        "v": 0.45 * rng.normal(size=I),
    }
    logit = truth["b0"] + X @ truth["beta"] + truth["u"][subj] + truth["v"][item]
    y = (rng.uniform(size=S * I) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    args = (jnp.asarray(subj), jnp.asarray(item), jnp.asarray(X), jnp.asarray(y), S, I)
    return args, truth


def poisson_glmm(subj, x, y, num_subjects: int) -> None:
    """Overdispersed counts: ``y ~ Poisson(exp(b0 + b1 x + u[subj] + e))`` with a subject
    effect ``u ~ N(0, s_u)`` and an observation-level effect ``e ~ N(0, s_e)`` (a latent in
    the observation plate, one per count)."""
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.0))
    b1 = numpyro.sample("b1", dist.Normal(0.0, 1.0))
    s_u = numpyro.sample("s_u", dist.HalfNormal(1.0))
    s_e = numpyro.sample("s_e", dist.HalfNormal(1.0))
    with numpyro.plate("subjects", num_subjects):
        u = numpyro.sample("u", dist.Normal(0.0, s_u))
    with numpyro.plate("obs", y.shape[0]):
        e = numpyro.sample("e", dist.Normal(0.0, s_e))
        numpyro.sample("y", dist.Poisson(jnp.exp(b0 + b1 * x + u[subj] + e)), obs=y)


def simulate_poisson_glmm(seed: int = 0, num_subjects: int = 60, visits: int = 4):
    """``b0 = 1, b1 = 0.4, s_u = 0.7, s_e = 0.35``, x standard normal."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(num_subjects), visits)
    x = rng.normal(size=subj.size).astype(np.float32)
    truth = {"b0": 1.0, "b1": 0.4, "s_u": 0.7, "s_e": 0.35, "u": 0.7 * rng.normal(size=num_subjects)}
    e = 0.35 * rng.normal(size=subj.size)
    y = rng.poisson(np.exp(truth["b0"] + truth["b1"] * x + truth["u"][subj] + e)).astype(np.float32)
    return (jnp.asarray(subj), jnp.asarray(x), jnp.asarray(y), num_subjects), truth


def correlated_slopes(subj, day, y, num_subjects: int) -> None:
    """Correlated random intercepts and slopes (the sleep-study layout):
    ``(a_j, b_j) ~ MVN(mu, diag(tau) L L^T diag(tau))`` with ``L ~ LKJCholesky(2, 2)``,
    ``y ~ N(a[subj] + b[subj] day, sigma)``; ``day`` is centred and scaled."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    tau = numpyro.sample("tau", dist.HalfNormal(2.0).expand([2]).to_event(1))
    L = numpyro.sample("L", dist.LKJCholesky(2, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    with numpyro.plate("subjects", num_subjects):
        ab = numpyro.sample("ab", dist.MultivariateNormal(mu, scale_tril=tau[:, None] * L))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(ab[subj, 0] + ab[subj, 1] * day, sigma), obs=y)


def simulate_correlated_slopes(seed: int = 0, num_subjects: int = 18, days: int = 10):
    """``mu = (2.5, 0.9), tau = (0.6, 0.35)``, correlation 0.3, ``sigma = 0.5``."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(num_subjects), days)
    day = np.tile((np.arange(days) - (days - 1) / 2) / days * 2, num_subjects).astype(np.float32)
    mu, tau, rho = np.array([2.5, 0.9]), np.array([0.6, 0.35]), 0.3
    cov = np.outer(tau, tau) * np.array([[1, rho], [rho, 1]])
    ab = rng.multivariate_normal(mu, cov, size=num_subjects)
    y = (ab[subj, 0] + ab[subj, 1] * day + 0.5 * rng.normal(size=subj.size)).astype(np.float32)
    truth = {"mu": mu, "tau": tau, "rho": rho, "sigma": 0.5, "ab": ab}
    return (jnp.asarray(subj), jnp.asarray(day), jnp.asarray(y), num_subjects), truth
