"""Markdown tables (for ``RESULTS.md``) from the JSON files written by the benchmark scripts.

No computation beyond reading the JSON: times to looser thresholds than the run's ``--tol``
are read off the stored evaluation curves (first evaluation at or below the threshold;
resolution ``--eval-every`` steps of the run).

    python benchmarks/make_tables.py benchmarks/results/convergence.json [more.json ...]
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common

LABELS = {
    "normal_full": "AutoNormal full batch",
    "normal_sub": "AutoNormal subsampled",
    "pavi_f": "PAVI-F subsampled",
    "pavi_e": "PAVI-E subsampled",
}


def first_below(curve, thr):
    for s, t, g in curve:
        if s > 0 and g is not None and g <= thr:
            return s, t
    return None


def g(v, spec=".3g"):
    return "–" if v is None else format(v, spec)


def convergence(d: dict, thresholds=(0.1, 0.05)) -> str:
    tol = d["config"]["tol"]
    out = [f"`{d['command']}`", ""]
    head = ["N", "method", "lr", "guide params", f"steps to {tol}", f"time to {tol} (s)", "ms/step"]
    head += [f"time to {t} (s)" for t in thresholds]
    head += ["final gap", "compile (s)", "peak RSS (MiB)", "time / PAVI-E"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for N, entry in d["results"].items():
        for m, v in entry["methods"].items():
            b = v["best"]
            if b["reached"]:
                steps, t = str(b["steps_to_tol"]), g(b["time_to_tol_s"])
            else:
                steps, t = f"> {b['steps']}", f"> {b['train_s']:.3g}"
            rs = _common.ratio_text(v["vs_pavi_e"], space=" ")
            row = [N, LABELS[m], f"{b['lr']:g}", str(b["num_params"]), steps, t, f"{1e3 * b['s_per_step']:.3g}"]
            for thr in thresholds:
                hit = first_below(b["curve"], thr)
                row.append(g(hit[1]) if hit else f"> {b['train_s']:.3g}")
            row += [g(b["final_gap_per_group"]), g(b["compile_s"]), f"{b['peak_rss_mb_process']:.0f}", rs]
            out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def grid(d: dict) -> str:
    out = [
        f"`{d['command']}`",
        "",
        "| N | method | lr | steps | train (s) | reached | final gap | best gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for N, entry in d["results"].items():
        for m, v in entry["methods"].items():
            for r in v["runs"]:
                out.append(
                    f"| {N} | {LABELS[m]} | {r['lr']:g} | {r['steps']} | {r['train_s']:.3g} | {r['reached']} | "
                    f"{g(r['final_gap_per_group'])} | {g(r['best_gap_per_group'])} |"
                )
    return "\n".join(out)


def encoding(d: dict) -> str:
    out = [
        f"`{d['command']}`",
        "",
        "| method | D | guide params | free encoding params | steps | train (s) | ms/step | final gap/group | ± s.e. |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        out.append(
            f"| {LABELS[r['method']].split()[0]} | {r['encoding_dim']} | {r['num_params']} | {r['num_free_encoding_params']} | "
            f"{r['steps']} | {r['train_s']:.3g} | {1e3 * r['s_per_step']:.3g} | {r['final_gap_per_group']:.4f} | "
            f"{g(r['final_gap_stderr'], '.4f')} |"
        )
    return "\n".join(out)


def neuro(d: dict) -> str:
    out = [
        f"`{d['command']}`",
        "",
        (
            "| S | latent coords | guide params | steps | train (s) | ms/step | time to plateau (s) | latents x steps / s | "
            "sample_posterior compile+1st (s) | sample_posterior run (s) | peak RSS (MiB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["results"]:
        sp = r["sample_posterior"]
        tp = g(r["time_to_plateau_s"]) if r["plateau_reached"] else f"> {r['train_s']:.3g} (not reached)"
        out.append(
            f"| {r['subjects']} | {r['num_latents']:,} | {r['num_guide_params']} | {r['steps']} | {r['train_s']:.3g} | "
            f"{1e3 * r['s_per_step']:.3g} | {tp} | {r['throughput_latents_steps_per_s']:.3g} | "
            f"{sp['compile_and_first_s']:.3g} | {sp['run_s']:.3g} | {r['peak_rss_mb_process']:.0f} |"
        )
    gr = d.get("growth") or {}
    if gr:
        out += [
            "",
            "Growth from the smallest to the largest size: "
            + ", ".join(f"{k} = {g(v) if isinstance(v, float) else v}" for k, v in gr.items()),
        ]
    return "\n".join(out)


def machine(d: dict) -> str:
    m = d["machine"]
    lines = [
        f"- date: {m['date_utc']}; load average at start {m.get('loadavg_at_start')}, at end {d.get('loadavg_at_end')}",
        f"- nproc: {m['nproc']}; platform: {m['platform']}; backend: {m['jax_backend']} {m['jax_devices']}",
        f"- python {m['python']}, jax {m['jax']}, numpyro {m['numpyro']}, optax {m['optax']}, git {m['git_commit']}",
    ]
    return "\n".join(lines)


def main(paths):
    for p in paths:
        with open(p) as f:
            d = json.load(f)
        print(f"\n### {p}\n")
        print(machine(d) + "\n")
        kind = d["benchmark"]
        if kind == "convergence":
            many = any(len(v["runs"]) > 1 for e in d["results"].values() for v in e["methods"].values())
            print(grid(d) if many else convergence(d))
        elif kind == "encoding_size":
            print(encoding(d))
        elif kind == "neuro":
            print(neuro(d))


if __name__ == "__main__":
    main(sys.argv[1:])
