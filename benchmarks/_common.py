"""Helpers shared by the benchmark scripts (timing, memory, machine info, JSON output).

Not part of the library: the scripts add this folder to ``sys.path`` and import it as
``_common`` so they run both as ``python benchmarks/<script>.py`` and when a test loads
them with ``importlib``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")


def peak_rss_mb() -> float:
    """Peak resident set size of this **process** so far, in MiB (``ru_maxrss``).

    It is a process-wide high-water mark: it never goes down, so a number recorded after a
    method only says that the process peaked at most this high up to then (including
    everything that ran before in the same process, e.g. the data and earlier methods).
    """
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb / 1024.0


def count_params(params) -> int:
    """Number of scalar entries in a params pytree."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(params)))


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=10, cwd=REPO).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # best effort only
        return ""


def machine_info() -> dict:
    """Where and with what the numbers were measured."""
    lscpu = _run(["lscpu"]).splitlines()
    return {
        "date_utc": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "nproc": os.cpu_count(),
        "nproc_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "lscpu_head": lscpu[:12],
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        # XLA's options change the peers' costs (on jaxlib 0.10.2+ CPUs, reductions in
        # YNNPACK: RESULTS section 28)
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "numpyro": numpyro.__version__,
        "optax": optax.__version__,
        "git_commit": _run(["git", "rev-parse", "--short", "HEAD"]),
        # the package that ran: another tree's (a before snapshot on PYTHONPATH) is not this commit's
        "numpyro_pavi_path": os.path.dirname(importlib.util.find_spec("numpyro_pavi").origin),
        # uncommitted changes in the library and the benchmarks at run time (the working tree
        # was being edited)
        "git_dirty_files": [
            ln.split()[-1]
            for ln in _run(["git", "status", "--short", "--", "numpyro_pavi", "benchmarks/*.py"]).splitlines()
            if ln.strip()
        ],
    }


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces this run (``argv`` when ``main`` was called in-process)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", os.path.relpath(os.path.abspath(script), REPO)] + args)


def _clean(obj):
    """Replace non-finite floats by None so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    return obj


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(_clean(obj), f, indent=1)


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the first paragraph of a script's docstring."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )


def add_laplace_flag(p: argparse.ArgumentParser, sections: str) -> None:
    """``--laplace/--no-laplace``: AutoPAVI's Laplace bases, on by default as in the guide;
    ``sections`` names the RESULTS.md sections measured before they were (``--no-laplace``)."""
    p.add_argument(
        "--laplace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"AutoPAVI's Laplace bases (the default; RESULTS.md {sections} ran before them: --no-laplace)",
    )


def record(name: str, script: str, argv: list[str] | None, args, info: dict, t_start: float, **fields) -> dict:
    """The JSON record of a run: what ran, where, how long, then the script's ``fields``."""
    return {
        "benchmark": name,
        "command": command_line(script, argv),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "config": vars(args),
        "machine": info,
        "wall_s_total": time.perf_counter() - t_start,
        "loadavg_at_end": list(os.getloadavg()),
        **fields,
    }


