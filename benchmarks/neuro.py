"""Scaling of AutoPAVI on a synthetic multi-session hierarchical parcellation model.

A continuous stand-in for the HCP application of the PAVI paper (after the multi-session
hierarchical Bayesian model of Kong et al., 2019). ``L`` networks, ``S`` subjects, ``T``
sessions per subject, ``V`` vertices per session, ``F`` features per vertex::

    mu_net[l]          ~ N(0, s_net^2 I_F)                      globals         (L, F)
    mu_subj[s, l]      ~ N(mu_net[l], s_subj^2 I_F)             plate subjects  (S, L, F)
    mu_sess[s, t, l]   ~ N(mu_subj[s, l], s_sess^2 I_F)         subjects x sessions (S, T, L, F)
    m[s, t, v]         = sum_l w[v, l] mu_sess[s, t, l]         (deterministic)
    z[s, t, v]         ~ N(m[s, t, v], s_vert^2 I_F)            subjects x sessions x vertices (S, T, V, F)
    y[s, t, v]         ~ N(z[s, t, v], s_obs^2 I_F)             observed, same plates

Design choice (the continuous relaxation): the discrete vertex-to-network labels of Kong et
al. are replaced by **fixed, known soft assignments** ``w`` (``V x L``, rows on the simplex,
drawn once from a softmax of Gaussian logits and shared by all subjects and sessions, like a
group-level prior parcellation), and every vertex keeps a **continuous latent profile**
``z[s, t, v]`` in the plates subjects x sessions x vertices. All latents are continuous, so
this is a valid NumPyro model for SVI; with ``--no-vertex-latents`` the ``z`` level is
integrated out (``y ~ N(m, (s_vert^2 + s_obs^2) I_F)``) and only the network profiles are
latent.

Plates: ``subjects`` (``dim=-3``, subsampled to ``--batch`` subjects per step), ``sessions``
(``dim=-2``), ``vertices`` (``dim=-1``); profiles have event shape ``(L, F)``, vertex
profiles ``(F,)``.

**Latent-parameter count**: the number of scalar latent coordinates over the *full* plates,
``guide.structure.num_latent_elements()``, i.e. ``L F + S L F + S T L F + S T V F`` (the
last term only with vertex latents). This is the paper's way of counting the size of a
model ("parameters" = latent coordinates), not the number of guide parameters (also
reported, and constant in ``S`` with the set encoding).

Measured per size: time-to-plateau (training time until the moving average of the training
loss over ``--window`` steps improves by less than ``--rtol`` (relative) ``--patience``
windows in a row), throughput (latent coordinates x steps / s), seconds per step, peak RSS
(``ru_maxrss``, process-wide high-water mark: sizes run smallest first), and the time of
``guide.sample_posterior`` over the full plates (chunked by ``--chunk-size`` plate elements;
compile and run timed separately).

Examples::

    python benchmarks/neuro.py --quick
    python benchmarks/neuro.py --subjects 30,100,300          # ~1e5 .. 1e6 latents
    python benchmarks/neuro.py --subjects 3000 --max-seconds 600   # ~1e7 latents (GPU)
"""

from __future__ import annotations

import argparse
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
from numpyro.infer.initialization import init_to_median

from numpyro_pavi import AutoPAVI

SCALES = {"s_net": 1.0, "s_subj": 0.5, "s_sess": 0.3, "s_vert": 0.2, "s_obs": 0.1}


