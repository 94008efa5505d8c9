"""A plate's subsample indices drawn at a cost that grows with the subsample, not the plate.

NumPyro draws the ``B = subsample_size`` indices of ``numpyro.plate(name, N,
subsample_size=B)`` by a partial Fisher-Yates shuffle of ``arange(N)`` on a CPU (a
permutation of all ``N`` elsewhere): every training step builds and shuffles an array of
the whole plate. With ``B = 128`` groups per step that was most of a step of the default
guide on a large plate (``benchmarks/RESULTS.md``, section 27: 0.6 ms of a 1.3 ms step at
``N = 1e5``, 1.0 of 2.4 ms at ``N = 1e6``).

:func:`subsample_indices` draws ``2 B`` indices with replacement and keeps the first ``B``
distinct ones, in the order drawn: ``O(B log B)``, with no array of size ``N``. Taking the
first distinct values of an i.i.d. uniform sequence is sampling without replacement, so the
``B`` indices are a uniform random subset in a uniformly random order, as NumPyro's. A draw
whose ``2 B`` candidates hold fewer than ``B`` distinct values is redrawn whole with a fresh
key; every relabelling of the plate maps that event to itself, so the subsets it keeps stay
uniform. Where ``B <= N / 2`` (the only case :class:`subsample_draws` hands it), the
candidates hold ``N (1 - exp(-2 B / N)) >= 1.26 B`` distinct values on average, so a
redraw is rare except on plates of a few dozen elements, where it costs little.

Which indices a key gives differs from NumPyro's draw: the guide draws them (its plates are
the ones SVI replays into the model), so model and guide still agree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from numpyro.primitives import Messenger

__all__ = ["FAST_DRAW_UP_TO", "subsample_draws", "subsample_indices"]

#: Largest ``B / N`` for which :class:`subsample_draws` draws the indices with
#: :func:`subsample_indices`; larger subsamples keep NumPyro's shuffle (``B`` sequential
#: swaps, where the candidates would often hold too few distinct values).
FAST_DRAW_UP_TO = 1 / 2


def _candidates(key: jax.Array, size: int, subsample_size: int):
    """``2 B`` i.i.d. indices and, for each, whether it is the first of its value."""
    cand = jax.random.randint(key, (2 * subsample_size,), 0, size)
    order = jnp.argsort(cand, stable=True)
    ranked = cand[order]
    first_ranked = jnp.concatenate([jnp.ones((1,), bool), ranked[1:] != ranked[:-1]])
    first = jnp.zeros_like(first_ranked).at[order].set(first_ranked)
    return cand, first


def subsample_indices(size: int, subsample_size: int, rng_key: jax.Array | None = None) -> jax.Array:
    """``(subsample_size,)`` distinct indices in ``[0, size)``, a uniform random subset in
    uniform random order (NumPyro's ``plate`` subsample draw, same signature).

    Cost ``O(B log B)`` per draw, plus a redraw where the ``2 B`` candidates hold fewer than
    ``B`` distinct values (rare for ``B <= size / 2`` on large plates). Larger subsamples
    are the first ``B`` of a random permutation of the plate, ``O(N log N)``.
    """
    if rng_key is None:
        raise ValueError(
            "Missing random key to generate subsample indices: run the model under "
            "numpyro.handlers.seed (SVI does; HMC/NUTS do not support subsampling), or give "
            "the plate's indices with numpyro.handlers.substitute."
        )
    if not 0 < subsample_size <= size:
        raise ValueError(f"subsample_size must be in [1, {size}], got {subsample_size}.")
    if subsample_size > FAST_DRAW_UP_TO * size:
        # the candidates would rarely hold B distinct values (never on average past 0.8 N)
        return jax.random.permutation(rng_key, int(size))[: int(subsample_size)]
    return _subsample_indices(int(size), int(subsample_size), rng_key)


# one program per plate size: the guide's setup trace runs eagerly, where the draw's dozen
# operations would each compile and dispatch on their own (2.0 s, then 0.3 s a call)
@functools.partial(jax.jit, static_argnums=(0, 1))
def _subsample_indices(size: int, subsample_size: int, rng_key: jax.Array) -> jax.Array:
    def draw(key):
        key, sub = jax.random.split(key)
        return (key, *_candidates(sub, size, subsample_size))

    def short(state):
        return jnp.sum(state[2]) < subsample_size

    _, cand, first = jax.lax.while_loop(short, lambda state: draw(state[0]), draw(rng_key))
    return cand[jnp.nonzero(first, size=subsample_size)[0]]


class subsample_draws(Messenger):
    """Effect handler: the plates under it draw their subsample indices with
    :func:`subsample_indices` where ``subsample_size <= FAST_DRAW_UP_TO * size``
    (NumPyro's shuffle otherwise). Indices given by other handlers (``substitute``,
    ``replay``, a guide's plates) are left as they are."""

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "plate" or msg["value"] is not None:
            return
        size, subsample_size = msg["args"]
        if subsample_size is not None and not 0 < subsample_size <= size:
            raise ValueError(
                f"Plate '{msg['name']}' has subsample_size={subsample_size}: it must be in [1, {size}] "
                "(the plate's size)."
            )
        if subsample_size is not None and subsample_size <= FAST_DRAW_UP_TO * size:
            msg["fn"] = subsample_indices
