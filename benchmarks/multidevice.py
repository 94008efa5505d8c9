"""Data-parallel AutoPAVI training: time per step and throughput against the number of devices.

Model: :func:`numpyro_pavi.examples.models.random_effects` (``G`` groups of ``M`` observations, ``K``
dims), ``B = --batch`` groups per step. For every device count ``n`` in ``--devices`` (default:
1, 2, 4, ... up to ``len(jax.devices())``), the recipe of :mod:`numpyro_pavi.sharding` runs in
this process: a one-axis mesh over the first ``n`` devices, the model wrapped in
``shard_plates(model, mesh, ["groups"])``, the data split over the mesh by ``shard_data``, an
``AutoPAVI`` guide (Laplace bases unless ``--no-laplace``), Adam, and ``jax.jit(svi.update)``
compiled ahead of time. Same data, same keys, same initial parameters for every ``n``.

Measured per ``n``: compile time, seconds per step over ``--steps`` steps (after one warm-up
step), throughput in plate elements per second (``B / s_per_step``) and its ratio to
``n = 1``; the per-device batch found in the compiled program (``B / n`` when the partitioner
split the batch, the evidence that every device gets its share of the work); and the
agreement with ``n = 1``: the largest relative difference of the loss over all steps and the
largest difference of the ELBO gradient at the initial parameters (same key) over its largest
entry; and that of the parameters after all steps over the largest parameter. A run whose
losses or gradient differ by more than ``--rtol`` makes the script exit with status 1 (Adam
divides by the gradient's running scale, so over many steps it amplifies float summation
differences in the parameters, e.g. a near-zero gradient entry whose sign flips: reported,
not tested).

On a CPU, simulate devices with ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set
before Python starts). Simulated devices share the same cores, so they show that the program
is split and still correct, not a speed-up: speed-ups need real devices (GPUs, TPUs, hosts).

Examples::

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python benchmarks/multidevice.py --quick
    python benchmarks/multidevice.py --groups 100000 --batch 4096 --steps 200   # on a multi-GPU host
"""

from __future__ import annotations

import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.models import random_effects, simulate_random_effects
from numpyro_pavi.sharding import data_mesh, shard_data, shard_plates


def model_fn(x, subsample_size):
    return random_effects(x, subsample_size=subsample_size)