def parcellation_model(y, w, *, subsample_size=None, vertex_latents=True, **scales):
    """The multi-session model above; ``y`` is ``(S, T, V, F)``, ``w`` is ``(V, L)``."""
    sc = {**SCALES, **scales}
    y = jnp.asarray(y)
    S, T, V, F = y.shape
    L = w.shape[1]
    mu_net = numpyro.sample("mu_net", dist.Normal(jnp.zeros((L, F)), sc["s_net"]).to_event(2))
    with numpyro.plate("subjects", S, subsample_size=subsample_size, dim=-3) as idx:
        mu_subj = numpyro.sample("mu_subj", dist.Normal(mu_net, sc["s_subj"]).to_event(2))  # (B, 1, 1, L, F)
        y_b = y[idx]
        with numpyro.plate("sessions", T, dim=-2):
            mu_sess = numpyro.sample("mu_sess", dist.Normal(mu_subj, sc["s_sess"]).to_event(2))  # (B, T, 1, L, F)
            m = jnp.einsum("vl,btlf->btvf", w, mu_sess[:, :, 0])  # (B, T, V, F)
            with numpyro.plate("vertices", V, dim=-1):
                if vertex_latents:
                    z = numpyro.sample("z", dist.Normal(m, sc["s_vert"]).to_event(1))
                    numpyro.sample("y", dist.Normal(z, sc["s_obs"]).to_event(1), obs=y_b)
                else:
                    s = (sc["s_vert"] ** 2 + sc["s_obs"] ** 2) ** 0.5
                    numpyro.sample("y", dist.Normal(m, s).to_event(1), obs=y_b)


def simulate(key, S, T, V, L, F, vertex_latents=True):
    """Data ``y (S, T, V, F)`` and soft assignments ``w (V, L)`` from the model's prior."""
    k = jax.random.split(key, 6)
    sc = SCALES
    w = jax.nn.softmax(2.0 * jax.random.normal(k[0], (V, L)), -1)
    mu_net = sc["s_net"] * jax.random.normal(k[1], (L, F))
    mu_subj = mu_net + sc["s_subj"] * jax.random.normal(k[2], (S, L, F))
    mu_sess = mu_subj[:, None] + sc["s_sess"] * jax.random.normal(k[3], (S, T, L, F))
    m = jnp.einsum("vl,stlf->stvf", w, mu_sess)
    z = m + sc["s_vert"] * jax.random.normal(k[4], m.shape)
    y = z + sc["s_obs"] * jax.random.normal(k[5], m.shape)
    return y, w


