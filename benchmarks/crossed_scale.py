"""A crossed long-format table the size of MovieLens-27M, trained and summarized on one machine.

Issue 26's scale check: the generator of ``crossed_long.py`` (students x lecturers, skewed
lognormal counts, ``y = mu + a[s] + b[l] + 0.9 eps``, variances fixed) at 2.77e7 rows and
266,980 x 53,883 levels by default, the default ``AutoPAVI(model)`` trained with 1,024 rows
per step (constant Adam 5e-3), then summarized over every level with
``posterior_summary`` (streamed, stored bases passed with the params), at each step count of
``--eval-at``. Reference: exact posterior means by preconditioned conjugate gradients (all
levels) and exact sds on a random sample of levels (one CG solve each); cached in
``--cache`` because it takes minutes. Row-subsampled ``AutoNormal`` at the same settings is
timed beside it (its posterior read from its location and scale parameters).

Reported per evaluation: wall time since the start of ``svi.init`` (init, compile, steps
and that evaluation's summary included; earlier evaluations' summaries excluded), median /
p90 / max |mean error| in exact sds and the sd ratio, on the sampled levels and mu (the
levels whose exact sd is known), and per site the median signed error.

Examples::

    python benchmarks/crossed_scale.py                       # the full 2.77e7-row table
    python benchmarks/crossed_scale.py --scale 0.1           # 2.77e6 rows, 26,698 x 5,388
    python benchmarks/crossed_scale.py --quick               # smoke run, 55,507 rows
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import crossed_long as cl
import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.averaging import AverageParams, averaged_params

#: MovieLens-27M: ratings, users, movies
ROWS, USERS, ITEMS = 27_753_444, 266_980, 53_883


def reference(s, l, y, S: int, L: int, num_sd_levels: int, seed: int, cache: str | None):
    """Exact means of every latent and exact sds of ``num_sd_levels`` sampled levels (and mu);
    loaded from / written to ``cache`` (an ``.npz``) when given."""
    if cache and os.path.exists(cache):
        ref = np.load(cache)
        return {k: ref["mean_" + k] for k in ("mu", "a", "b")}, {k: ref["sd_" + k] for k in ("mu", "a", "b")}
    mean, sd, _ = cl.exact(s, l, y, S, L, dense_max=0, num_sd_levels=num_sd_levels, seed=seed, evidence=False)
    if cache:
        tmp = cache + ".tmp.npz"
        np.savez(tmp, **{"mean_" + k: v for k, v in mean.items()}, **{"sd_" + k: v for k, v in sd.items()})
        os.replace(tmp, cache)
    return mean, sd


def score(post_mean: dict, post_sd: dict, mean: dict, sd: dict) -> dict:
    """Mean errors in exact sds and sd ratios on the levels whose exact sd is known (the
    sampled ones and mu), overall and, signed, per site."""
    per_site = {}
    for k in ("mu", "a", "b"):
        known = np.isfinite(sd[k])
        z = (np.asarray(post_mean[k]).reshape(-1) - mean[k])[known] / sd[k][known]
        # signed: a shared shift (the levels following an error in mu) shows as a median far from 0
        per_site[f"{k}_median_signed_z"] = float(np.median(z))
    levels = int(sum(np.isfinite(sd[k]).sum() for k in ("mu", "a", "b")))
    return {**per_site, **cl.score_moments(post_mean, post_sd, mean, sd), "levels_scored": levels}


def run(
    name: str, data, S: int, L: int, batch: int, eval_at: list[int], lr: float, draws: int, seed: int, ref,
    average: int = 0,
):  # fmt: skip
    s, l, y = (jnp.asarray(v) for v in data)
    trained = cl.MODELS.get(name, lambda m: m)(cl.model)
    guide = cl.GUIDES[name](trained)
    optim = _common.adam(lr, 1.0)
    svi = SVI(trained, guide, AverageParams(optim, average) if average else optim, Trace_ELBO())
    t0 = time.perf_counter()
    state = jax.block_until_ready(svi.init(jax.random.PRNGKey(seed), s, l, y, S, L, batch))
    init_s = time.perf_counter() - t0
    print(f"{name:10s} svi.init {init_s:.1f} s, peak RSS {_common.peak_rss_mb():.0f} MB", flush=True)
    update = jax.jit(lambda st, s_, l_, y_: svi.update(st, s_, l_, y_, S, L, batch)).lower(state, s, l, y).compile()
    compile_s = time.perf_counter() - t0 - init_s
    out = {"init_s": init_s, "compile_s": compile_s, "evals": []}
    clock, done, step_times = init_s + compile_s, 0, []
    for target in eval_at:
        t1 = time.perf_counter()
        while done < target:
            block = min(100, target - done)
            t2 = time.perf_counter()
            for _ in range(block):
                state, loss = update(state, s, l, y)
            jax.block_until_ready(state)
            done += block
            if block == 100:
                step_times.append((time.perf_counter() - t2) / block)
        clock += time.perf_counter() - t1
        t1 = time.perf_counter()
        def moments(params):
            params = {**params, **(state.mutable_state or {})}
            if isinstance(guide, AutoPAVI):
                key = jax.random.PRNGKey(seed + 1)
                summ = guide.posterior_summary(key, params, s, l, y, S, L, None, num_samples=draws)
                return ({k: summ[k][w] for k in ("mu", "a", "b")} for w in ("mean", "sd"))
            # AutoNormal on real-valued sites: its locations and scales are the posterior's
            return ({k: params[f"{k}_auto_{w}"] for k in ("mu", "a", "b")} for w in ("loc", "scale"))

        pm, ps = moments(svi.get_params(state))
        summary_s = time.perf_counter() - t1
        row = {"steps": done, "wall_s": clock + summary_s, "summary_s": summary_s, **score(pm, ps, *ref)}
        if average:
            row["averaged"] = score(*moments(averaged_params(svi, state)), *ref)
        row["peak_rss_mb"] = _common.peak_rss_mb()
        out["evals"].append(row)
        print(
            f"{name:10s} steps {done:6d}  wall {row['wall_s']:8.1f} s (summary {summary_s:6.1f} s)  median z "
            f"{row['median_z']:.3f}  p90 {row['p90_z']:.3f}  max {row['max_z']:.2f}  sd ratio "
            f"{row['median_sd_ratio']:.3f} [{row['p10_sd_ratio']:.3f}, {row['p90_sd_ratio']:.3f}]  signed z mu "
            f"{row['mu_median_signed_z']:+.2f} a {row['a_median_signed_z']:+.3f} b {row['b_median_signed_z']:+.3f}  "
            f"peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
        if average:
            a = row["averaged"]
            print(
                f"{'':10s} averaged over {average} steps: median z {a['median_z']:.3f}  p90 {a['p90_z']:.3f}  max "
                f"{a['max_z']:.2f}  sd ratio {a['median_sd_ratio']:.3f}  signed z mu {a['mu_median_signed_z']:+.2f}",
                flush=True,
            )
    # median over blocks of 100 compiled steps
    out["step_ms"] = 1e3 * float(np.median(step_times)) if step_times else float("nan")
    print(f"{name:10s} init {init_s:.1f} s, compile {compile_s:.1f} s, step {out['step_ms']:.2f} ms", flush=True)
    return out


def main(argv=None):
    p = _common.parser(__doc__)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of MovieLens-27M's rows and levels")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--eval-at", default="0,500,2000", help="step counts at which to summarize and score")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--draws", type=int, default=200, help="posterior_summary draws per element")
    p.add_argument("--sd-levels", type=int, default=32, help="levels whose exact sd is computed (CG solve each)")
    p.add_argument("--guides", default="AutoPAVI,AutoNormal", help="any of crossed_long.py's (e.g. 'AutoNormal(fast draw)')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--average", type=int, default=0, help="also score the params averaged over this many steps (AverageParams)")
    p.add_argument("--cache", default=None, help="npz of the exact reference (default: /tmp, keyed by size)")
    p.add_argument("--quick", action="store_true", help="smoke run: 0.2% of the sizes, 20 steps, 50 draws")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.scale, args.eval_at, args.draws, args.sd_levels = 0.002, "20", 50, 8
    S, L, N = (max(int(round(v * args.scale)), 2) for v in (USERS, ITEMS, ROWS))
    cache = args.cache or os.path.join(tempfile.gettempdir(), f"crossed_scale_ref_{S}x{L}x{N}_{args.seed}_{args.sd_levels}.npz")
    t0 = time.perf_counter()
    data, _ = cl.simulate(S, L, N, args.seed)
    print(f"{N:,} rows, {S:,} x {L:,} levels: simulated in {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    ref = reference(*data, S, L, args.sd_levels, args.seed, cache)
    ref_s = time.perf_counter() - t0
    print(f"exact reference in {ref_s:.1f} s (cache {cache})", flush=True)
    eval_at = sorted(_common.parse_list(args.eval_at, int))
    rows = {}
    for name in _common.parse_list(args.guides, str):
        rows[name] = run(name, data, S, L, args.batch, eval_at, args.lr, args.draws, args.seed, ref, args.average)
    if args.out:
        _common.write_json(
            args.out,
            _common.record("crossed_scale", __file__, argv, args, _common.machine_info(), t0, rows=N, levels=[S, L], reference_s=ref_s, guides=rows),
        )
    return rows


if __name__ == "__main__":
    main()
