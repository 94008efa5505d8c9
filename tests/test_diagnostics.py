"""Tests for numpyro_pavi.diagnostics (PSIS k-hat) and numpyro_pavi.arviz (InferenceData export).

The reference case is the Gaussian random-effects model with ``K=1``: its exact posterior
is Gaussian with every ``mu_g`` depending linearly on ``mu`` only, which AutoPAVI's family
(free encodings, affine flow conditioned on the parent ``mu``) contains exactly, so a
well-trained guide must pass PSIS, while the guide at its initialization must fail it.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.initialization import init_to_sample
from numpyro.infer.util import log_density

from numpyro_pavi import AutoPAVI
from numpyro_pavi.arviz import site_dims, to_inference_data
from numpyro_pavi.diagnostics import PSISResult, khat_category, psis_diagnostic, psis_khat
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import (
    nested_three_level,
    random_effects,
    simulate_nested_three_level,
    simulate_random_effects,
)

G, M, K = 10, 5, 1
STEPS = 1000
NUM_SAMPLES = 1000


@pytest.fixture(scope="module")
def data() -> jax.Array:
    return simulate_random_effects(jax.random.PRNGKey(1), G, M, K)


@pytest.fixture(scope="module")
def fitted(data):
    """AutoPAVI (free encodings) trained to convergence on the random-effects model."""
    # laplace=False: the guide at its initialization must be poor, and Laplace bases (the
    # default) start near this Gaussian posterior (k-hat 0.69 at initialization)
    guide = AutoPAVI(random_effects, encoding="free", laplace=False)
    # The decay lets the noisy single-particle gradients settle on the optimum.
    schedule = optax.exponential_decay(0.02, STEPS, 0.05)
    svi = SVI(random_effects, guide, numpyro.optim.optax_to_numpyro(optax.adam(schedule)), Trace_ELBO())
    # svi.init runs eagerly (slow): do it once and keep its params as the "poor guide"
    state = svi.init(jax.random.PRNGKey(0), data)
    init_params = svi.get_params(state)
    result = svi.run(jax.random.PRNGKey(0), STEPS, data, progress_bar=False, init_state=state)
    return guide, result.params, init_params, np.asarray(result.losses)


@pytest.fixture(scope="module")
def psis_fitted(fitted, data) -> PSISResult:
    guide, params, _, _ = fitted
    return psis_khat(guide, params, data, num_samples=NUM_SAMPLES, rng_key=jax.random.PRNGKey(2))


# ---------------------------------------------------------------------------------------------
# PSIS diagnostic
# ---------------------------------------------------------------------------------------------


def test_khat_small_for_exact_family(psis_fitted: PSISResult) -> None:
    r = psis_fitted
    print(f"\nexact-family k-hat: {r.khat:.3f}, per element max {r.khat_per_element['groups'].max():.3f}")
    assert r.khat < 0.5
    assert khat_category(r.khat) == "good"
    assert r.ess > 0.2 * NUM_SAMPLES
    assert np.all(r.khat_per_element["groups"] < 0.7)
    assert "good" in r.summary()


def test_khat_large_for_poor_guide(fitted, data) -> None:
    guide, _, init_params, _ = fitted
    r = psis_khat(guide, init_params, data, num_samples=NUM_SAMPLES, rng_key=jax.random.PRNGKey(2))
    print(f"\npoor-guide k-hat: {r.khat:.3f}")
    assert r.khat > 0.7
    assert khat_category(r.khat) == "bad"
    assert r.ess < 0.05 * NUM_SAMPLES
    assert "unreliable" in r.summary()


def test_shapes(psis_fitted: PSISResult) -> None:
    r = psis_fitted
    assert r.log_weights.shape == (NUM_SAMPLES,)
    assert r.smoothed_log_weights.shape == (NUM_SAMPLES,)
    assert set(r.khat_per_element) == {"groups"}
    assert r.khat_per_element["groups"].shape == (G,)
    assert r.local_log_weights["groups"].shape == (NUM_SAMPLES, G)
    assert np.isclose(np.logaddexp.reduce(r.smoothed_log_weights), 0.0, atol=1e-6)
    assert 1.0 <= r.ess <= NUM_SAMPLES


def test_log_evidence_matches_exact(psis_fitted: PSISResult, data) -> None:
    """mean(exp(log w)) is an unbiased estimate of p(x): compare with the closed form."""
    r = psis_fitted
    exact = random_effects_posterior(np.asarray(data))["log_evidence"]
    w = np.exp(r.log_weights - r.log_weights.max())
    # delta method: sd of log(mean w) ~ sd(w) / (mean(w) sqrt(S))
    se = w.std() / (w.mean() * math.sqrt(NUM_SAMPLES))
    assert abs(r.log_evidence - exact) < 4 * se + 0.02, (r.log_evidence, exact, se)
    assert r.elbo <= exact + 4 * se  # the ELBO bounds log p(x) from below


def test_log_weights_match_log_density(fitted, data, psis_fitted: PSISResult) -> None:
    """Recompute log p - log q with NumPyro's log_density on the same draws."""
    guide, params, _, _ = fitted
    values, log_q = guide.sample_with_log_prob(jax.random.PRNGKey(2), params, data, sample_shape=(NUM_SAMPLES,))
    for s in (0, 7):
        value = {k: v[s] for k, v in values.items()}
        log_p, _ = log_density(random_effects, (data,), {}, value)
        expected = log_p - sum(jnp.sum(v[s]) for v in log_q.values())
        np.testing.assert_allclose(psis_fitted.log_weights[s], expected, rtol=1e-5, atol=1e-3)
    # Every site but mu sits in "groups": its local weights plus mu's terms make the total.
    mu = values["mu"]
    log_p_mu = dist.Normal(0.0, 0.5).log_prob(mu).sum(-1)
    total = psis_fitted.local_log_weights["groups"].sum(-1) + log_p_mu - log_q["mu"]
    np.testing.assert_allclose(total, psis_fitted.log_weights, rtol=1e-5, atol=1e-3)