def run_size(S: int, args) -> dict:
    T, V, L, F = args.sessions, args.vertices, args.networks, args.features
    y, w = simulate(jax.random.PRNGKey(args.seed), S, T, V, L, F)
    y = jax.block_until_ready(y)
    B = min(args.batch, S)
    vl = args.vertex_latents

    def model(y, w, subsample_size=None):
        parcellation_model(y, w, subsample_size=subsample_size, vertex_latents=vl)

    guide = AutoPAVI(
        model,
        encoding=args.encoding,
        encoding_dim=args.encoding_dim,
        chunk_size=args.chunk_size,
        init_loc_fn=init_to_median(num_samples=15),
        laplace=args.laplace,
    )
    h = _common.Harness(model, guide, (y, w), {"subsample_size": B})
    run = h.start(args.lr, seed=args.seed)
    num_latents = guide.structure.num_latent_elements()

    # -- training until the loss plateaus -------------------------------------------------
    window, ma, plateau_count = args.window, [], 0
    reached, time_to_plateau, steps_to_plateau = False, None, None
    update = h._update
    state = run.state
    while run.steps < args.max_steps and run.train_s < args.max_seconds:
        t0 = time.perf_counter()
        losses = []
        for _ in range(window):
            state, loss = update(state, y, w)
            losses.append(loss)
        losses = jax.block_until_ready(jnp.stack(losses))
        run.train_s += time.perf_counter() - t0
        run.steps += window
        cur = float(jnp.mean(losses))
        if ma and np.isfinite(cur):
            rel = (ma[-1][2] - cur) / abs(cur)
            plateau_count = plateau_count + 1 if rel < args.rtol else 0
        ma.append((run.steps, run.train_s, cur))
        if not np.isfinite(cur):
            break
        if plateau_count >= args.patience:
            reached = True
            # the plateau started `patience` windows ago
            steps_to_plateau, time_to_plateau = ma[-1 - args.patience][0], ma[-1 - args.patience][1]
            break
    run.state = state
    rss_train = _common.peak_rss_mb()

    # -- posterior over the full plates (chunked) -------------------------------------------
    params = run.params
    drawn = {"skipped": True}
    if args.sample_posterior:
        sample = jax.jit(lambda key, p, y, w: guide.sample_posterior(key, p, y, w))
        t0 = time.perf_counter()
        out = jax.block_until_ready(sample(jax.random.PRNGKey(1), params, y, w))
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(sample(jax.random.PRNGKey(2), params, y, w))
        run_s = time.perf_counter() - t0
        drawn = {
            "chunk_size": args.chunk_size,
            "compile_and_first_s": first_s,
            "run_s": run_s,
            "latents_per_s": num_latents / max(run_s, 1e-12),
            "shapes": {k: list(v.shape) for k, v in out.items()},
            "all_finite": bool(all(np.isfinite(np.asarray(v)).all() for v in out.values())),
        }
        del out
    rss_sample = _common.peak_rss_mb()
    summary = {"skipped": True}
    if args.summary_samples:
        # streamed per-element mean, sd and quantiles: never all draws at once
        t0 = time.perf_counter()
        stats = guide.posterior_summary(
            jax.random.PRNGKey(3),
            params,
            y,
            w,
            num_samples=args.summary_samples,
            chunk_size=args.summary_chunk,
            progress_bar=args.progress,
        )
        summary_s = time.perf_counter() - t0
        summary = {
            "num_samples": args.summary_samples,
            "chunk_subjects": args.summary_chunk,
            "seconds": summary_s,
            "latent_draws_per_s": num_latents * args.summary_samples / summary_s,
            "all_draws_would_take_gib": num_latents * args.summary_samples * 4 / 2**30,
            "summaries_gib": sum(v.nbytes for st in stats.values() for v in st.values()) / 2**30,
            "all_finite": bool(all(np.isfinite(v).all() for st in stats.values() for v in st.values())),
            "mean_sd_of_z": float(np.mean(stats["z"]["sd"])) if "z" in stats else None,
            "peak_rss_mb_process": _common.peak_rss_mb(),
        }
        del stats
    return {
        "subjects": S,
        "sessions": T,
        "vertices": V,
        "networks": L,
        "features": F,
        "batch_subjects": B,
        "num_latents": num_latents,
        "num_guide_params": run.num_params,
        "num_observations": int(np.prod(y.shape)),
        "steps": run.steps,
        "train_s": run.train_s,
        "s_per_step": run.train_s / max(run.steps, 1),
        "throughput_latents_steps_per_s": num_latents * run.steps / max(run.train_s, 1e-12),
        "plateau_reached": reached,
        "steps_to_plateau": steps_to_plateau,
        "time_to_plateau_s": time_to_plateau,
        "final_loss_ma": ma[-1][2] if ma else None,
        "loss_ma_curve": ma,
        "setup_s": h.setup_s,
        "compile_s": h.compile_s,
        "peak_rss_mb_after_training": rss_train,
        "sample_posterior": drawn,
        "peak_rss_mb_after_sample_posterior": rss_sample,
        "posterior_summary": summary,
        "peak_rss_mb_process": _common.peak_rss_mb(),
    }


