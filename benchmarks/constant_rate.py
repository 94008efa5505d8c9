"""Accuracy at a constant learning rate on the exact random-effects model, over many steps.

The Gaussian random-effects model (``numpyro_pavi.examples.models.random_effects``, K = 1,
``x ~ N(mu_g, 0.1)``) has a closed-form posterior and log-evidence. Each method is trained
with constant-rate Adam on plate subsamples; every ``--eval-every`` steps the ELBO gap to the
exact evidence (nats per group, a ``--eval-particles`` estimate on the full data) is recorded,
and at the end the posterior means of every group are compared with the exact ones:
``median_g |E_q mu_g - E mu_g| / sd(mu_g)``. Two settings, as filed in issue 10:

* ``set``: G = 2000, M = 20, B = 64, rate 3e-3: PAVI-E (``encoding="set"``) with the
  path-derivative estimator (default), PAVI-E with the plain estimator, and AutoNormal;
* ``free``: G = 400, M = 20, B = 100, rate 5e-3: PAVI-F with both estimators and AutoNormal.
"""

from __future__ import annotations

import functools
import os
import sys
import time

import jax
import numpy as np
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_median

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects

SETTINGS = {
    "set": {"G": 2000, "M": 20, "B": 64, "lr": 3e-3, "encoding": "set"},
    "free": {"G": 400, "M": 20, "B": 100, "lr": 5e-3, "encoding": "free"},
}


def _guide(method: str, encoding: str, model):
    init = init_to_median(num_samples=15)
    if method == "AutoNormal":
        return AutoNormal(model, init_loc_fn=init, init_scale=0.1)
    if method == "PAVI-laplace":
        return AutoPAVI(model, encoding=encoding, laplace=True, init_loc_fn=init)
    # the estimator comparison of RESULTS.md section 6 ran before Laplace bases existed
    return AutoPAVI(model, encoding=encoding, estimator=method.split("-")[1], init_loc_fn=init, laplace=False)


def run_setting(
    name: str, cfg: dict, steps: int, eval_every: int, particles: int, seed: int, draws: int, methods: list[str]
) -> dict:
    G, M, B = cfg["G"], cfg["M"], cfg["B"]
    x = simulate_random_effects(jax.random.PRNGKey(seed), G, M, 1)
    exact = random_effects_posterior(x)
    model = functools.partial(random_effects, s0=0.5, s1=0.5, s2=0.1)
    out = {"config": cfg, "log_evidence": exact["log_evidence"], "methods": {}}
    for method in methods:
        guide = _guide(method, cfg["encoding"], model)
        harness = _common.Harness(model, guide, (x,), {"subsample_size": B}, eval_particles=particles)
        run = harness.start(cfg["lr"], seed=seed)
        curve = []
        for step in range(eval_every, steps + 1, eval_every):
            run.train(eval_every)
            gap = (run.full_loss(jax.random.PRNGKey(10_000 + step)) + exact["log_evidence"]) / G
            curve.append((step, gap))
        post = guide.sample_posterior(jax.random.PRNGKey(1), run.params, x, sample_shape=(draws,))
        mean = np.asarray(post["mu_g"]).mean(0)[:, 0, 0]
        err = np.abs(mean - exact["mu_g_mean"][:, 0]) / exact["mu_g_sd"][:, 0]
        late = [g for s, g in curve if s > steps // 2]
        row = {
            "curve": curve,
            "final_gap": curve[-1][1],
            "max_gap_second_half": max(late) if late else float("nan"),
            "median_mean_error_sd": float(np.median(err)),
            "max_mean_error_sd": float(np.max(err)),
            "train_s": run.train_s,
            "num_params": run.num_params,
        }
        out["methods"][method] = row
        print(
            f"{name}: {method:12s} final gap {row['final_gap']:.4f}  max gap after step {steps // 2} "
            f"{row['max_gap_second_half']:.4f}  median |mean err|/sd {row['median_mean_error_sd']:.3f}  "
            f"curve {[round(g, 3) for _, g in curve]}  {run.train_s:.1f}s",
            flush=True,
        )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--settings", default="set,free")
    p.add_argument("--methods", default="PAVI-stl,PAVI-reparam,AutoNormal", help="also: PAVI-laplace")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-particles", type=int, default=64)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke mode: small plates, 200 steps")
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "constant_rate.json"))
    args = p.parse_args(argv)
    settings = {k: dict(SETTINGS[k]) for k in _common.parse_list(args.settings, str)}
    if args.quick:
        for cfg in settings.values():
            cfg.update(G=40, M=5, B=8)
        args.steps, args.eval_every, args.eval_particles, args.draws = 200, 100, 4, 50
    t_start = time.perf_counter()
    info = _common.machine_info()
    results = {
        k: run_setting(k, cfg, args.steps, args.eval_every, args.eval_particles, args.seed, args.draws, _common.parse_list(args.methods, str))
        for k, cfg in settings.items()
    }
    rec = _common.record("constant_rate", __file__, argv, args, info, t_start, results=results)
    _common.write_json(args.out, rec)
    return rec


if __name__ == "__main__":
    main()