def test_subsampled_model_uses_full_plates(fitted, data, psis_fitted: PSISResult) -> None:
    """A subsampling model is evaluated over its full plates, unscaled: same weights."""
    guide, params, _, _ = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected subsample_size warning must be silenced
        r = psis_khat(
            guide,
            params,
            data,
            num_samples=NUM_SAMPLES,
            rng_key=jax.random.PRNGKey(2),
            per_element=False,
            subsample_size=3,
        )
    assert r.khat_per_element == {}
    np.testing.assert_allclose(r.log_weights, psis_fitted.log_weights, rtol=1e-6, atol=1e-4)


@pytest.mark.slow
def test_per_element_nested_plates() -> None:
    S, T, Mn = 3, 4, 2
    x = simulate_nested_three_level(jax.random.PRNGKey(0), S, T, Mn)
    # init_to_sample: these tests need any params, and the default init runs eagerly (slow)
    guide = AutoPAVI(nested_three_level, encoding="free", init_loc_fn=init_to_sample)
    svi = SVI(nested_three_level, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), x))
    r = psis_khat(guide, params, x, num_samples=200)
    assert {p: k.shape for p, k in r.khat_per_element.items()} == {"subjects": (S,), "sessions": (T,)}
    assert r.local_log_weights["sessions"].shape == (200, T)
    assert np.all(np.isfinite(r.log_weights))


def test_khat_category_thresholds() -> None:
    ks = (0.1, 0.5, 0.69, 0.7, 3.0, float("inf"), float("nan"))
    assert [khat_category(k) for k in ks] == ["good", "ok", "ok", "bad", "bad", "bad", "bad"]


def test_errors(data) -> None:
    with pytest.raises(RuntimeError, match="not set up"):
        psis_khat(AutoPAVI(random_effects), {}, data)
    with pytest.raises(RuntimeError, match="not set up"):
        to_inference_data(AutoPAVI(random_effects), {}, data)


def test_deprecated_psis_diagnostic_warns_and_forwards(data) -> None:
    # the old name (NumPyro's psis_diagnostic is another function) warns, then runs psis_khat
    with pytest.warns(FutureWarning, match="use psis_khat"), pytest.raises(RuntimeError, match="not set up"):
        psis_diagnostic(AutoPAVI(random_effects), {}, data)


# ---------------------------------------------------------------------------------------------
# ArviZ export
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idata(fitted, data) -> az.InferenceData:
    guide, params, _, losses = fitted
    return to_inference_data(guide, params, data, num_samples=200, log_likelihood=True, losses=losses)


def test_posterior_dims_named_after_plates(idata: az.InferenceData) -> None:
    post = idata.posterior
    assert post["mu"].dims == ("chain", "draw", "mu_dim_0")
    # mu_g has site shape (G, 1, K): the size-1 dim left by the "obs" plate is squeezed
    assert post["mu_g"].dims == ("chain", "draw", "groups", "mu_g_dim_0")
    assert post["mu_g"].shape == (1, 200, G, K)
    np.testing.assert_array_equal(post["groups"].values, np.arange(G))
    np.testing.assert_array_equal(post["draw"].values, np.arange(200))
    assert post.attrs["guide"] == "AutoPAVI"


def test_observed_data(idata: az.InferenceData, data) -> None:
    obs = idata.observed_data["x"]
    assert obs.dims == ("groups", "obs", "x_dim_0")
    np.testing.assert_allclose(obs.values, np.asarray(data))
    np.testing.assert_array_equal(idata.observed_data["obs"].values, np.arange(M))