def growth(rows: list[dict]) -> dict:
    """How the measures grow from the smallest to the largest size."""
    if len(rows) < 2:
        return {}
    a, b = rows[0], rows[-1]

    def ratio(key):
        va, vb = a.get(key), b.get(key)
        return None if (va is None or vb is None or va == 0) else vb / va

    return {
        "from_latents": a["num_latents"],
        "to_latents": b["num_latents"],
        "latents_ratio": b["num_latents"] / a["num_latents"],
        "s_per_step_ratio": ratio("s_per_step"),
        "time_to_plateau_ratio": ratio("time_to_plateau_s"),
        "throughput_ratio": ratio("throughput_latents_steps_per_s"),
        "guide_params_ratio": ratio("num_guide_params"),
        "sample_posterior_run_ratio": (
            b["sample_posterior"]["run_s"] / max(a["sample_posterior"]["run_s"], 1e-12)
            if "run_s" in a["sample_posterior"] and "run_s" in b["sample_posterior"]
            else None
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(__doc__)
    p.add_argument("--subjects", default="30,100,300", help="comma list of subject counts S (one run each)")
    p.add_argument("--sessions", type=int, default=4, help="sessions per subject T")
    p.add_argument("--vertices", type=int, default=200, help="vertices per session V")
    p.add_argument("--networks", type=int, default=17, help="networks L")
    p.add_argument("--features", type=int, default=4, help="features per vertex F")
    p.add_argument("--no-vertex-latents", dest="vertex_latents", action="store_false")
    p.add_argument("--batch", type=int, default=8, help="subjects per step")
    p.add_argument("--encoding", default="set", choices=("set", "free", "hybrid", "auto"))
    p.add_argument("--encoding-dim", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=2**16, help="AutoPAVI chunk_size for sample_posterior")
    p.add_argument(
        "--no-sample-posterior",
        dest="sample_posterior",
        action="store_false",
        help="skip the full-plate sample_posterior draws (one draw of every latent held in memory)",
    )
    p.add_argument(
        "--summary-samples", type=int, default=0, help="draws per latent of a streamed posterior_summary (0: skip)"
    )
    p.add_argument("--summary-chunk", type=int, default=64, help="subjects per chunk of the streamed summary")
    p.add_argument("--progress", action="store_true", help="progress bar over the summary's chunks")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    p.add_argument("--window", type=int, default=200, help="steps per moving-average window")
    p.add_argument(
        "--rtol", type=float, default=1e-3, help="plateau: relative improvement of the window mean below this"
    )
    p.add_argument("--patience", type=int, default=2, help="windows in a row below --rtol")
    p.add_argument("--max-seconds", type=float, default=60.0, help="training-time budget per size")
    p.add_argument("--max-steps", type=int, default=50_000)
    _common.add_laplace_flag(p, "section 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "neuro.json"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.subjects, args.sessions, args.vertices, args.networks, args.features = "6,12", 2, 12, 3, 2
        args.batch, args.window, args.max_steps, args.max_seconds = 4, 10, 40, 20.0
        args.chunk_size = 64
        args.summary_samples, args.summary_chunk = 20, 4
    sizes = sorted(_common.parse_list(args.subjects, int))
    info = _common.machine_info()
    t_start = time.perf_counter()
    rows = []
    head = f"{'S':>6}{'latents':>11}{'guide par':>10}{'steps':>7}{'train s':>9}{'ms/step':>9}{'plateau s':>10}{'lat*steps/s':>13}{'sample s':>9}{'rss MiB':>9}"
    print(head)
    for S in sizes:
        r = run_size(S, args)
        rows.append(r)
        tp = r["time_to_plateau_s"]
        print(
            f"{S:>6}{r['num_latents']:>11}{r['num_guide_params']:>10}{r['steps']:>7}{r['train_s']:>9.2f}"
            f"{1e3 * r['s_per_step']:>9.3g}{(f'{tp:.3g}' if tp is not None else '>' + format(r['train_s'], '.3g')):>10}"
            f"{r['throughput_latents_steps_per_s']:>13.3g}{r['sample_posterior'].get('run_s', float('nan')):>9.3g}"
            f"{r['peak_rss_mb_process']:>9.0f}"
            + (f"  summary {r['posterior_summary']['seconds']:.3g} s" if "seconds" in r["posterior_summary"] else ""),
            flush=True,
        )
    out = _common.record(
        "neuro",
        __file__,
        argv,
        args,
        info,
        t_start,
        results=rows,
        growth=growth(rows),
    )
    _common.write_json(args.out, out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
