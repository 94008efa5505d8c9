"""Divergence monitoring: keep the best parameters of a run and say when the last ones are worse.

A stochastic fit can reach its optimum and then leave it (a loss explosion). ``svi.run``
returns the *last* parameters, so without a check a user gets a wrong posterior silently.
This module holds the pieces that prevent that:

* :func:`running_mean` and :func:`check_losses`: the criterion, on a loss history;
* :class:`KeepBest`: a NumPyro optimizer wrapper that keeps the best parameters (by the
  running mean of the loss) inside the optimizer state, so ``svi.run`` users get them with
  :func:`best_params` and no change to their loop;
* :func:`site_log_densities` and :func:`explain_divergence`: which site's guide or model
  log-density moved most between two parameter sets (the warning names it).

:func:`numpyro_pavi.fit` uses all of them: it returns the best parameters when the last
ones are worse and warns with the site.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from numpyro import handlers
from numpyro.optim import _NumPyroOptim, optax_to_numpyro

from .averaging import _wrapper_record

__all__ = [
    "DivergenceReport",
    "DivergenceWarning",
    "KeepBest",
    "best_params",
    "check_losses",
    "explain_divergence",
    "running_mean",
    "site_log_densities",
]


class DivergenceWarning(UserWarning):
    """The last parameters of a fit are much worse than the best ones it reached."""


def running_mean(losses: np.ndarray, window: int) -> np.ndarray:
    """Trailing means ``(len(losses) - window + 1,)``: entry ``i`` averages steps ``i .. i+window-1``.

    Non-finite losses count as ``+inf`` (a step that diverged is worse than any finite one).
    """
    x = np.asarray(losses, dtype=np.float64)
    x = np.where(np.isfinite(x), x, np.inf)
    if x.size < window:
        return np.empty(0)
    finite = np.isfinite(x)
    c = np.concatenate([[0.0], np.cumsum(np.where(finite, x, 0.0))])
    bad = np.concatenate([[0], np.cumsum(~finite)])
    means = (c[window:] - c[:-window]) / window
    return np.where(bad[window:] - bad[:-window] > 0, np.inf, means)


def _worse(last: float, best: float, rtol: float) -> bool:
    """``last`` is much worse than ``best``: by more than ``rtol * max(|best|, 1)``."""
    return not (last <= best + rtol * max(abs(best), 1.0))


@dataclass(frozen=True)
class DivergenceReport:
    """What :func:`check_losses` found on a loss history (steps count from 0).

    :ivar best_step: last step of the window with the lowest running mean.
    :ivar best: that running mean.
    :ivar last: the running mean of the last ``window`` steps.
    :ivar worst: the highest running mean after ``burn_in`` (``nan`` when none).
    :ivar worst_step: last step of that window (``-1`` when none).
    :ivar diverged: ``last`` is worse than ``best`` by more than ``rtol * max(|best|, 1)``.
    :ivar unstable: ``worst`` is worse than ``best`` by more than ``rtol * max(|best|, 1)``:
        after ``burn_in``, some running mean was that much above the overall best (the loss
        left the optimum, or had not reached it yet).
    :ivar max_rise: the largest rise of a running mean after ``burn_in`` above the best
        running mean *before* it, relative to ``max(|best so far|, 1)``. A fit that is still
        converging never rises; one that reached its optimum and left it does.
    :ivar exploded: ``max_rise > rtol``.
    """

    window: int
    rtol: float
    best_step: int
    best: float
    last: float
    worst: float
    worst_step: int
    diverged: bool
    unstable: bool
    max_rise: float = 0.0
    exploded: bool = False

    @property
    def ratio(self) -> float:
        """``worst / best`` (the stress benchmark's criterion, meaningful for positive losses)."""
        return self.worst / self.best if self.best else math.nan


def check_losses(losses, window: int = 100, rtol: float = 0.05, burn_in: int = 1000) -> DivergenceReport:
    """Compare the running means of a loss history with the best one.

    :param losses: ``(num_steps,)`` losses, e.g. ``svi.run(...).losses``.
    :param window: running-mean window.
    :param rtol: tolerance relative to ``max(|best|, 1)``.
    :param burn_in: ``unstable`` looks at windows ending after this step only.
    """
    losses = np.asarray(losses)
    window = int(max(1, min(window, losses.size)))
    rm = running_mean(losses, window)
    if rm.size == 0:
        raise ValueError("check_losses needs at least one loss.")
    best_i = int(np.argmin(rm))
    best, last = float(rm[best_i]), float(rm[-1])
    late = rm[max(burn_in - window + 1, 0) :]
    worst_i = int(np.argmax(late)) + rm.size - late.size if late.size else -1
    worst = float(rm[worst_i]) if late.size else math.nan
    best_before = np.minimum.accumulate(rm)
    start = rm.size - late.size
    rises = (rm[start:] - best_before[start:]) / np.maximum(np.abs(best_before[start:]), 1.0)
    max_rise = float(np.max(rises)) if late.size else 0.0
    return DivergenceReport(
        window=window,
        rtol=rtol,
        best_step=best_i + window - 1,
        best=best,
        last=last,
        worst=worst,
        worst_step=worst_i + window - 1 if late.size else -1,
        diverged=_worse(last, best, rtol),
        unstable=bool(late.size) and _worse(worst, best, rtol),
        max_rise=max_rise,
        exploded=not (max_rise <= rtol),
    )


# ---------------------------------------------------------------------------------------
# naming the site
# ---------------------------------------------------------------------------------------
def _guide_and_model_traces(model, guide, params, args, kwargs, rng_key, num_particles):
    out = []
    for key in jax.random.split(rng_key, num_particles):
        kg, km = jax.random.split(key)
        g = handlers.trace(handlers.seed(handlers.substitute(guide, data=params), kg)).get_trace(*args, **kwargs)
        seeded = handlers.seed(handlers.substitute(model, data=params), km)
        m = handlers.trace(handlers.replay(seeded, g)).get_trace(*args, **kwargs)
        out.append((g, m))
    return out


def _site_density(site) -> float:
    lp = site["fn"].log_prob(site["value"])
    if site.get("mask") is not None:
        lp = jnp.where(site["mask"], lp, 0.0)
    return float(jnp.sum(lp) * (1.0 if site.get("scale") is None else site["scale"]))


def site_log_densities(model, guide, params: dict, *args, rng_key=None, num_particles: int = 16, **kwargs) -> dict:
    """Per-site Monte Carlo summaries of the guide and the model at ``params``.

    :param params: constrained params (``svi.get_params(state)``).
    :return: ``{"guide": {site: E_q[log q_site]}, "model": {site: E_q[log p_site]},
        "values": {site: (num_particles, *site_shape) guide draws}}`` (log-densities are
        summed over the site's elements, times its subsample scale).
    """
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    traces = _guide_and_model_traces(model, guide, params, args, kwargs, rng_key, num_particles)
    latent = [n for n, s in traces[0][0].items() if s["type"] == "sample" and not s["is_observed"]]
    sites = [n for n, s in traces[0][1].items() if s["type"] == "sample"]
    return {
        "guide": {n: float(np.mean([_site_density(g[n]) for g, _ in traces])) for n in latent},
        "model": {n: float(np.mean([_site_density(m[n]) for _, m in traces])) for n in sites},
        "values": {n: np.stack([np.asarray(g[n]["value"]) for g, _ in traces]) for n in latent},
    }


def explain_divergence(model, guide, best: dict, last: dict, *args, rng_key=None, num_particles: int = 16, **kwargs):
    """The latent site whose guide moved most between ``best`` and ``last`` params.

    Each site's move is measured in the best fit's own posterior sds: the largest
    ``|mean_last - mean_best| / sd_best`` over its elements, or the largest log ratio of the
    sds when that is bigger (a scale that exploded or collapsed). Non-finite draws rank first.

    :return: ``(site, message)``: the site, and a sentence with its move and its guide and
        model log-densities at both parameter sets.
    """
    a = site_log_densities(model, guide, best, *args, rng_key=rng_key, num_particles=num_particles, **kwargs)
    b = site_log_densities(model, guide, last, *args, rng_key=rng_key, num_particles=num_particles, **kwargs)
    rows = []
    for site, va in a["values"].items():
        vb = b["values"].get(site)
        if vb is None:
            continue
        va, vb = va.astype(np.float64), vb.astype(np.float64)
        if not np.all(np.isfinite(vb)):
            rows.append((math.inf, site, "non-finite draws at the last parameters"))
            continue
        sd_a = np.std(va, 0) + 1e-12
        shift = float(np.max(np.abs(vb.mean(0) - va.mean(0)) / sd_a))
        ratio = float(np.max(np.abs(np.log((np.std(vb, 0) + 1e-12) / sd_a))))
        rows.append((max(shift, ratio), site, f"its draws moved by up to {shift:.3g} best-fit sds, sd ratio up to {math.exp(ratio):.3g}x"))
    if not rows:
        return None, "no latent site to compare"
    _, site, what = max(rows, key=lambda r: r[0])
    msg = (
        f"site '{site}': {what}; its guide log-density went from {a['guide'][site]:.4g} to "
        f"{b['guide'].get(site, math.nan):.4g} and its model log-density from {a['model'][site]:.4g} to "
        f"{b['model'].get(site, math.nan):.4g}"
    )
    return site, msg


# ---------------------------------------------------------------------------------------
# keeping the best parameters inside svi.run
# ---------------------------------------------------------------------------------------
class KeepBest(_NumPyroOptim):
    """Wrap a NumPyro (or optax) optimizer so its state also holds the best parameters seen.

    "Best" is by the running mean of the loss over ``window`` steps; the parameters kept are
    those at the end of the best window. The update itself is the wrapped optimizer's,
    unchanged, so a run with ``KeepBest(opt)`` follows exactly the same path as one with
    ``opt``. Use it with ``svi.run`` and read the result with :func:`best_params`::

        svi = SVI(model, guide, KeepBest(optax.adam(5e-3)), Trace_ELBO())
        result = svi.run(key, 5000, *args)
        params = best_params(svi, result.state)   # constrained, like svi.get_params

    Costs one copy of the parameters in memory.
    """

    def __init__(self, optim: Any, window: int = 100):
        if not isinstance(optim, _NumPyroOptim):
            optim = optax_to_numpyro(optim)
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"KeepBest: window must be a positive int, got {window!r}.")
        self.optim = optim
        self.window = window
        self.update_with_value = True

    def init(self, params):
        tracker = {
            "buffer": jnp.zeros(self.window),
            "count": jnp.array(0),
            "best": jnp.array(jnp.inf),
            "best_step": jnp.array(-1),
            "params": params,
        }
        return self.optim.init(params), tracker

    def get_params(self, state):
        return self.optim.get_params(state[0])

    def _track(self, tracker, params, value):
        value = jnp.where(jnp.isfinite(value), value, jnp.inf)
        count = tracker["count"]
        buffer = tracker["buffer"].at[count % self.window].set(value)
        mean = jnp.mean(buffer)
        better = (count + 1 >= self.window) & (mean < tracker["best"])
        best, best_step, kept = lax.cond(
            better,
            lambda _: (mean, count, params),
            lambda _: (tracker["best"], tracker["best_step"], tracker["params"]),
            None,
        )
        return {"buffer": buffer, "count": count + 1, "best": best, "best_step": best_step, "params": kept}

    def update(self, g, state, value=None):
        inner, tracker = state
        tracker = self._track(tracker, self.optim.get_params(inner), value)
        return self.optim.update(g, inner, value=value), tracker

    def eval_and_update(self, fn: Callable, state, forward_mode_differentiation: bool = False):
        (out, aux), inner = self.optim.eval_and_update(fn, state[0], forward_mode_differentiation)
        tracker = self._track(state[1], self.optim.get_params(state[0]), out)
        return (out, aux), (inner, tracker)

    def eval_and_stable_update(self, fn: Callable, state, forward_mode_differentiation: bool = False):
        (out, aux), inner = self.optim.eval_and_stable_update(fn, state[0], forward_mode_differentiation)
        tracker = self._track(state[1], self.optim.get_params(state[0]), out)
        return (out, aux), (inner, tracker)


def best_params(svi, svi_state) -> dict:
    """Constrained best parameters of a run whose optimizer is :class:`KeepBest`, or holds one
    inside wrappers of the same kind (``AverageParams(KeepBest(...))``).

    Before ``window`` steps have run, these are the initial parameters.
    """
    return svi.constrain_fn(_wrapper_record(svi, svi_state, KeepBest, "best_params")["params"])


def warn_divergence(report: DivergenceReport, site_message: str | None, kept_best: bool) -> None:
    """Emit the :class:`DivergenceWarning` for a diverged run."""
    msg = (
        f"The fit left its optimum: the {report.window}-step running mean of the loss is "
        f"{report.last:.6g} at the end but was {report.best:.6g} at step {report.best_step}."
    )
    if site_message:
        msg += f" Largest change: {site_message}."
    msg += (
        " The best parameters were returned instead of the last ones."
        if kept_best
        else " Returning the last parameters."
    )
    msg += " A lower learning rate (or a decaying one) usually avoids this."
    warnings.warn(msg, DivergenceWarning, stacklevel=3)