def test_log_likelihood_and_loo(idata: az.InferenceData) -> None:
    ll = idata.log_likelihood["x"]
    assert ll.dims == ("chain", "draw", "groups", "obs")
    assert ll.shape == (1, 200, G, M)
    assert np.all(np.isfinite(ll.values))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one chain: arviz warns about its own shape checks
        loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo)
    assert loo.pareto_k.shape == (G, M)


def test_summary_runs(idata: az.InferenceData) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = az.summary(idata, kind="stats")
    assert len(summary) == K + G * K
    assert "mu_g[0, 0]" in summary.index


def test_losses_stored(idata: az.InferenceData, fitted) -> None:
    losses = fitted[3]
    assert "svi" in idata.groups()
    assert idata.svi["loss"].dims == ("step",)
    np.testing.assert_allclose(idata.svi["loss"].values, losses)
    assert idata.posterior.attrs["final_loss"] == pytest.approx(float(losses[-1]))


def test_optional_groups_and_no_squeeze(fitted, data) -> None:
    guide, params, _, _ = fitted
    out = to_inference_data(guide, params, data, num_samples=10, squeeze=False)
    assert set(out.groups()) == {"posterior", "observed_data"}
    assert out.posterior["mu_g"].dims == ("chain", "draw", "groups", "mu_g_dim_0", "mu_g_dim_1")
    assert out.posterior["mu_g"].shape == (1, 10, G, 1, K)


def _model_with_deterministic(y: jax.Array) -> None:
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("units", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, 1.0))
        numpyro.deterministic("theta_sq", theta**2)
        numpyro.sample("y", dist.Normal(theta, 0.5), obs=y)


def test_deterministic_sites_and_sample_posterior_contract() -> None:
    y = jnp.array([0.1, -0.4, 1.3, 0.8])
    guide = AutoPAVI(_model_with_deterministic, encoding="free", init_loc_fn=init_to_sample)
    svi = SVI(_model_with_deterministic, guide, numpyro.optim.Adam(0.01), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), y))
    # arviz-base's from_numpyro_svi calls sample_posterior(key, params, *args, sample_shape=(n,))
    samples = guide.sample_posterior(jax.random.PRNGKey(1), params, y, sample_shape=(7,))
    assert {k: v.shape for k, v in samples.items()} == {"mu": (7,), "theta": (7, 4), "theta_sq": (7, 4)}
    out = to_inference_data(guide, params, y, num_samples=7, log_likelihood=True)
    assert out.posterior["theta_sq"].dims == ("chain", "draw", "units")
    assert out.posterior["mu"].dims == ("chain", "draw")
    assert out.log_likelihood["y"].dims == ("chain", "draw", "units")
    np.testing.assert_allclose(out.posterior["theta_sq"].values, out.posterior["theta"].values ** 2, rtol=1e-5)


def test_site_dims() -> None:
    sizes = {"groups": 10, "obs": 5}
    plate_dims = {"groups": -2, "obs": -1}
    assert site_dims("x", (10, 5, 3), 1, plate_dims, sizes) == (["groups", "obs", "x_dim_0"], ())
    assert site_dims("m", (10, 1, 3), 1, {"groups": -2}, sizes) == (["groups", "m_dim_0"], (1,))
    assert site_dims("m", (10, 1, 3), 1, {"groups": -2}, sizes, squeeze=False) == (
        ["groups", "m_dim_0", "m_dim_1"],
        (),
    )
    # a plate position whose size does not match is not named after the plate
    assert site_dims("d", (10, 2), 0, plate_dims, sizes) == (["groups", "d_dim_0"], ())


def test_deterministic_event_dims_are_inferred() -> None:
    """NumPyro records no event dims for a deterministic site: ``exp(beta)`` of a ``(G, K)``
    site in a plate at ``dim=-1`` keeps ``groups`` on its first axis, also when ``K == G``."""
    from numpyro_pavi.arviz import deterministic_event_ndim

    for shape in ((3, 3), (5, 3), (5, 1)):
        e = deterministic_event_ndim(shape, {"groups": -1}, {"groups": shape[0]})
        assert e == 1
        names, drop = site_dims("w", shape, e, {"groups": -1}, {"groups": shape[0]})
        assert names == ["groups", "w_dim_0"] and drop == (), (shape, names)
    assert deterministic_event_ndim((5,), {"groups": -1}, {"groups": 5}) == 0
    assert deterministic_event_ndim((10, 5), {"groups": -2, "obs": -1}, {"groups": 10, "obs": 5}) == 0
    assert deterministic_event_ndim((10, 1, 3), {"groups": -2}, {"groups": 10}) == 1
    assert deterministic_event_ndim((4, 7), {"groups": -1}, {"groups": 5}) == 0  # no count fits
