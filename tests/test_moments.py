"""Streamed posterior moments (``AutoPAVI.posterior_moments``) against in-memory draws."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI


def model(x, subsample_size=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", x.shape[0], subsample_size=subsample_size, dim=-2) as idx:
        g = numpyro.sample("g", dist.Normal(mu, tau))
        numpyro.deterministic("g_sq", g**2)
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Normal(g, 0.5), obs=x[idx])


@pytest.fixture(scope="module")
def setup():
    x = jax.random.normal(jax.random.PRNGKey(0), (30, 4)) + 1.0
    guide = AutoPAVI(model)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    # moments of any parameters will do: the test is the streaming arithmetic
    params = svi.get_params(svi.init(jax.random.PRNGKey(1), x, subsample_size=8))
    return guide, params, x


def test_streamed_moments_equal_in_memory_ones(setup):
    guide, params, x = setup
    key = jax.random.PRNGKey(2)
    # 250 draws in batches of 64: the last batch is short (padded and masked)
    got = guide.posterior_moments(key, params, x, num_samples=250, batch_size=64)
    draws = guide.sample_posterior(key, params, x, sample_shape=(250,))
    assert set(got) == {"mu", "tau", "g", "g_sq"}
    for site, v in draws.items():
        v = np.asarray(v, np.float64)
        assert got[site]["mean"].shape == v.shape[1:]
        np.testing.assert_allclose(got[site]["mean"], v.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[site]["sd"], v.std(0, ddof=1), rtol=1e-4, atol=1e-5)
    # the batch size changes the memory held, not the answer
    other = guide.posterior_moments(key, params, x, num_samples=250, batch_size=250)
    np.testing.assert_allclose(other["g"]["sd"], got["g"]["sd"], rtol=1e-4)


@pytest.mark.parametrize("kw", [{"num_samples": 1}, {"batch_size": 0}, {"num_samples": 2.5}])
def test_moments_reject_bad_counts(setup, kw):
    guide, params, x = setup
    with pytest.raises(ValueError, match="must be an int"):
        guide.posterior_moments(jax.random.PRNGKey(0), params, x, **kw)


def test_moments_of_a_plate_larger_than_one_batch_of_draws_fits(setup):
    """Memory holds one batch: 100 draws one at a time give the same moments."""
    guide, params, x = setup
    a = guide.posterior_moments(jax.random.PRNGKey(3), params, x, num_samples=100, batch_size=1)
    b = guide.posterior_moments(jax.random.PRNGKey(3), params, x, num_samples=100, batch_size=100)
    for site in a:
        np.testing.assert_allclose(a[site]["mean"], b[site]["mean"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(a[site]["sd"], b[site]["sd"], rtol=1e-3, atol=1e-5)
    assert jnp.all(jnp.isfinite(a["g"]["sd"]))
