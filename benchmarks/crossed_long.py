"""Crossed factors in long format, rows subsampled: accuracy against the exact posterior and
cost per step, each guide against ``AutoNormal`` in the same run.

The data (issue 26's recipe): ``S`` students x ``L`` lecturers, ``N`` rows, each a
(student, lecturer) pair drawn with probabilities proportional to lognormal(0, 1) weights for
students and lognormal(0, 1.2) for lecturers (skewed counts, as in real data);
``y = mu + a[s] + b[l] + 0.9 eps``, ``mu ~ N(0, 1)``, ``a ~ N(0, 0.3^2)``,
``b ~ N(0, 0.4^2)``, variances fixed in the model. The posterior is Gaussian: its precision
is sparse and its mean and marginal variances come from a dense solve (up to a few thousand
latents) or, above ``--dense-max``, means from preconditioned conjugate gradients and
variances on a sample of levels.

Each guide is trained with constant Adam on ``numpyro.plate("ratings", N,
subsample_size=B)``; after training, ``--draws`` posterior draws give the per-latent mean
error in posterior sds and the sd ratio. Per-step cost is the median over timed blocks of
the compiled ``svi.update``.

Examples::

    python benchmarks/crossed_long.py --quick
    python benchmarks/crossed_long.py --guides AutoPAVI,AutoNormal --steps 2000
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.subsampling import subsample_draws

SD_A, SD_B, SD_Y = 0.3, 0.4, 0.9


def simulate(S: int, L: int, N: int, seed: int = 0):
    """``(s, l, y)`` int32/int32/float32 arrays of ``N`` rows and the true effects."""
    rng = np.random.default_rng(seed)
    ws = rng.lognormal(0.0, 1.0, S)
    wl = rng.lognormal(0.0, 1.2, L)
    s = rng.choice(S, N, p=ws / ws.sum()).astype(np.int32)
    l = rng.choice(L, N, p=wl / wl.sum()).astype(np.int32)
    mu = rng.normal()
    a, b = SD_A * rng.normal(size=S), SD_B * rng.normal(size=L)
    y = (mu + a[s] + b[l] + SD_Y * rng.normal(size=N)).astype(np.float32)
    return (s, l, y), {"mu": mu, "a": a, "b": b}


def model(s, l, y, S: int, L: int, batch: int | None = None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("students", S):
        a = numpyro.sample("a", dist.Normal(0.0, SD_A))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, SD_B))
    with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[s[r]] + b[l[r]], SD_Y), obs=y[r])


def _precision(s, l, S: int, L: int):
    """Sparse pieces of the posterior precision of ``(mu, a, b)``: counts and the cross table."""
    ns = np.bincount(s, minlength=S).astype(float)
    nl = np.bincount(l, minlength=L).astype(float)
    return ns, nl


def exact(
    s, l, y, S: int, L: int, dense_max: int = 6000, num_sd_levels: int = 400, seed: int = 0, evidence: bool = True
):
    """Posterior means ``{"mu", "a", "b"}``, sds (``nan`` where not computed) and the log
    evidence (``nan`` without ``evidence``: above a few 1e5 latents the sparse LU of the
    crossed precision fills in beyond memory)."""
    ns, nl = _precision(s, l, S, L)
    n = 1 + S + L
    iy = 1.0 / SD_Y**2
    # b = X^T y / sd_y^2, P = prior + X^T X / sd_y^2 with X = [1, onehot(s), onehot(l)]
    rhs = np.concatenate([[y.sum()], np.bincount(s, weights=y, minlength=S), np.bincount(l, weights=y, minlength=L)]) * iy
    diag = np.concatenate([[1.0 + len(y) * iy], 1 / SD_A**2 + ns * iy, 1 / SD_B**2 + nl * iy])
    if n <= dense_max:
        P = np.diag(diag)
        P[0, 1 : 1 + S] = P[1 : 1 + S, 0] = ns * iy
        P[0, 1 + S :] = P[1 + S :, 0] = nl * iy
        cross = np.zeros((S, L))
        np.add.at(cross, (s, l), iy)
        P[1 : 1 + S, 1 + S :] = cross
        P[1 + S :, 1 : 1 + S] = cross.T
        cov = np.linalg.inv(P)
        mean = cov @ rhs
        sd = np.sqrt(np.diag(cov))
    else:
        import scipy.sparse as sp
        import scipy.sparse.linalg as spl

        rows = np.arange(len(y))
        X = sp.hstack(
            [
                sp.csr_matrix(np.ones((len(y), 1))),
                sp.csr_matrix((np.ones(len(y)), (rows, s)), shape=(len(y), S)),
                sp.csr_matrix((np.ones(len(y)), (rows, l)), shape=(len(y), L)),
            ]
        ).tocsr()
        P = (X.T @ X) * iy + sp.diags(np.concatenate([[1.0], np.full(S, 1 / SD_A**2), np.full(L, 1 / SD_B**2)]))
        M = sp.diags(1 / diag)
        mean, info = spl.cg(P, rhs, M=M, rtol=1e-10, maxiter=5000)
        assert info == 0, info
        sd = np.full(n, np.nan)
        rng = np.random.default_rng(seed)
        for j in np.concatenate([[0], 1 + rng.choice(S, num_sd_levels // 2, replace=False), 1 + S + rng.choice(L, num_sd_levels // 2, replace=False)]):
            e = np.zeros(n)
            e[j] = 1.0
            col, info = spl.cg(P, e, M=M, rtol=1e-8, maxiter=5000)
            sd[j] = np.sqrt(col[j])
    split = lambda v: {"mu": v[:1], "a": v[1 : 1 + S], "b": v[1 + S :]}  # noqa: E731
    # log p(y) = -N/2 log(2 pi sd_y^2) - y'y / (2 sd_y^2) + (log|D| - log|P| + b'P^{-1}b) / 2
    # with D the prior precision, P the posterior one and b = X'y / sd_y^2
    if not evidence:
        return split(mean), split(sd), float("nan")
    if n <= dense_max:
        logdet_p = np.linalg.slogdet(P)[1]
    else:
        lu = spl.splu(P.tocsc())
        logdet_p = float(np.sum(np.log(np.abs(lu.U.diagonal()))))
    logdet_d = S * np.log(SD_A**-2) + L * np.log(SD_B**-2)
    log_evidence = (
        -0.5 * len(y) * np.log(2 * np.pi * SD_Y**2)
        - 0.5 * float(np.sum(np.asarray(y, float) ** 2)) * iy
        + 0.5 * (logdet_d - logdet_p + float(rhs @ mean))
    )
    return split(mean), split(sd), log_evidence


def conditional_sds(s, l, S: int, L: int) -> dict:
    """Each element's sd given every other latent (the per-element Laplace width)."""
    ns, nl = _precision(s, l, S, L)
    iy = 1.0 / SD_Y**2
    return {"a": 1 / np.sqrt(1 / SD_A**2 + ns * iy), "b": 1 / np.sqrt(1 / SD_B**2 + nl * iy)}


