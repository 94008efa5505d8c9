"""Posterior summaries streamed over plate elements (``AutoPAVI.posterior_summary``)."""

from functools import partial

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.models import nested_three_level, simulate_nested_three_level

LEVELS = (0.1, 0.5, 0.9)


def model(x, subsample_size=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", x.shape[0], subsample_size=subsample_size, dim=-2) as idx:
        g = numpyro.sample("g", dist.Normal(mu, tau))
        with numpyro.plate("obs", x.shape[1], dim=-1):
            numpyro.sample("x", dist.Normal(g, 0.5), obs=x[idx])


def _fit(model_fn, x, steps, batch):
    guide = AutoPAVI(model_fn)
    svi = SVI(model_fn, guide, optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(1), steps, x, subsample_size=batch, progress_bar=False)
    return guide, result.params


@pytest.fixture(scope="module")
def fitted():
    x = jax.random.normal(jax.random.PRNGKey(0), (21, 4)) + 1.0
    guide, params = _fit(model, x, 200, 7)
    return guide, params, x


@pytest.fixture(scope="module")
def whole(fitted):
    """The summary made in one chunk (every element at once)."""
    guide, params, x = fitted
    return guide.posterior_summary(jax.random.PRNGKey(2), params, x, num_samples=300, quantiles=LEVELS, chunk_size=64)


def test_chunked_summary_equals_the_unchunked_one(fitted, whole):
    """21 groups in chunks of 4 (the last one padded): the same draws, so the same summaries."""
    guide, params, x = fitted
    got = guide.posterior_summary(jax.random.PRNGKey(2), params, x, num_samples=300, quantiles=LEVELS, chunk_size=4)
    assert set(got) == {"mu", "tau", "g"}
    assert got["g"]["mean"].shape == (21, 1) and got["g"]["quantiles"].shape == (3, 21, 1)
    assert got["tau"]["quantiles"].shape == (3,)
    for site in got:
        for what in ("mean", "sd", "quantiles"):
            np.testing.assert_allclose(got[site][what], whole[site][what], rtol=1e-5, atol=1e-6)


def test_summary_equals_in_memory_statistics_of_its_draws(fitted, whole, tmp_path):
    """The draws written to Zarr, loaded whole, give the streamed summaries (and ArviZ reads them)."""
    import arviz as az
    import xarray as xr

    guide, params, x = fitted
    store = str(tmp_path / "post.zarr")
    got = guide.posterior_summary(
        jax.random.PRNGKey(2), params, x, num_samples=300, quantiles=LEVELS, chunk_size=5, store=store
    )
    post = xr.open_zarr(store, group="posterior")
    assert post["g"].dims == ("chain", "draw", "groups", "g_dim_0")
    assert post["g"].shape == (1, 300, 21, 1) and post["tau"].dims == ("chain", "draw")
    for site in ("mu", "tau", "g"):
        draws = np.asarray(post[site].values[0], np.float64)
        np.testing.assert_allclose(got[site]["mean"], draws.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[site]["sd"], draws.std(0, ddof=1), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[site]["quantiles"], np.quantile(draws, LEVELS, axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[site]["mean"], whole[site]["mean"], rtol=1e-5, atol=1e-6)
    summary = xr.open_zarr(store, group="summary")
    np.testing.assert_allclose(summary["g_quantiles"].sel(quantile=0.5).values, got["g"]["quantiles"][1])
    idata = az.InferenceData(posterior=post)
    assert az.summary(idata, var_names=["tau"], kind="stats", round_to="none")["mean"].iloc[0] == pytest.approx(
        float(got["tau"]["mean"]), rel=1e-4
    )


def test_summary_draws_follow_the_posterior_samplers_distribution(fitted, whole):
    """Other noise than ``sample_posterior`` (per-element keys), same distribution: the means
    agree within Monte Carlo error (5 standard errors of a difference of two means)."""
    guide, params, x = fitted
    draws = guide.sample_posterior(jax.random.PRNGKey(9), params, x, sample_shape=(300,))
    for site in ("mu", "tau", "g"):
        d = np.asarray(draws[site], np.float64)
        se = np.sqrt(2.0 / 300) * d.std(0, ddof=1)
        assert np.all(np.abs(whole[site]["mean"] - d.mean(0)) < 5 * se + 1e-6), site
        np.testing.assert_allclose(whole[site]["sd"], d.std(0, ddof=1), rtol=0.3)


@pytest.mark.slow
def test_nested_plates_chunk_the_outer_plate():
    """Subjects > sessions: chunks of subjects carry their sessions; chunking changes nothing."""
    x = simulate_nested_three_level(jax.random.PRNGKey(3), 9, 3, 4)
    model_fn = nested_three_level
    guide, params = _fit(model_fn, x, 30, 3)
    kw = {"num_samples": 50, "quantiles": (0.5,)}
    a = guide.posterior_summary(jax.random.PRNGKey(4), params, x, chunk_size=2, **kw)
    b = guide.posterior_summary(jax.random.PRNGKey(4), params, x, chunk_size=9, plate="subjects", **kw)
    assert a["mu_st"]["mean"].shape == (9, 3, 1)
    for site in ("mu", "mu_s", "mu_st"):
        np.testing.assert_allclose(a[site]["mean"], b[site]["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[site]["quantiles"], b[site]["quantiles"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"plate": "obs"}, "Latent site 'g' does not sit in plate 'obs'"),
        ({"plate": "nope"}, "not a plate of the model"),
        ({"num_samples": 1}, "num_samples must be an int >= 2"),
        ({"chunk_size": 0}, "chunk_size must be an int >= 1"),
        ({"quantiles": [0.5, 1.5]}, "levels in \\[0, 1\\]"),
    ],
)
def test_summary_rejects_bad_options(fitted, kw, match):
    guide, params, x = fitted
    with pytest.raises(ValueError, match=match):
        guide.posterior_summary(jax.random.PRNGKey(0), params, x, **kw)


def test_summary_names_the_fix_when_the_model_ignores_the_plate_indices(fitted):
    """A model that reads all its data whatever the plate's indices cannot be chunked."""
    x = fitted[2]

    def unindexed(x, subsample_size=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("groups", x.shape[0], subsample_size=subsample_size, dim=-2):
            g = numpyro.sample("g", dist.Normal(mu, tau))
            with numpyro.plate("obs", x.shape[1], dim=-1):
                numpyro.sample("x", dist.Normal(g, 0.5), obs=x)

    other = AutoPAVI(unindexed)
    numpyro.handlers.seed(other, 0)(x)
    with pytest.raises(ValueError, match="must index its data with the plate's indices"):
        other.posterior_summary(jax.random.PRNGKey(0), dict(other.plan.init_values), x, chunk_size=4)


def test_zero_quantiles_and_a_partial_model_argument(fitted):
    """An empty quantile list is allowed; keyword model arguments pass through."""
    guide, params, x = fitted
    got = partial(guide.posterior_summary, jax.random.PRNGKey(0), params)(
        x, num_samples=20, quantiles=(), chunk_size=10, subsample_size=None
    )
    assert got["g"]["quantiles"].shape == (0, 21, 1)
    assert np.all(np.isfinite(got["g"]["sd"]))


@pytest.mark.slow
def test_crossed_design_streams_one_plate_at_a_time():
    """Rows x columns (no plate holds both effects): one pass per plate, chunks of 5, the
    other plate at full size; the summary matches streamed moments of independent draws
    within Monte Carlo error (1,000 draws each: a mean differs by 0.045 sd in se)."""
    from numpyro_pavi.examples.models import crossed, simulate_crossed
    from numpyro_pavi.summaries import _passes

    y = simulate_crossed(jax.random.PRNGKey(0), 12, 8)
    guide = AutoPAVI(crossed)
    result = SVI(crossed, guide, optax.adam(1e-2), Trace_ELBO()).run(jax.random.PRNGKey(1), 300, y, progress_bar=False)
    assert _passes(guide.structure, None) == [("rows", ("r",)), ("cols", ("c",))]
    s = guide.posterior_summary(jax.random.PRNGKey(2), result.params, y, num_samples=1000, chunk_size=5)
    m = guide.posterior_moments(jax.random.PRNGKey(3), result.params, y, num_samples=1000, batch_size=250)
    for site in ("r", "c"):
        assert s[site]["mean"].shape == m[site]["mean"].shape
        sd = np.asarray(m[site]["sd"])
        z = np.abs(s[site]["mean"] - np.asarray(m[site]["mean"])) / sd
        assert z.max() < 0.25, (site, z.max())
        np.testing.assert_allclose(s[site]["sd"], sd, rtol=0.15)
        assert np.all(s[site]["quantiles"][0] < s[site]["quantiles"][-1])


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_ragged_laplace_sites_chunk_exactly():
    """Observations reach their group through an index array (not nested in the groups'
    plate): a chunk's per-step Laplace bases must still read every group's own observations,
    so 9 groups in chunks of 4 give the unchunked summary (the same keys, the same draws)."""
    from numpyro_pavi.examples.models import ragged_groups, simulate_ragged_groups

    y, group, cov = simulate_ragged_groups(jax.random.PRNGKey(0), 9)
    m = partial(ragged_groups, num_groups=9)
    guide = AutoPAVI(m)
    numpyro.handlers.seed(guide, 0)(y, group, cov)
    params = dict(guide.plan.init_values)
    kw = dict(num_samples=40, quantiles=(0.5,))
    whole = guide.posterior_summary(jax.random.PRNGKey(2), params, y, group, cov, chunk_size=64, **kw)
    got = guide.posterior_summary(jax.random.PRNGKey(2), params, y, group, cov, chunk_size=4, **kw)
    for site in ("a", "b"):
        np.testing.assert_allclose(got[site]["mean"], whole[site]["mean"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got[site]["sd"], whole[site]["sd"], rtol=1e-3, atol=1e-4)