def _flat(params) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(params)])


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference over the largest magnitude."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def run_one(n: int, x: np.ndarray, args) -> dict:
    mesh = data_mesh(jax.devices()[:n])
    model = shard_plates(model_fn, mesh, ["groups"])
    xs = shard_data(x, mesh)
    guide = AutoPAVI(model, laplace=args.laplace)
    svi = SVI(model, guide, optax.adam(args.lr), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(args.seed), xs, args.batch)
    init_s = time.perf_counter() - t0
    # the ELBO gradient at the initial parameters: what data parallelism must not change
    elbo = Trace_ELBO()
    grad = jax.jit(
        jax.grad(lambda p, key, x: elbo.loss(key, p, model, guide, x, args.batch)),
    )(svi.get_params(state), jax.random.PRNGKey(args.seed + 7), xs)
    t0 = time.perf_counter()
    update = jax.jit(svi.update, static_argnums=2).lower(state, xs, args.batch).compile()
    compile_s = time.perf_counter() - t0
    # per-device shapes of the compiled (partitioned) program: the batch axis shows as B / n
    found = {int(m) for m in re.findall(r"f32\[(\d+),", update.as_text())}
    losses = []
    state, loss = update(state, xs)  # warm-up step
    losses.append(loss)
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        state, loss = update(state, xs)
        losses.append(loss)
    jax.block_until_ready(state)
    train_s = time.perf_counter() - t0
    params = svi.get_params(state)
    return {
        "devices": n,
        "init_s": init_s,
        "compile_s": compile_s,
        "s_per_step": train_s / args.steps,
        "elements_per_s": args.batch * args.steps / train_s,
        "per_device_batch_in_program": (args.batch // n) if (args.batch // n) in found else None,
        "losses": np.asarray(jax.device_get(losses), np.float64),
        "params": _flat(params),
        "grad": _flat(grad),
        "peak_rss_mb_process": _common.peak_rss_mb(),
    }


def build_parser():
    p = _common.parser(__doc__)
    p.add_argument("--devices", default="", help="comma list of device counts (default 1, 2, 4, ... available)")
    p.add_argument("--groups", type=int, default=4096, help="groups G")
    p.add_argument("--M", type=int, default=10, help="observations per group")
    p.add_argument("--batch", type=int, default=512, help="groups per step B (divisible by every device count)")
    p.add_argument("--steps", type=int, default=100, help="timed steps")
    p.add_argument("--lr", type=float, default=1e-3)
    _common.add_laplace_flag(p, "(none: this benchmark is new)")
    p.add_argument("--rtol", type=float, default=1e-3, help="agreement with n = 1 required (losses, params)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(_common.RESULTS_DIR, "multidevice.json"))
    p.add_argument("--quick", action="store_true", help="tiny run (G=256, B=64, 10 steps, 1 and all devices)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.groups, args.M, args.batch, args.steps = 256, 5, 64, 10
    t_start = time.perf_counter()
    info = _common.machine_info()
    available = len(jax.devices())
    counts = _common.parse_list(args.devices, int) if args.devices else [2**i for i in range(available.bit_length())]
    counts = [n for n in counts if n <= available]
    if args.quick and not args.devices:
        counts = sorted({1, available})  # the two ends only: compiling dominates a quick run
    x = np.asarray(simulate_random_effects(jax.random.PRNGKey(args.seed + 1), args.groups, args.M))
    rows, ref = [], None
    for n in counts:
        r = run_one(n, x, args)
        if ref is None:
            ref = r
        r["loss_max_rel_diff_vs_first"] = float(np.max(np.abs(r["losses"] - ref["losses"]) / np.abs(ref["losses"])))
        r["grad_max_diff_vs_first"] = _rel(r["grad"], ref["grad"])
        r["params_max_diff_vs_first"] = _rel(r["params"], ref["params"])
        r["throughput_ratio_vs_first"] = r["elements_per_s"] / ref["elements_per_s"]
        r["final_loss"] = float(r["losses"][-1])
        rows.append({k: v for k, v in r.items() if k not in ("losses", "params", "grad")})
    # gradients and losses differ by float summation order only; over many steps Adam's
    # normalization amplifies that in the parameters (reported, not tested: it is no error)
    agree = all(r["loss_max_rel_diff_vs_first"] <= args.rtol and r["grad_max_diff_vs_first"] <= args.rtol for r in rows)
    out = _common.record(
        "multidevice",
        __file__,
        argv,
        args,
        info,
        t_start,
        rows=rows,
        agree=agree,
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )
    _common.write_json(args.out, out)
    print(
        f"{'devices':>7} {'compile s':>9} {'ms/step':>8} {'elem/s':>9} {'ratio':>6} {'B/dev':>6} {'loss rel':>9} {'grad':>9} {'params':>9}"
    )
    for r in rows:
        print(
            f"{r['devices']:>7} {r['compile_s']:>9.2f} {1e3 * r['s_per_step']:>8.2f} {r['elements_per_s']:>9.3g} "
            f"{r['throughput_ratio_vs_first']:>6.2f} {r['per_device_batch_in_program']!s:>6} "
            f"{r['loss_max_rel_diff_vs_first']:>9.2e} {r['grad_max_diff_vs_first']:>9.2e} "
            f"{r['params_max_diff_vs_first']:>9.2e}"
        )
    print(f"devices: {jax.devices()[0].device_kind} ({jax.default_backend()}); agree within {args.rtol}: {agree}")
    return out


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result["agree"] else 1)