GUIDES = {
    "AutoPAVI": lambda m: AutoPAVI(m),
    "AutoPAVI(laplace=False)": lambda m: AutoPAVI(m, laplace=False),
    "AutoPAVI(refresh_every=10**9)": lambda m: AutoPAVI(m, refresh_every=10**9),
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoNormal(fast draw)": lambda m: AutoNormal(m),
}
#: the model as a guide trains it: AutoNormal's guide opens no plate of the rows, so the
#: model draws their indices; "fast draw" draws them as AutoPAVI's plates do
#: (numpyro_pavi.subsampling), to show what part of a step is NumPyro's O(N) draw
MODELS = {"AutoNormal(fast draw)": subsample_draws}


def score(samples: dict, mean: dict, sd: dict) -> dict:
    """:func:`score_moments` of the draws' means and sds."""
    flat = {k: np.asarray(samples[k]).reshape(samples[k].shape[0], -1) for k in ("mu", "a", "b")}
    return score_moments({k: v.mean(0) for k, v in flat.items()}, {k: v.std(0) for k, v in flat.items()}, mean, sd)


def score_moments(post_mean: dict, post_sd: dict, mean: dict, sd: dict) -> dict:
    """|mean error| in exact sds and sd ratios over the latents whose exact sd is known."""
    errs, ratios = [], []
    for k in ("mu", "a", "b"):
        m, s = np.asarray(post_mean[k]).reshape(-1), np.asarray(post_sd[k]).reshape(-1)
        ok = np.isfinite(sd[k])
        errs.append(np.abs(m - mean[k])[ok] / sd[k][ok])
        ratios.append(s[ok] / sd[k][ok])
    e, r = np.concatenate(errs), np.concatenate(ratios)
    return {
        "median_z": float(np.median(e)),
        "p90_z": float(np.quantile(e, 0.9)),
        "max_z": float(e.max()),
        "median_sd_ratio": float(np.median(r)),
        "p10_sd_ratio": float(np.quantile(r, 0.1)),
        "p90_sd_ratio": float(np.quantile(r, 0.9)),
    }


