"""Final ELBO gap and parameter count vs the encoding size D (PAVI-F and PAVI-E).

Same model, data and training protocol as ``convergence.py`` (Gaussian random effects with
exact log-evidence; constant-lr Adam, one training particle, ``B`` groups per step), on one
fixed ``N``. For every ``D`` in ``--dims`` and both encodings, the guide is trained for a
fixed ``--steps`` budget; then the ELBO gap per group ``(log p(x) - ELBO) / N`` is estimated
on the full data with ``--eval-particles`` particles (mean of ``--eval-repeats`` independent
evaluations, their standard error is reported too).

Parameter counts: PAVI-F stores one learned ``D``-vector per group, so it has ``N * D``
encoding parameters on top of its flows; PAVI-E's set encoder and flows do not depend on
``N`` (but do grow with ``D``).

Examples::

    python benchmarks/encoding_size.py --quick
    python benchmarks/encoding_size.py --N 1000 --dims 2,8,32 --steps 4000
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
from numpyro.infer.initialization import init_to_median

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects

ENCODINGS = {"pavi_f": "free", "pavi_e": "set"}


def model(x, subsample_size=None):
    random_effects(x, subsample_size=subsample_size)


def run(method: str, D: int, x, log_z: float, args) -> dict:
    N = int(x.shape[0])
    guide = AutoPAVI(
        model,
        encoding=ENCODINGS[method],
        encoding_dim=D,
        init_loc_fn=init_to_median(num_samples=15),
        init_scale=0.1,
        laplace=args.laplace,
    )
    h = _common.Harness(
        model,
        guide,
        (x,),
        {"subsample_size": min(args.batch, N)},
        eval_kwargs={"subsample_size": None},
        eval_particles=args.eval_particles,
    )
    r = h.start(args.lr, seed=args.seed)
    r.train(args.steps)
    gaps = []
    t0 = time.perf_counter()
    for i in range(args.eval_repeats):
        gaps.append((r.full_loss(jax.random.PRNGKey(1000 + i)) + log_z) / N)
    t_eval = time.perf_counter() - t0
    gaps = np.asarray(gaps)
    enc_params = 0
    params = r.params
    for name, value in params.items():
        if name.endswith(("_encoding", "_residual")):
            enc_params += int(np.size(value))
    return {
        "method": method,
        "encoding_dim": D,
        "num_params": r.num_params,
        "num_free_encoding_params": enc_params,
        "steps": r.steps,
        "train_s": r.train_s,
        "s_per_step": r.train_s / max(r.steps, 1),
        "final_gap_per_group": float(gaps.mean()),
        "final_gap_stderr": float(gaps.std(ddof=1) / math.sqrt(len(gaps))) if len(gaps) > 1 else None,
        "setup_s": h.setup_s,
        "compile_s": h.compile_s,
        "eval_s": t_eval,
        "peak_rss_mb_process": _common.peak_rss_mb(),
    }


def plot(rows: list[dict], N: int, tol: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for method, color in (("pavi_f", "C2"), ("pavi_e", "C3")):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["encoding_dim"])
        if not rs:
            continue
        D = [r["encoding_dim"] for r in rs]
        label = {"pavi_f": "PAVI-F (free)", "pavi_e": "PAVI-E (set)"}[method]
        a1.semilogy(D, [max(r["final_gap_per_group"], 1e-4) for r in rs], "-o", color=color, label=label)
        a2.semilogy(D, [r["num_params"] for r in rs], "-o", color=color, label=label)
    a1.axhline(tol, color="k", ls="--", lw=0.8)
    a1.set_xscale("log", base=2)
    a2.set_xscale("log", base=2)
    a1.set_xlabel("encoding size D")
    a2.set_xlabel("encoding size D")
    a1.set_ylabel("final ELBO gap (nats / group)")
    a2.set_ylabel("guide parameters")
    a1.set_title(f"N = {N}")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    _common.save_figure(fig, path)


def build_parser() -> argparse.ArgumentParser:
    p = _common.parser(__doc__)
    p.add_argument("--N", type=int, default=1000, help="number of groups")
    p.add_argument("--M", type=int, default=10, help="observations per group")
    p.add_argument("--K", type=int, default=2, choices=(1, 2), help="event dimension")
    p.add_argument("--dims", default="2,8,32", help="comma list of encoding sizes D")
    p.add_argument("--methods", default="pavi_f,pavi_e", help="comma list among pavi_f, pavi_e")
    p.add_argument("--batch", type=int, default=256, help="groups per step (B)")
    p.add_argument("--steps", type=int, default=4000, help="training steps per run")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (constant)")
    p.add_argument("--eval-particles", type=int, default=8)
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--tol", type=float, default=0.02, help="only drawn as a reference line")
    _common.add_laplace_flag(p, "section 2")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "encoding_size.json"))
    p.add_argument("--plot", default=os.path.join(_common.RESULTS_DIR, "encoding_size.png"))
    p.add_argument("--quick", action="store_true", help="tiny smoke run (N=200, D=4, 30 steps)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.N, args.dims, args.steps, args.batch = 200, "4", 30, 64
        args.eval_particles, args.eval_repeats = 2, 2
    dims = _common.parse_list(args.dims, int)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in ENCODINGS:
            raise SystemExit(f"unknown method {m!r}; choose among {tuple(ENCODINGS)}")
    info = _common.machine_info()
    t_start = time.perf_counter()
    x = jax.block_until_ready(simulate_random_effects(jax.random.PRNGKey(args.seed), args.N, args.M, args.K))
    log_z = random_effects_posterior(np.asarray(x))["log_evidence"]
    rows = []
    print(f"{'method':<8}{'D':>4}{'params':>9}{'free enc':>10}{'steps':>7}{'train s':>9}{'gap/group':>11}{'± se':>9}")
    for method in methods:
        for D in dims:
            r = run(method, D, x, log_z, args)
            rows.append(r)
            print(
                f"{method:<8}{D:>4}{r['num_params']:>9}{r['num_free_encoding_params']:>10}{r['steps']:>7}"
                f"{r['train_s']:>9.2f}{r['final_gap_per_group']:>11.4f}{(r['final_gap_stderr'] or float('nan')):>9.4f}",
                flush=True,
            )
    out = _common.record(
        "encoding_size",
        __file__,
        argv,
        args,
        info,
        t_start,
        log_evidence=log_z,
        results=rows,
    )
    _common.write_json(args.out, out)
    if args.plot:
        plot(rows, args.N, args.tol, args.plot)
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return out


if __name__ == "__main__":
    main()
