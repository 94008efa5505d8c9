"""Posterior accuracy against NUTS at constant (or, with ``--decay``, decaying) learning rates,
for AutoPAVI and AutoNormal.

For each model (``numpyro_pavi.examples.glmms``, simulated or real data: see ``stress.MODELS``) a NUTS
reference is drawn once; then each guide is
trained with constant-rate Adam for ``--steps`` steps per rate. Reported per guide and rate:
the mean loss of the last 100 steps, the worst 100-step running mean after ``--burn-in``
relative to the best (the stability criterion), and, against NUTS, the median and 90th
percentile over every latent coordinate (all sites, all elements) of
``|mean_VI - mean_NUTS| / sd_NUTS``, plus the median of ``|log(sd_VI / sd_NUTS)|``.
``crossed_bernoulli_rows``, ``crossed_normal_rows`` and ``crossed_poisson_rows`` (long tables
with unknown variance components, ``stress.crossed_rows``) train on 1,024 rows per step
(stored Laplace bases, passed to the draws with the params); ``--average W`` scores the iterates averaged over about ``W`` last
steps (``AverageParams``).
"""

from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common
from numpyro.infer.autoguide import AutoNormal
from stress import MODELS, TRAIN_KWARGS, train

#: models trained on subsampled rows here (the full data for NUTS and the draws)
ROWS = {name: kw for name, kw in TRAIN_KWARGS.items() if name.endswith("_rows")}
#: models whose NUTS reference needs a dense mass matrix: on the nested table the global
#: mean is confounded with the schools' and lecturers' means, and diagonal NUTS (1,000 +
#: 2,000) gave its mean an ESS of 8-19 and means 0.44-0.55 over three keys (0.8 sd apart),
#: where dense NUTS gives ESS 2,050-2,270 and 0.458-0.460 (RESULTS section 31)
DENSE_MASS = {"nested_crossed_rows", "nested_crossed_poisson_rows", "regions_crossed_rows"}

from numpyro_pavi import AutoPAVI
from numpyro_pavi.monitor import check_losses

# "AutoPAVI" is the default guide (Laplace bases since they became the default; before,
# set encodings: results/accuracy*.json of sections 5 and 7); "AutoPAVI-set" is that older
# default, "AutoPAVI-laplace" names the Laplace guide explicitly (as in section 8's runs)
GUIDES = {
    "AutoPAVI": lambda m: AutoPAVI(m),
    "AutoPAVI-set": lambda m: AutoPAVI(m, laplace=False),
    "AutoPAVI-laplace": lambda m: AutoPAVI(m, laplace=True),
    "AutoNormal": lambda m: AutoNormal(m),
}


def _flat(samples: dict, sites: list[str]) -> np.ndarray:
    """``(num_samples, total latent coordinates)`` in a fixed site order."""
    return np.concatenate([np.reshape(np.asarray(samples[s]), (np.shape(samples[s])[0], -1)) for s in sites], 1)


