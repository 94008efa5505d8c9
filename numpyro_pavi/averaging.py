"""Iterate averaging: the parameters averaged over the last steps of a run, kept in the
optimizer's state.

At a constant learning rate Adam moves every parameter by about the rate at every step, even
at the optimum. Where a posterior is sharper than that (the global mean of a table with
millions of rows: sd 0.002 against steps of 0.005) the last parameters sit at a random
point of that jitter, many posterior sds from the optimum, and the local effects whose bases
follow the globals move with them. The average of the iterates does not (Polyak-Ruppert
averaging); training itself is unchanged.

:class:`AverageParams` wraps any NumPyro or optax optimizer; :func:`averaged_params` reads
the average back, constrained like ``svi.get_params``::

    svi = SVI(model, guide, AverageParams(optax.adam(5e-3), window=200), Trace_ELBO())
    result = svi.run(key, 5000, *args)
    params = averaged_params(svi, result.state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from numpyro.optim import _NumPyroOptim, optax_to_numpyro

__all__ = ["AverageParams", "averaged_params"]


class AverageParams(_NumPyroOptim):
    """Wrap a NumPyro (or optax) optimizer so its state also holds an average of the
    parameters after each step.

    The average is uniform over the first ``window`` steps, then exponential with time
    constant ``window`` steps (weight ``max(1 / t, 1 / window)`` on step ``t``): it forgets
    the early, far-from-optimal iterates and keeps a noise reduction of about
    ``sqrt(window / autocorrelation time)`` on the jitter. The update is the wrapped
    optimizer's, unchanged, so a run follows exactly the same path as without the wrapper.
    Costs one copy of the parameters in memory.

    :param optim: the optimizer (NumPyro's, or an optax ``GradientTransformation``).
    :param window: steps the average spans; pick it well below the number of steps run.
    """

    def __init__(self, optim: Any, window: int = 200):
        if not isinstance(optim, _NumPyroOptim):
            optim = optax_to_numpyro(optim)
        if not (isinstance(window, int) and window >= 1):
            raise ValueError(f"AverageParams: window must be a positive int, got {window!r}.")
        self.optim = optim
        self.window = window

    def init(self, params):
        return self.optim.init(params), {"average": params, "count": jnp.array(0)}

    def get_params(self, state):
        return self.optim.get_params(state[0])

    def _track(self, tracker: dict, params) -> dict:
        count = tracker["count"] + 1
        weight = jnp.maximum(1.0 / count, 1.0 / self.window)
        average = jax.tree.map(lambda a, p: a + weight * (p - a), tracker["average"], params)
        return {"average": average, "count": count}

    def update(self, g, state, value=None):
        inner = self.optim.update(g, state[0], value=value)
        return inner, self._track(state[1], self.optim.get_params(inner))

    def eval_and_update(self, fn: Callable, state, forward_mode_differentiation: bool = False):
        out, inner = self.optim.eval_and_update(fn, state[0], forward_mode_differentiation)
        return out, (inner, self._track(state[1], self.optim.get_params(inner)))

    def eval_and_stable_update(self, fn: Callable, state, forward_mode_differentiation: bool = False):
        out, inner = self.optim.eval_and_stable_update(fn, state[0], forward_mode_differentiation)
        # a skipped (non-finite) step leaves the average as it was, as the parameters
        tracked = self._track(state[1], self.optim.get_params(inner))
        finite = jnp.isfinite(out[0])
        return out, (inner, jax.tree.map(lambda new, old: jnp.where(finite, new, old), tracked, state[1]))


def averaged_params(svi, svi_state) -> dict:
    """Constrained averaged parameters of a run whose optimizer is :class:`AverageParams`,
    or holds one inside wrappers of the same kind (``KeepBest(AverageParams(...))``); the
    initial parameters before any step."""
    return svi.constrain_fn(_wrapper_record(svi, svi_state, AverageParams, "averaged_params")["average"])


def _wrapper_record(svi, svi_state, kind: type, caller: str) -> Any:
    """The record a wrapping optimizer of this package (:class:`AverageParams`,
    :class:`~numpyro_pavi.monitor.KeepBest`) of type ``kind`` keeps beside its inner
    optimizer's state, found through other such wrappers around it (each keeps ``(inner
    state, its own record)``); ``TypeError`` naming ``caller`` where there is none."""
    optim, state = svi.optim, svi_state.optim_state
    while not isinstance(optim, kind):
        if not hasattr(optim, "optim"):
            raise TypeError(f"{caller} needs an SVI whose optimizer is numpyro_pavi.{kind.__name__}(...).")
        optim, state = optim.optim, state[0]
    return state[1]