def fit(
    name: str, data, S: int, L: int, batch, steps: int, lr: float, draws: int, seed: int,
    block: int = 100, decay: float = 1.0, summarize: bool = False,
):  # fmt: skip
    s, l, y = (jnp.asarray(v) for v in data)
    trained = MODELS.get(name, lambda m: m)(model)
    guide = GUIDES[name](trained)
    svi = SVI(trained, guide, _common.adam(lr, decay), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(seed), s, l, y, S, L, batch)
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    update = jax.jit(lambda st, s_, l_, y_: svi.update(st, s_, l_, y_, S, L, batch))
    t0 = time.perf_counter()
    update = update.lower(state, s, l, y).compile()
    compile_s = time.perf_counter() - t0
    block_times, losses = [], []
    for _ in range(max(steps // block, 1)):
        t0 = time.perf_counter()
        for _ in range(block):
            state, loss = update(state, s, l, y)
            losses.append(loss)
        jax.block_until_ready(state)
        block_times.append((time.perf_counter() - t0) / block)
    params = svi.get_params(state)
    elbo = Trace_ELBO(num_particles=10, vectorize_particles=False)
    full_loss = float(jax.jit(lambda p, k: elbo.loss(k, p, trained, guide, s, l, y, S, L, None))(params, jax.random.PRNGKey(seed + 2)))
    # the stored Laplace bases (AutoPAVI's non-learned state) travel with the params
    params = {**params, **(state.mutable_state or {})}

    @jax.jit
    def sampler(key):
        post = guide.sample_posterior(key, params, s, l, y, S, L, None, sample_shape=(draws,))
        return {k: post[k] for k in ("mu", "a", "b")}

    t0 = time.perf_counter()
    post = jax.block_until_ready(sampler(jax.random.PRNGKey(seed + 1)))
    draw_s = time.perf_counter() - t0
    t0 = time.perf_counter()  # compiled: the cost of the draws themselves
    jax.block_until_ready(sampler(jax.random.PRNGKey(seed + 3)))
    per_draw_ms = 1e3 * (time.perf_counter() - t0) / draws
    losses = np.asarray(jnp.stack(losses))
    summary = {}
    if summarize and isinstance(guide, AutoPAVI):
        # streamed per plate (students, then lecturers), from the stored bases
        t0 = time.perf_counter()
        summ = guide.posterior_summary(jax.random.PRNGKey(seed + 4), params, s, l, y, S, L, None, num_samples=draws, chunk_size=1024)
        summary = {"summary_s": time.perf_counter() - t0, "summary_peak_rss_mb": _common.peak_rss_mb(), "summary": summ}
    return post, {
        **summary,
        "init_s": init_s,
        "compile_s": compile_s,
        "step_ms": 1e3 * float(np.median(block_times)),
        "train_s": float(np.sum(block_times) * block),
        "draws_s": draw_s,
        "per_draw_ms": per_draw_ms,
        "loss_last100": float(losses[-100:].mean()),
        "full_data_loss": full_loss,
        "num_params": _common.count_params(params),
    }


def main(argv=None):
    p = _common.parser(__doc__)
    p.add_argument("--S", type=int, default=3000)
    p.add_argument("--L", type=int, default=1100)
    p.add_argument("--N", type=int, default=70000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--draws", type=int, default=1000)
    p.add_argument("--guides", default="AutoPAVI,AutoNormal")
    p.add_argument("--dense-max", type=int, default=6000)
    p.add_argument(
        "--full-batch-autonormal",
        default="",
        help="full-batch AutoNormal runs as lr:decay_per_step pairs, e.g. 0.01:1,0.1:0.997",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="also time AutoPAVI's streamed posterior_summary")
    p.add_argument("--quick", action="store_true", help="300 x 110 levels, 7,000 rows, 300 steps")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.S, args.L, args.N, args.batch, args.steps, args.draws = 300, 110, 7000, 256, 300, 300
    t_start = time.perf_counter()
    data, _ = simulate(args.S, args.L, args.N, args.seed)
    mean, sd, log_evidence = exact(*data, args.S, args.L, dense_max=args.dense_max)
    num_latent = 1 + args.S + args.L
    cond = conditional_sds(data[0], data[1], args.S, args.L)
    ratio = np.concatenate([cond["a"] / sd["a"], cond["b"] / sd["b"]])
    ratio = ratio[np.isfinite(ratio)]
    print(f"conditional/marginal sd: median {np.median(ratio):.3f}, p10 {np.quantile(ratio, 0.1):.3f}", flush=True)
    rows = {}
    runs = [(name, name, args.batch, args.lr, 1.0) for name in _common.parse_list(args.guides, str)]
    for pair in _common.parse_list(args.full_batch_autonormal, str):
        lr, decay = (float(v) for v in pair.split(":"))
        runs.append((f"AutoNormal full batch {lr:g}x{decay:g}", "AutoNormal", None, lr, decay))
    for label, name, batch, lr, decay in runs:
        post, cost = fit(name, data, args.S, args.L, batch, args.steps, lr, args.draws, args.seed, decay=decay, summarize=args.summary)
        summ = cost.pop("summary", None)
        rows[label] = {**cost, **score(post, mean, sd)}
        r = rows[label]
        if summ is not None:
            stats = {k: {"mean": summ[k]["mean"].reshape(1, -1), "sd": summ[k]["sd"]} for k in ("mu", "a", "b")}
            z = score({k: np.stack([v["mean"][0] - v["sd"].reshape(-1), v["mean"][0] + v["sd"].reshape(-1)]) for k, v in stats.items()}, mean, sd)
            r["summary_median_z"], r["summary_median_sd_ratio"] = z["median_z"], z["median_sd_ratio"]
            print(f"  posterior_summary: {r['summary_s']:.1f} s, peak RSS {r['summary_peak_rss_mb']:.0f} MB, "
                  f"median z {r['summary_median_z']:.3f}, median sd ratio {r['summary_median_sd_ratio']:.3f}", flush=True)
        r["elbo_gap_per_latent"] = (log_evidence + r["full_data_loss"]) / num_latent
        print(
            f"{label:26s} gap/latent {r['elbo_gap_per_latent']:.4f}  step {r['step_ms']:.3f} ms  init {r['init_s']:.1f}+{r['compile_s']:.1f} s  "
            f"loss {r['loss_last100']:.1f} full {r['full_data_loss']:.1f}  median z {r['median_z']:.3f} p90 {r['p90_z']:.3f} "
            f"max {r['max_z']:.2f}  sd ratio {r['median_sd_ratio']:.3f} [{r['p10_sd_ratio']:.3f}, {r['p90_sd_ratio']:.3f}]  "
            f"draws {r['draws_s']:.2f} s ({r['per_draw_ms']:.3f} ms/draw compiled)",
            flush=True,
        )
    print(f"log evidence {log_evidence:.2f}, {num_latent} latents", flush=True)
    if "AutoNormal" in rows:
        for name, r in rows.items():
            r["step_vs_autonormal"] = r["step_ms"] / rows["AutoNormal"]["step_ms"]
    if args.out:
        _common.write_json(args.out, _common.record("crossed_long", __file__, argv, args, _common.machine_info(), t_start, conditional_over_marginal_sd_median=float(np.median(ratio)), log_evidence=log_evidence, guides=rows))
    return rows


if __name__ == "__main__":
    main()
