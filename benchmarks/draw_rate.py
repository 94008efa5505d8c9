"""Full-plate posterior draws per second, guide against guide (RESULTS section 9's figure).

The random-effects model (``G`` groups of ``M`` observations in ``K`` dims, ``G K + K``
latents) is fitted briefly by each guide with ``--batch`` groups per step, then one jitted
``lax.map`` of ``--draws`` full-plate draws is timed (compiled first, median of
``--repeats``). Reported: latent draws per second and the ratio to
``AutoPAVI(laplace=False)``'s in the same run. Example::

    python benchmarks/draw_rate.py
    python benchmarks/draw_rate.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import models

GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoPAVI(laplace=False)": lambda m: AutoPAVI(m, laplace=False),
    "AutoPAVI": lambda m: AutoPAVI(m),
}


def measure(make, x, batch: int, steps: int, draws: int, repeats: int) -> dict:
    model = models.random_effects
    guide = make(model)
    svi = SVI(model, guide, optax.adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, subsample_size=batch)
    update = jax.jit(lambda s: svi.update(s, x, subsample_size=batch))
    for _ in range(steps):
        state, _ = update(state)
    params = svi.get_params(state)

    # params and data are the program's arguments, as in the package's own samplers at this
    # size (posterior_moments, posterior_summary: data above 1e6 numbers): closed over, XLA
    # would fold whatever depends on them alone (laplace=False's set encoder) at compile time
    @jax.jit
    def run(key, params, x):
        return jax.lax.map(lambda k: guide.sample_posterior(k, params, x), jax.random.split(key, draws))

    t0 = time.perf_counter()
    jax.block_until_ready(run(jax.random.PRNGKey(1), params, x))
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(jax.random.PRNGKey(2 + i), params, x))
        times.append(time.perf_counter() - t0)
    G, _, K = x.shape
    sec = float(np.median(times))
    return {"compile_s": compile_s, "seconds": sec, "latent_draws_per_s": draws * (G * K + K) / sec}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--G", type=int, default=65536)
    p.add_argument("--M", type=int, default=10)
    p.add_argument("--K", type=int, default=2)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--draws", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--guides", default=",".join(GUIDES))
    p.add_argument("--quick", action="store_true", help="smoke mode: 2,048 groups, 20 steps, 4 draws")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "draw_rate.json"))
    a = p.parse_args(argv)
    if a.quick:
        a.G, a.steps, a.draws, a.repeats = 2048, 20, 4, 1
    x = models.simulate_random_effects(jax.random.PRNGKey(0), a.G, a.M, a.K)
    rows = {}
    for g in a.guides.split(","):
        rows[g] = measure(GUIDES[g], x, a.batch, a.steps, a.draws, a.repeats)
        print(g, rows[g], flush=True)
    ref = rows.get("AutoPAVI(laplace=False)")
    for g, r in rows.items():
        if ref:
            r["x_laplace_false"] = r["latent_draws_per_s"] / ref["latent_draws_per_s"]
        print(f"{g:26s} {r['latent_draws_per_s']:.3g} latent draws/s" + (f"  ({r['x_laplace_false']:.2f}x laplace=False)" if ref else ""))
    result = {"machine": _common.machine_info(), "args": vars(a), "rows": rows}
    _common.write_json(a.out, result)
    return result


if __name__ == "__main__":
    main()