def compare(ref: dict, draws: dict, sites: list[str]) -> dict:
    r, q = _flat(ref, sites), _flat(draws, sites)
    sd = r.std(0) + 1e-12
    z = np.abs(q.mean(0) - r.mean(0)) / sd
    logsd = np.abs(np.log((q.std(0) + 1e-12) / sd))
    per_site, per_site_sd, i = {}, {}, 0
    for s in sites:
        n = int(np.prod(np.shape(ref[s])[1:]))
        per_site[s] = float(np.median(z[i : i + n]))
        # signed: a guide too narrow (< 0) or too wide (> 0) on a site
        per_site_sd[s] = float(np.median(np.log((q.std(0)[i : i + n] + 1e-12) / sd[i : i + n])))
        i += n
    return {
        "median_mean_error_sd": float(np.median(z)),
        "p90_mean_error_sd": float(np.quantile(z, 0.9)),
        "max_mean_error_sd": float(np.max(z)),
        "median_abs_log_sd_ratio": float(np.median(logsd)),
        "per_site_median_mean_error_sd": per_site,
        "per_site_median_log_sd_ratio": per_site_sd,
    }


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--models", default="crossed_bernoulli,verbagg,epil,sleepstudy")
    p.add_argument("--rates", default="1e-3,5e-3,1e-2")
    p.add_argument("--guides", default="AutoPAVI,AutoPAVI-set,AutoNormal", help=f"any of {', '.join(GUIDES)}")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--burn-in", type=int, default=1000)
    p.add_argument("--draws", type=int, default=2000, help="posterior draws of each guide")
    p.add_argument("--nuts-warmup", type=int, default=1000)
    p.add_argument("--nuts-samples", type=int, default=2000)
    p.add_argument("--key", type=int, default=0)
    p.add_argument("--decay", type=float, default=1.0, help="rate at the last step / first rate (1: constant)")
    p.add_argument("--average", type=int, default=0, help="score the iterates averaged over this many last steps (AverageParams)")
    p.add_argument("--quick", action="store_true", help="smoke mode: the Poisson GLMM, tiny NUTS, 300 steps, one rate")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "accuracy.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.rates, args.steps, args.burn_in = "poisson_glmm", "5e-3", 300, 200
        args.draws, args.nuts_warmup, args.nuts_samples = 200, 100, 100
    t_start = time.perf_counter()
    info = _common.machine_info()
    results = {}
    for name in _common.parse_list(args.models, str):
        model, make_args, kwargs = MODELS[name]
        data = make_args()
        t0 = time.perf_counter()
        kernel = NUTS(model, dense_mass=name in DENSE_MASS)
        mcmc = MCMC(kernel, num_warmup=args.nuts_warmup, num_samples=args.nuts_samples, progress_bar=False)
        mcmc.run(jax.random.PRNGKey(100 + args.key), *data, **kwargs)
        ref = mcmc.get_samples()
        nuts_s = time.perf_counter() - t0
        # the reference's own Monte Carlo error: its smallest effective sample size
        ess = min(float(np.min(effective_sample_size(np.asarray(v)[None]))) for v in ref.values())
        if ess < 200:
            print(f"{name}: NUTS's smallest ESS is {ess:.0f}: the reference's means are unreliable", flush=True)
        sites = sorted(ref)
        print(f"{name}: NUTS {args.nuts_warmup}+{args.nuts_samples} in {nuts_s:.0f}s, smallest ESS {ess:.0f}", flush=True)
        entry = {"nuts_seconds": nuts_s, "nuts_min_ess": ess, "dense_mass": name in DENSE_MASS, "sites": sites, "guides": {}}
        for gname in _common.parse_list(args.guides, str):
            make = GUIDES[gname]
            for lr in _common.parse_list(args.rates):
                guide = make(model)
                # training's own arguments (rows subsampled); NUTS and the draws use the full data
                tkw = {**kwargs, **ROWS.get(name, {})}
                losses, secs, params, _ = train(
                    model, guide, data, tkw, lr, args.key, args.steps, decay=args.decay, average=args.average
                )
                rep = check_losses(losses, 100, 0.05, args.burn_in)
                draws = guide.sample_posterior(
                    jax.random.PRNGKey(7), params, *data, sample_shape=(args.draws,), **kwargs
                )
                acc = compare(ref, draws, sites)
                row = {
                    "lr": lr,
                    "decay": args.decay,
                    "average": args.average,
                    "last100": float(np.mean(losses[-100:])),
                    "worst_over_best": rep.worst / rep.best,
                    "train_seconds": secs,
                    **acc,
                }
                entry["guides"].setdefault(gname, []).append(row)
                print(
                    f"  {gname:10s} lr={lr:g} last100={row['last100']:.2f} worst/best={row['worst_over_best']:.4f} "
                    f"|mean err|/sd median={acc['median_mean_error_sd']:.3f} p90={acc['p90_mean_error_sd']:.3f} "
                    f"|log sd ratio| median={acc['median_abs_log_sd_ratio']:.3f} {secs:.1f}s",
                    flush=True,
                )
        results[name] = entry
    rec = _common.record("accuracy", __file__, argv, args, info, t_start, results=results)
    _common.write_json(args.out, rec)
    return rec


if __name__ == "__main__":
    main()
