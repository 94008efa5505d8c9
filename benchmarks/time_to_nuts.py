"""Wall time to a NUTS-grade posterior: the default guide against NUTS itself, in one process.

For each model (``stress.MODELS``: real or simulated GLMMs), NUTS draws the reference with
the settings of issue 27 (``--chains`` chains, ``--nuts-warmup`` warm-up and
``--nuts-samples`` draws each; its wall time, compilation included, is the figure to
beat). Then ``AutoPAVI(model)`` trains with constant Adam (``--lr``) in compiled blocks of
``--every`` steps; after each block ``--draws`` posterior draws are scored against the
NUTS draws (median |mean error| in NUTS sds over every latent coordinate). Reported: the
fit's wall time at each evaluation (``svi.init``, compilation and steps; the scoring
excluded) and the first time the median is at most ``--target``. The median includes the
Monte Carlo error of both sides' draws (about 0.02 sd with 1,000 guide draws and 2,000
NUTS draws).

Example::

    python benchmarks/time_to_nuts.py --models epil,verbagg
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import optax
from accuracy import compare
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from stress import MODELS

from numpyro_pavi import AutoPAVI


def nuts(model, data, kwargs, chains: int, warmup: int, samples: int, key: int):
    t0 = time.perf_counter()
    mcmc = MCMC(
        NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains, progress_bar=False,
        chain_method="sequential",
    )  # fmt: skip
    mcmc.run(jax.random.PRNGKey(100 + key), *data, **kwargs)
    ref = mcmc.get_samples()
    jax.block_until_ready(ref)
    return ref, time.perf_counter() - t0


def fit(model, data, kwargs, ref, lr: float, every: int, max_steps: int, draws: int, target: float, key: int):
    sites = sorted(ref)
    guide = AutoPAVI(model)
    svi = SVI(model, guide, optax.adam(lr), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(key), *data, **kwargs)

    def block(st):
        return jax.lax.scan(lambda s, _: svi.update(s, *data, **kwargs), st, None, length=every)

    run = jax.jit(block).lower(state).compile()
    jax.block_until_ready(state)
    clock = time.perf_counter() - t0
    sample = jax.jit(lambda p, k: guide.sample_posterior(k, p, *data, sample_shape=(draws,), **kwargs))
    evals, reached = [], None
    for i in range(max_steps // every):
        t1 = time.perf_counter()
        state, _ = run(state)
        jax.block_until_ready(state)
        clock += time.perf_counter() - t1
        acc = compare(ref, sample(svi.get_params(state), jax.random.PRNGKey(7)), sites)
        row = {"steps": (i + 1) * every, "wall_s": clock, "median_z": acc["median_mean_error_sd"], "p90_z": acc["p90_mean_error_sd"]}
        evals.append(row)
        print(f"  AutoPAVI steps {row['steps']:5d}  wall {clock:6.2f} s  median z {row['median_z']:.3f}  p90 {row['p90_z']:.3f}", flush=True)
        if reached is None and row["median_z"] <= target:
            reached = row
    return {"evals": evals, "reached": reached}


def main(argv=None):
    p = _common.parser(__doc__)
    p.add_argument("--models", default="epil,verbagg")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--every", type=int, default=250, help="steps per compiled block between evaluations")
    p.add_argument("--max-steps", type=int, default=5000)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--target", type=float, default=0.05)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--nuts-warmup", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--key", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke mode: the Poisson GLMM, tiny NUTS, 2 blocks of 50 steps")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "time_to_nuts.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.every, args.max_steps, args.draws = "poisson_glmm", 50, 100, 100
        args.chains, args.nuts_warmup, args.nuts_samples = 1, 100, 100
    t_start = time.perf_counter()
    results = {}
    for name in _common.parse_list(args.models, str):
        model, make_args, kwargs = MODELS[name]
        data = make_args()
        ref, nuts_s = nuts(model, data, kwargs, args.chains, args.nuts_warmup, args.nuts_samples, args.key)
        print(f"{name}: NUTS {args.chains} x ({args.nuts_warmup} + {args.nuts_samples}) in {nuts_s:.1f} s", flush=True)
        out = fit(model, data, kwargs, ref, args.lr, args.every, args.max_steps, args.draws, args.target, args.key)
        reached = out["reached"]
        ratio = None if reached is None else reached["wall_s"] / nuts_s
        verdict = "not reached" if reached is None else f"{reached['wall_s']:.2f} s at {reached['steps']} steps ({ratio:.2f}x NUTS)"
        print(f"{name}: median <= {args.target}: {verdict}", flush=True)
        results[name] = {"nuts_s": nuts_s, **out, "time_over_nuts": ratio}
    rec = _common.record("time_to_nuts", __file__, argv, args, _common.machine_info(), t_start, results=results)
    _common.write_json(args.out, rec)
    return rec


if __name__ == "__main__":
    main()
