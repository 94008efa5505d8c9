"""Streamed full-plate posterior summaries at scale, checked against the exact posterior.

Model: :func:`numpyro_pavi.examples.models.random_effects` (``G`` groups of ``M`` observations in
``K`` dims, ``G K + K`` latents), whose posterior is known exactly
(:func:`numpyro_pavi.examples.exact.random_effects_posterior`). One ``AutoPAVI`` (default options) is
trained for ``--steps`` constant-rate Adam steps on ``--batch`` groups per step, then
``guide.posterior_summary`` streams ``--num-samples`` draws of every latent in chunks of
``--chunk`` groups into per-group means, sds and 5/50/95% quantiles.

Measured: the summary's wall time (compilation included) and throughput (latent draws per
second); peak RSS before and after it (``ru_maxrss``, a process-wide high-water mark) against
the memory all draws would take if kept (``latents x num_samples x 4`` bytes) and the
machine's RAM; and the summaries' error against the exact posterior, in exact posterior sds
(median and max over groups of ``|mean - exact mean| / exact sd``, median of ``sd / exact
sd``, median error of the 5% and 95% quantiles).

Examples::

    python benchmarks/streamed_summary.py --quick
    python benchmarks/streamed_summary.py --groups 10000000 --M 2 --num-samples 300 --chunk 65536
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from scipy.stats import norm

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects


def model(x, subsample_size=None):
    random_effects(x, subsample_size=subsample_size)


def ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        return None


def build_parser():
    p = _common.parser(__doc__)
    p.add_argument("--groups", type=int, default=1_000_000, help="groups G")
    p.add_argument("--M", type=int, default=2, help="observations per group")
    p.add_argument("--K", type=int, default=2, choices=(1, 2), help="event dimension")
    p.add_argument("--batch", type=int, default=256, help="groups per training step")
    p.add_argument("--steps", type=int, default=2000, help="training steps (constant-rate Adam)")
    p.add_argument("--lr", type=float, default=3e-3)
    _common.add_laplace_flag(p, "(none: this benchmark is new)")
    p.add_argument("--num-samples", type=int, default=100, help="posterior draws per latent")
    p.add_argument("--chunk", type=int, default=65536, help="groups per chunk of the summary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "streamed_summary.json"))
    p.add_argument("--quick", action="store_true", help="tiny run (G=300, 50 draws)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.groups, args.steps, args.num_samples, args.chunk, args.batch = 300, 200, 50, 64, 64
    t_start = time.perf_counter()
    info = _common.machine_info()
    x = np.asarray(simulate_random_effects(jax.random.PRNGKey(args.seed), args.groups, args.M, args.K))
    guide = AutoPAVI(model, laplace=args.laplace)
    svi = SVI(model, guide, optax.adam(args.lr), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(args.seed + 1), x, args.batch)
    update = jax.jit(svi.update, static_argnums=2)
    state, _ = update(state, x, args.batch)
    jax.block_until_ready(state)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, loss = update(state, x, args.batch)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0
    params = svi.get_params(state)
    num_latents = guide.structure.num_latent_elements()
    rss_before = _common.peak_rss_mb()
    t0 = time.perf_counter()
    stats = guide.posterior_summary(
        jax.random.PRNGKey(args.seed + 2),
        params,
        x,
        num_samples=args.num_samples,
        quantiles=(0.05, 0.5, 0.95),
        chunk_size=args.chunk,
        progress_bar=not args.quick,
    )
    summary_s = time.perf_counter() - t0
    rss_after = _common.peak_rss_mb()
    exact = random_effects_posterior(x)
    mean, sd = exact["mu_g_mean"], exact["mu_g_sd"]  # (G, K)
    got_mean, got_sd = stats["mu_g"]["mean"][:, 0], stats["mu_g"]["sd"][:, 0]
    q = stats["mu_g"]["quantiles"][:, :, 0]  # (3, G, K)
    err = np.abs(got_mean - mean) / sd
    z05, z95 = norm.ppf(0.05), norm.ppf(0.95)
    result = {
        "groups": args.groups,
        "num_latents": num_latents,
        "num_samples": args.num_samples,
        "chunk_groups": args.chunk,
        "num_chunks": -(-args.groups // args.chunk),
        "setup_s": setup_s,
        "train_s": train_s,
        "final_loss": float(loss),
        "summary_s": summary_s,
        "latent_draws_per_s": num_latents * args.num_samples / summary_s,
        "peak_rss_mb_before_summary": rss_before,
        "peak_rss_mb_after_summary": rss_after,
        "all_draws_would_take_gib": num_latents * args.num_samples * 4 / 2**30,
        "summaries_gib": sum(v.nbytes for s in stats.values() for v in s.values()) / 2**30,
        "ram_gib": ram_gib(),
        "mu_g_median_mean_error_sd": float(np.median(err)),
        "mu_g_max_mean_error_sd": float(np.max(err)),
        "mu_g_median_sd_ratio": float(np.median(got_sd / sd)),
        "mu_g_median_q05_error_sd": float(np.median(np.abs(q[0] - (mean + z05 * sd)) / sd)),
        "mu_g_median_q95_error_sd": float(np.median(np.abs(q[2] - (mean + z95 * sd)) / sd)),
        "mu_mean_error_sd": (np.abs(stats["mu"]["mean"] - exact["mu_mean"]) / exact["mu_sd"]).tolist(),
        "all_finite": bool(all(np.isfinite(v).all() for s in stats.values() for v in s.values())),
    }
    out = _common.record("streamed_summary", __file__, argv, args, info, t_start, result=result)
    _common.write_json(args.out, out)
    for k, v in result.items():
        print(f"{k:>30}: {v}")
    return out


if __name__ == "__main__":
    main()