def save_figure(fig, path: str) -> None:
    """Write a matplotlib figure as a PNG (creating its folder) and close it."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ratio_text(entry: dict, space: str = "") -> str:
    """A ``vs_pavi_e`` entry as text: ``"21.2x"``, ``">106x"`` (lower bound), ``"<2x"`` (upper
    bound) or ``"n/a"``; ``space`` goes between a bound sign and the number."""
    if entry.get("ratio") is not None:
        return f"{entry['ratio']:.3g}x"
    if "lower_bound" in entry:
        return f">{space}{entry['lower_bound']:.3g}x"
    if "upper_bound" in entry:
        return f"<{space}{entry['upper_bound']:.3g}x"
    return "n/a"


def parse_list(text: str, cast=float) -> list:
    return [cast(float(t)) if cast is int else cast(t) for t in text.split(",") if t.strip()]


def _decayed_adam(learning_rate, decay_per_step):
    # optax.adam is scale_by_adam followed by a scale of -learning_rate; here that scale
    # shrinks by decay_per_step at every step (decay_per_step = 1 is plain Adam)
    return optax.chain(
        optax.scale_by_adam(),
        optax.scale_by_schedule(lambda count: -learning_rate * decay_per_step**count),
    )


def adam(lr: float, decay_per_step: float = 1.0):
    """Adam whose learning rate ``lr * decay_per_step**step`` lives in the optimizer state.

    ``optax.inject_hyperparams`` makes both numbers arrays of the state, so one compiled
    ``svi.update`` serves every learning rate of a grid. ``decay_per_step = 1`` gives
    constant-rate Adam (identical to ``optax.adam(lr)``).
    """
    return optax.inject_hyperparams(_decayed_adam)(learning_rate=lr, decay_per_step=decay_per_step)


class Harness:
    """One model/guide pair on one data set: a compiled ``svi.update`` and a full-data loss.

    Both are compiled once (ahead of time, on the first :meth:`start`) and reused for every
    learning rate, since the rate is part of the optimizer state (:func:`adam`).

    :param model, guide: the NumPyro model and guide used for training.
    :param train_args, train_kwargs: arguments of every training step (e.g. ``(x,)`` and
        ``{"subsample_size": B}``). Array arguments are passed to the jitted function (not
        closed over), so large data is not baked into the compiled program.
    :param eval_guide: guide used to evaluate the ELBO on the full data (defaults to
        ``guide``); it must use the same parameter names.
    :param eval_args, eval_kwargs: full-data model arguments for the evaluation.
    :param eval_particles: particles of the ``Trace_ELBO`` evaluation (run sequentially
        with ``lax.map`` to bound memory).
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        train_args: tuple,
        train_kwargs: dict,
        *,
        eval_guide: Callable | None = None,
        eval_args: tuple | None = None,
        eval_kwargs: dict | None = None,
        eval_particles: int = 4,
    ):
        self.model, self.guide = model, guide
        self.train_args, self.train_kwargs = train_args, dict(train_kwargs)
        self.eval_guide = guide if eval_guide is None else eval_guide
        self.eval_args = train_args if eval_args is None else eval_args
        self.eval_kwargs = dict(eval_kwargs or {})
        self.elbo = Trace_ELBO(num_particles=eval_particles, vectorize_particles=False)
        self._update = None
        self._loss = None
        self.setup_s = None  # first svi.init: guide setup (traces, initialisation)
        self.compile_s = None
        self.eval_compile_s = None

    def start(self, lr: float, seed: int = 0, decay_per_step: float = 1.0) -> Run:
        svi = SVI(self.model, self.guide, adam(lr, decay_per_step), Trace_ELBO())
        t0 = time.perf_counter()
        state = svi.init(jax.random.PRNGKey(seed), *self.train_args, **self.train_kwargs)
        jax.block_until_ready(state)
        init_s = time.perf_counter() - t0
        if self.setup_s is None:
            self.setup_s = init_s
        if self._update is None:
            kw = self.train_kwargs
            update = jax.jit(lambda st, *a: svi.update(st, *a, **kw))
            t0 = time.perf_counter()
            update.lower(state, *self.train_args).compile()
            self.compile_s = time.perf_counter() - t0
            # steps call the jit-wrapped update, as users do: calling the compiled object
            # goes through JAX's Python dispatch, 0.45-1.5 ms a call more at 96 state leaves.
            # The wrapper compiles on its first call (not timed, result discarded).
            jax.block_until_ready(update(state, *self.train_args))
            self._update = update
            model, guide, ekw, elbo = self.model, self.eval_guide, self.eval_kwargs, self.elbo

            def loss(st, key, *a):
                return elbo.loss(key, svi.get_params(st), model, guide, *a, **ekw)

            self._loss = jax.jit(loss)
        return Run(self, svi, state, init_s)


class Run:
    """Training state of one learning rate (see :class:`Harness`)."""

    def __init__(self, harness: Harness, svi, state, init_s: float):
        self.h, self.svi, self.state, self.init_s = harness, svi, state, init_s
        self.num_params = count_params(svi.get_params(state))
        self.steps = 0
        self.train_s = 0.0
        self.last_loss = float("nan")

    def train(self, num_steps: int) -> float:
        """Run ``num_steps`` updates; return their wall time (blocked on the result)."""
        update, args = self.h._update, self.h.train_args
        t0 = time.perf_counter()
        state, loss = self.state, None
        for _ in range(num_steps):
            state, loss = update(state, *args)
        jax.block_until_ready((state, loss))
        dt = time.perf_counter() - t0
        self.state = state
        self.steps += num_steps
        self.train_s += dt
        if loss is not None:
            self.last_loss = float(loss)
        return dt

    def full_loss(self, key) -> float:
        """``-ELBO`` on the full data (not counted in the training time)."""
        t0 = time.perf_counter()
        value = float(self.h._loss(self.state, key, *self.h.eval_args))
        if self.h.eval_compile_s is None:
            self.h.eval_compile_s = time.perf_counter() - t0
        return value

    @property
    def params(self):
        return self.svi.get_params(self.state)
