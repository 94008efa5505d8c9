"""Time to a target ELBO on the Gaussian random-effects model: AutoNormal vs PAVI.

Model: :func:`numpyro_pavi.examples.models.random_effects` (``mu ~ N(0, .5^2 I_K)``, ``mu_g ~ N(mu,
.5^2 I_K)`` for ``N`` groups, ``x_gm ~ N(mu_g, .1^2 I_K)`` for ``M`` observations per group),
whose exact log-evidence ``log p(x)`` is known
(:func:`numpyro_pavi.examples.exact.random_effects_posterior`). For every ``N`` in ``--sizes`` one
data set is simulated and every method is trained on it in this process:

* ``normal_full``: ``AutoNormal``, full batch (every step sees all ``N`` groups). Its Adam
  learning rate is tuned over ``--lr-normal-full`` (a grid) at every ``N``; the best (the
  fastest to tolerance, or the lowest final gap if none reaches it) is reported.
* ``normal_sub``: ``AutoNormal`` with ``B = --batch`` groups per step.
* ``pavi_f``: ``AutoPAVI(encoding="free")`` (PAVI-F), ``B`` groups per step.
* ``pavi_e``: ``AutoPAVI(encoding="set")`` (PAVI-E), ``B`` groups per step.

All methods use Adam, constant-rate by default (``--decay`` makes it decay exponentially
to ``lr * decay`` at ``--decay-steps``, default ``--max-steps``; ``--decays-normal-full``
gives AutoNormal a grid of decays crossed with its learning rates), one ``Trace_ELBO`` particle per
step and the same initialisation strategy (``init_to_median(num_samples=15)``, initial scale
0.1). Every method's learning rate is a grid flag; by default only ``normal_full`` gets a
grid at every size (see ``benchmarks/RESULTS.md`` for how the others were chosen).

Every ``--eval-every`` steps the ELBO is estimated on the **full** data with a jitted
``Trace_ELBO(num_particles=--eval-particles).loss`` and compared with the exact log-evidence:
``gap = (log p(x) - ELBO) / N`` nats per group. A method has converged when
``gap <= --tol`` (0.02 by default), confirmed by a second evaluation with a fresh key. The
training time counts only the ``svi.update`` calls (a ``jax.jit``-wrapped update compiled
before timing and called from Python, as ``svi.run`` does; ``jax.block_until_ready`` at the
end of each block of steps); compilation, initialisation and evaluation are timed
separately and excluded. The evaluations still slow the steps after them (a full-data pass
evicts the caches: PAVI-E's 128-group step at 1e6 groups took 2.3-3.4 ms in 20-step blocks
between evaluations against 1.2-1.3 ms in a plain loop of an ad-hoc script, RESULTS
section 24), so ``--retime`` trains a run that
reached tolerance again from its start, with the same key, for the same number of steps
without evaluations, and reports that time as its time to tolerance (the first is kept as
``time_to_tol_with_evals_s``, the replay's gap at one more key as
``retimed_gap_per_group``). A 1-particle evaluation of PAVI-E's gap varies far more than
AutoNormal's (one global draw shifts every group's term: 0.022-0.20 nats/group over six
keys at one state at 1e5, RESULTS section 24): give it ``--eval-particles 8``. A run
stops at tolerance, at ``--max-seconds`` of training time, or at ``--max-steps``. With ``--race`` (default) a grid
member is also stopped once its training time exceeds the best time-to-tolerance found so
far for that method and size: it can no longer be the best.

Outputs: a JSON file (``--out``), a PNG (``--plot``: log-log gap per group vs training time,
one panel per ``N``) and a printed table with time-to-tolerance ratios against PAVI-E.

Peak memory is ``ru_maxrss`` of the whole process: a monotone high-water mark shared by
all methods and sizes that ran before (see ``_common.peak_rss_mb``).

Examples::

    python benchmarks/convergence.py --quick
    python benchmarks/convergence.py --sizes 1000,10000,100000 --max-seconds 120
    python benchmarks/convergence.py --sizes 1000000 --methods pavi_e,normal_full --max-seconds 600
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import numpy as np
from numpyro import handlers
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.initialization import init_to_median

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects

METHODS = ("normal_full", "normal_sub", "pavi_f", "pavi_e")
LABELS = {
    "normal_full": "AutoNormal full batch",
    "normal_sub": "AutoNormal subsampled",
    "pavi_f": "PAVI-F subsampled",
    "pavi_e": "PAVI-E subsampled",
}


def model(x, subsample_size=None):
    random_effects(x, subsample_size=subsample_size)


def make_guide(method: str, args) -> object:
    init = init_to_median(num_samples=15)
    if method in ("normal_full", "normal_sub"):
        return AutoNormal(model, init_loc_fn=init, init_scale=0.1)
    encoding = {"pavi_f": "free", "pavi_e": "set"}[method]
    return AutoPAVI(
        model, encoding=encoding, encoding_dim=args.encoding_dim, init_loc_fn=init, init_scale=0.1, laplace=args.laplace
    )


def make_harness(method: str, x, args) -> _common.Harness:
    """Guide, compiled update and full-data loss of one method on one data set."""
    N = int(x.shape[0])
    guide = make_guide(method, args)
    batch = None if method == "normal_full" else min(args.batch, N)
    eval_guide = None
    if method == "normal_sub":
        # AutoNormal opens its plates with the subsample size seen at setup: evaluate the
        # trained params with a second AutoNormal set up on the full data (same param names).
        eval_guide = make_guide("normal_full", args)
        with handlers.block():
            handlers.seed(eval_guide, 0)(x)
    return _common.Harness(
        model,
        guide,
        (x,),
        {"subsample_size": batch},
        eval_guide=eval_guide,
        eval_kwargs={"subsample_size": None},
        eval_particles=args.eval_particles,
    )


def run_one(harness: _common.Harness, lr: float, log_z: float, args, time_cap: float, decay: float) -> dict:
    """Train one method at one learning rate (decaying by ``decay`` in total) until tolerance or budget."""
    N = int(harness.train_args[0].shape[0])
    # the decay is the total factor over --max-steps
    decay_per_step = decay ** (1.0 / (args.decay_steps or args.max_steps))
    runner = harness.start(lr, seed=args.seed, decay_per_step=decay_per_step)
    curve = []  # (steps, train seconds, gap per group)
    key = jax.random.PRNGKey(args.seed + 12345)
    t_eval = 0.0

    def gap(k):
        nonlocal t_eval
        t0 = time.perf_counter()
        value = (runner.full_loss(k) + log_z) / N
        t_eval += time.perf_counter() - t0
        return value

    g0 = gap(jax.random.fold_in(key, 0))
    curve.append((0, 0.0, g0))
    reached = False
    steps_to_tol = time_to_tol = None
    while runner.steps < args.max_steps and runner.train_s < time_cap:
        n = min(args.eval_every, args.max_steps - runner.steps)
        runner.train(n)
        g = gap(jax.random.fold_in(key, runner.steps))
        if not math.isfinite(g):
            curve.append((runner.steps, runner.train_s, g))
            break
        if g <= args.tol:
            # confirm with an independent evaluation (guards against Monte Carlo noise)
            g2 = gap(jax.random.fold_in(key, 10**9 + runner.steps))
            g = 0.5 * (g + g2)
            curve.append((runner.steps, runner.train_s, g))
            if g <= args.tol:
                reached, steps_to_tol, time_to_tol = True, runner.steps, runner.train_s
                break
        else:
            curve.append((runner.steps, runner.train_s, g))
    stop = "tolerance" if reached else ("max_steps" if runner.steps >= args.max_steps else "time")
    if not reached and not math.isfinite(curve[-1][2]):
        stop = "diverged"
    return {
        "lr": lr,
        "decay": decay,
        "decay_per_step": decay_per_step,
        "reached": reached,
        "steps_to_tol": steps_to_tol,
        "time_to_tol_s": time_to_tol,
        "steps": runner.steps,
        "train_s": runner.train_s,
        "s_per_step": runner.train_s / max(runner.steps, 1),
        "final_gap_per_group": curve[-1][2],
        "best_gap_per_group": min(c[2] for c in curve if math.isfinite(c[2])) if curve else None,
        "stopped_by": stop,
        "num_params": runner.num_params,
        "init_s": runner.init_s,
        "setup_s": harness.setup_s,
        "compile_s": harness.compile_s,
        "eval_compile_s": harness.eval_compile_s,
        "eval_total_s": t_eval,
        "peak_rss_mb_process": _common.peak_rss_mb(),
        "curve": curve,
    }


def pick_best(runs: list[dict]) -> dict:
    done = [r for r in runs if r["reached"]]
    if done:
        return min(done, key=lambda r: r["time_to_tol_s"])
    finite = [r for r in runs if r["final_gap_per_group"] is not None and math.isfinite(r["final_gap_per_group"])]
    return min(finite, key=lambda r: r["best_gap_per_group"]) if finite else runs[0]


def ratio_entry(best: dict, ref: dict | None) -> dict:
    """Time-to-tolerance of ``best`` over the reference's (PAVI-E), with bounds when unreached."""
    if ref is None or not ref["reached"]:
        if ref is not None and best["reached"]:
            # reference did not converge within its budget: ratio is at most this
            return {"ratio": None, "upper_bound": best["time_to_tol_s"] / ref["train_s"]}
        return {"ratio": None}
    if best["reached"]:
        return {"ratio": best["time_to_tol_s"] / ref["time_to_tol_s"]}
    return {"ratio": None, "lower_bound": best["train_s"] / ref["time_to_tol_s"]}


def fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def print_table(results: dict, tol: float) -> str:
    lines = []
    head = (
        f"{'N':>8} {'method':<24} {'lr':>7} {'params':>9} {'steps→tol':>9} {'time→tol s':>10} "
        f"{'ms/step':>8} {'compile s':>9} {'final gap':>10} {'rss MiB':>8} {'time / PAVI-E':>15}"
    )
    lines.append(f"ELBO gap tolerance: {tol} nats/group; time excludes compilation and evaluation")
    lines.append(head)
    for N, entry in results.items():
        for method, m in entry["methods"].items():
            b = m["best"]
            rs = _common.ratio_text(m["vs_pavi_e"])
            steps = b["steps_to_tol"] if b["reached"] else f">{b['steps']}"
            t = fmt(b["time_to_tol_s"]) if b["reached"] else f">{b['train_s']:.3g}"
            lines.append(
                f"{N:>8} {LABELS[method]:<24} {b['lr']:>7.0e} {b['num_params']:>9} {steps!s:>9} {t:>10} "
                f"{1e3 * b['s_per_step']:>8.3g} {b['compile_s']:>9.3g} {fmt(b['final_gap_per_group']):>10} "
                f"{b['peak_rss_mb_process']:>8.0f} {rs:>15}"
            )
    text = "\n".join(lines)
    print(text)
    return text


