"""Subsample indices: a uniform random subset in uniform order, drawn without an array of
the whole plate, and what the guide's plates (hence SVI's model) use."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from scipy import stats

from numpyro_pavi import AutoPAVI
from numpyro_pavi.structure import seeded_model
from numpyro_pavi.subsampling import subsample_draws, subsample_indices

#: chi-square tests below reject at this level: a correct draw fails one in 10,000 keys
LEVEL = 1e-4


def _draws(size: int, b: int, n: int, seed: int = 0) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: subsample_indices(size, b, k)))(keys))


def _chi_square_uniform(counts: np.ndarray) -> None:
    expected = counts.sum() / counts.size
    statistic = float(np.sum((counts - expected) ** 2) / expected)
    assert statistic < stats.chi2.ppf(1 - LEVEL, counts.size - 1), (statistic, counts.size)


def _chi_square_uniform_tuples(draws: np.ndarray, size: int, b: int) -> None:
    """The draws' ordered ``b``-tuples are uniform over all ``size!/(size-b)!`` of them."""
    index = {t: i for i, t in enumerate(itertools.permutations(range(size), b))}
    _chi_square_uniform(np.bincount([index[tuple(d)] for d in draws.tolist()], minlength=len(index)))


@pytest.mark.parametrize("size, b", [(16, 2), (6, 3)])
def test_ordered_tuples_of_a_subsample_are_uniform(size, b):
    # B = N / 2: the largest subsample drawn from 2 B candidates (6 of them on 6 elements
    # hold fewer than 3 distinct values one time in 50: the redraws are exercised)
    draws = _draws(size, b, 60_000)
    assert draws.min() >= 0 and draws.max() < size
    assert all(len(set(d)) == b for d in draws.tolist())
    _chi_square_uniform_tuples(draws, size, b)


def test_a_subsample_of_the_whole_plate_is_a_uniform_permutation():
    # past B = N / 2: a permutation's first B
    size, n = 4, 48_000
    draws = _draws(size, size, n, seed=1)
    assert np.all(np.sort(draws, 1) == np.arange(size))
    _chi_square_uniform_tuples(draws, size, size)


def test_every_element_is_drawn_as_often_from_a_large_plate():
    size, b, n = 1000, 100, 4_000
    draws = _draws(size, b, n, seed=2)
    assert all(len(set(d)) == b for d in draws.tolist())
    _chi_square_uniform(np.bincount(draws.ravel(), minlength=size))


def test_bad_sizes_and_a_missing_key_are_clear_errors():
    with pytest.raises(ValueError, match="subsample_size must be in"):
        subsample_indices(10, 11, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="Missing random key"):
        subsample_indices(10, 1)


def _two_plates():
    with numpyro.plate("big", 1000, subsample_size=10) as big:
        numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("small", 10, subsample_size=6) as small:
        numpyro.sample("b", dist.Normal(0.0, 1.0))
    return big, small


def test_the_handler_takes_small_subsamples_only_and_leaves_given_indices():
    fns = {}

    class record(numpyro.primitives.Messenger):
        def process_message(self, msg):
            if msg["type"] == "plate":
                fns[msg["name"]] = msg["fn"]

    with handlers.seed(rng_seed=0):
        with record():  # inside: sees the messages after subsample_draws rewrote them
            big, small = subsample_draws(_two_plates)()
    assert fns["big"] is subsample_indices and fns["small"] is not subsample_indices
    assert len(set(np.asarray(big).tolist())) == 10 and len(set(np.asarray(small).tolist())) == 6
    given = jnp.arange(10)
    big, _ = handlers.substitute(handlers.seed(subsample_draws(_two_plates), 0), data={"big": given})()
    np.testing.assert_array_equal(big, given)
    # every trace the guide takes goes through seeded_model, hence through the handler
    trace = handlers.trace(seeded_model(_two_plates, jax.random.PRNGKey(3))).get_trace()
    assert trace["big"]["fn"] is subsample_indices
    assert len(set(np.asarray(trace["big"]["value"]).tolist())) == 10


def test_a_training_step_holds_no_array_of_the_whole_plate():
    # NumPyro's shuffle builds arange(N) at every step; the guide's plates draw without it
    n = 100_000

    def model(x):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", n, subsample_size=8) as idx:
            theta = numpyro.sample("theta", dist.Normal(mu, 1.0))
            numpyro.sample("x", dist.Normal(theta, 0.5), obs=x[idx])

    x = jnp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))
    guide = AutoPAVI(model, laplace=False, encoding_dim=2, hidden_dims=(4,))
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x)
    text = str(jax.make_jaxpr(lambda s, x: svi.update(s, x))(state, x))
    whole = [line for line in text.splitlines() if f"i32[{n}]" in line or f"i64[{n}]" in line]
    assert not whole, whole[:3]
    loss = jax.jit(lambda s, x: svi.update(s, x)[1])(state, x)
    assert np.isfinite(float(loss))