def plot(results: dict, tol: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4.6 * len(sizes), 3.8), squeeze=False)
    colors = {"normal_full": "C0", "normal_sub": "C1", "pavi_f": "C2", "pavi_e": "C3"}
    for ax, N in zip(axes[0], sizes):
        for method, m in results[N]["methods"].items():
            b = m["best"]
            pts = [(t, g) for s, t, g in b["curve"] if s > 0 and g is not None and math.isfinite(g)]
            if not pts:
                continue
            t, g = zip(*pts)
            g = np.maximum(np.asarray(g), 1e-4)  # MC noise can make the gap slightly negative
            ax.loglog(t, g, "-o", ms=2.5, color=colors[method], label=f"{LABELS[method]} (lr {b['lr']:g})")
        ax.axhline(tol, color="k", ls="--", lw=0.8)
        ax.set_title(f"N = {N} groups")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("ELBO gap (nats / group)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(__doc__)
    p.add_argument("--sizes", default="1000,10000,100000", help="comma list of group counts N (1e6 allowed)")
    p.add_argument("--M", type=int, default=10, help="observations per group")
    p.add_argument("--K", type=int, default=2, choices=(1, 2), help="event dimension")
    p.add_argument("--batch", type=int, default=256, help="groups per step of the subsampled methods (B)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list among {METHODS}")
    p.add_argument("--lr-normal-full", default="0.001,0.003,0.01", help="Adam lr grid for AutoNormal full batch")
    p.add_argument("--lr-normal-sub", default="0.001", help="Adam lr (grid) for AutoNormal subsampled")
    p.add_argument("--lr-pavi-f", default="0.001", help="Adam lr (grid) for PAVI-F")
    p.add_argument("--lr-pavi-e", default="0.001", help="Adam lr (grid) for PAVI-E")
    p.add_argument("--encoding-dim", type=int, default=8, help="PAVI encoding size D")
    p.add_argument(
        "--decay",
        type=float,
        default=1.0,
        help="learning-rate decay: lr * decay**(step / max_steps), exponential (1 = constant)",
    )
    p.add_argument("--decay-steps", type=int, default=0, help="steps over which --decay applies (0: --max-steps)")
    p.add_argument(
        "--decays-normal-full",
        default="",
        help="grid of --decay values for AutoNormal full batch, crossed with its lr grid (default: --decay)",
    )
    _common.add_laplace_flag(p, "sections 0-1")
    p.add_argument("--tol", type=float, default=0.02, help="ELBO gap tolerance, nats per group")
    p.add_argument("--eval-every", type=int, default=100, help="steps between full-data ELBO evaluations")
    p.add_argument("--eval-particles", type=int, default=4, help="particles of the evaluation ELBO")
    p.add_argument("--max-seconds", type=float, default=60.0, help="training-time budget per method and lr")
    p.add_argument(
        "--max-seconds-method",
        default="",
        help="per-method overrides of --max-seconds, e.g. 'normal_sub=10,pavi_f=10'",
    )
    p.add_argument("--max-steps", type=int, default=100_000, help="step budget per method and lr")
    p.add_argument("--no-race", dest="race", action="store_false", help="run every lr of a grid to its budget")
    p.add_argument(
        "--retime",
        action="store_true",
        help="time a run that reached tolerance again, same key and steps, without evaluations between steps",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "convergence.json"))
    p.add_argument("--plot", default=os.path.join(_common.RESULTS_DIR, "convergence.png"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (N=200, a few dozen steps)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.batch, args.max_steps, args.eval_every = "200", 64, 40, 20
        args.max_seconds, args.eval_particles = 20.0, 2
        args.lr_normal_full = "0.01"
    sizes = _common.parse_list(args.sizes, int)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; choose among {METHODS}")
    grids = {
        "normal_full": _common.parse_list(args.lr_normal_full),
        "normal_sub": _common.parse_list(args.lr_normal_sub),
        "pavi_f": _common.parse_list(args.lr_pavi_f),
        "pavi_e": _common.parse_list(args.lr_pavi_e),
    }
    caps = {m: args.max_seconds for m in METHODS}
    for item in filter(None, args.max_seconds_method.split(",")):
        name, value = item.split("=")
        if name not in METHODS:
            raise SystemExit(f"--max-seconds-method: unknown method {name!r}")
        caps[name] = float(value)
    info = _common.machine_info()
    results = {}
    t_start = time.perf_counter()
    for N in sizes:
        x = simulate_random_effects(jax.random.PRNGKey(args.seed), N, args.M, args.K)
        x = jax.block_until_ready(x)
        log_z = random_effects_posterior(np.asarray(x))["log_evidence"]
        entry = {"log_evidence": log_z, "methods": {}}
        print(f"\n== N = {N} groups, M = {args.M}, K = {args.K}, log p(x) = {log_z:.2f}", flush=True)
        for method in methods:
            runs, best_time = [], math.inf
            harness = make_harness(method, x, args)
            decays = [args.decay]
            if method == "normal_full" and args.decays_normal_full:
                decays = _common.parse_list(args.decays_normal_full)
            for lr, decay in ((lr, d) for lr in grids[method] for d in decays):
                cap = caps[method]
                if args.race and math.isfinite(best_time):
                    cap = min(cap, best_time)
                r = run_one(harness, lr, log_z, args, cap, decay)
                if args.retime and r["reached"]:
                    again = harness.start(lr, seed=args.seed, decay_per_step=r["decay_per_step"])
                    again.train(r["steps_to_tol"])
                    r["time_to_tol_with_evals_s"] = r["time_to_tol_s"]
                    r["time_to_tol_s"] = again.train_s
                    # the replay's own gap (not timed, one more key): the replay is the same
                    # trajectory, but a 1-particle gap can be far from its mean (PAVI-E at 1e5:
                    # 0.022-0.20 over six keys at one state, RESULTS 24): use --eval-particles 8
                    r["retimed_gap_per_group"] = (again.full_loss(jax.random.PRNGKey(args.seed + 7)) + log_z) / N
                runs.append(r)
                if r["reached"]:
                    # race on the time with evaluations: later members' budgets include theirs
                    best_time = min(best_time, r.get("time_to_tol_with_evals_s", r["time_to_tol_s"]))
                print(
                    f"  {method:<12} lr={lr:<7g} decay={decay:<5g} params={r['num_params']:<9} steps={r['steps']:<6} "
                    f"train={r['train_s']:.2f}s ({1e3 * r['s_per_step']:.3g} ms/step) compile={r['compile_s']:.1f}s "
                    f"gap={r['final_gap_per_group']:.4g} reached={r['reached']} ({r['stopped_by']})",
                    flush=True,
                )
            entry["methods"][method] = {"best": pick_best(runs), "runs": runs}
        ref = entry["methods"].get("pavi_e", {}).get("best")
        for method, m in entry["methods"].items():
            m["vs_pavi_e"] = ratio_entry(m["best"], ref)
        results[N] = entry
    table = print_table(results, args.tol)
    summary = {}
    if "pavi_e" in methods:
        pe = {N: results[N]["methods"]["pavi_e"]["best"] for N in sizes}
        summary["pavi_e_num_params"] = {N: pe[N]["num_params"] for N in sizes}
        summary["pavi_e_time_to_tol_s"] = {N: pe[N]["time_to_tol_s"] for N in sizes}
        reached = [N for N in sizes if pe[N]["reached"]]
        if len(reached) >= 2:
            lo, hi = min(reached), max(reached)
            summary["pavi_e_time_growth"] = {
                "from_N": lo,
                "to_N": hi,
                "ratio": pe[hi]["time_to_tol_s"] / pe[lo]["time_to_tol_s"],
            }
    out = _common.record(
        "convergence",
        __file__,
        argv,
        args,
        info,
        t_start,
        results=results,
        summary=summary,
        table=table,
    )
    _common.write_json(args.out, out)
    if args.plot:
        plot(results, args.tol, args.plot)
    print(f"\nwrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return out


if __name__ == "__main__":
    main()
