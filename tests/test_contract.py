"""AutoPAVI honours the contract of NumPyro's autoguides.

What NumPyro's own guide tests ask of ``AutoNormal``, stated here for AutoPAVI: deterministic
sites in ``sample_posterior`` (with and without the model's arguments), forward-mode
differentiation, NumPyro's wording for unsupported supports, ``median``/``quantiles`` shapes,
``Predictive`` from the guide and from posterior samples, ``sample_shape`` of any rank,
membership of an ``AutoGuideList`` and NumPyro's VSBC diagnostic.

One small two-level model is fitted once for the module (JAX compilation dominates).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoGuideList, AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.autoguide import _BASE_TAKES_FORWARD_MODE

G, M = 6, 4
SMALL = {"encoding_dim": 2, "hidden_dims": (4,)}


def two_level(x=None):
    """``mu -> mu_g[g] -> x[g, m]``, plus deterministic sites at both levels."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    numpyro.deterministic("mu2", 2.0 * mu)
    with numpyro.plate("groups", G, dim=-2):
        mu_g = numpyro.sample("mu_g", dist.Normal(mu, 1.0))
        numpyro.deterministic("shift", mu_g - mu)
        with numpyro.plate("obs", M, dim=-1):
            numpyro.sample("x", dist.Normal(mu_g, 0.5), obs=x)


X = handlers.seed(lambda: handlers.trace(two_level).get_trace()["x"]["value"], 0)()


@pytest.fixture(scope="module")
def fitted():
    guide = AutoPAVI(two_level, encoding="free", **SMALL)
    svi = SVI(two_level, guide, optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 300, X, progress_bar=False)
    return guide, result.params


# ---------------------------------------------------------------------------------------------
# deterministic sites
# ---------------------------------------------------------------------------------------------
def test_deterministic_sites_with_the_models_arguments(fitted):
    guide, params = fitted
    s = guide.sample_posterior(jax.random.PRNGKey(1), params, X, sample_shape=(3,))
    assert s["mu2"].shape == (3,) and s["shift"].shape == (3, G, 1)
    np.testing.assert_allclose(s["mu2"], 2 * s["mu"], rtol=1e-6)
    np.testing.assert_allclose(s["shift"], s["mu_g"] - s["mu"][:, None, None], rtol=1e-5, atol=1e-6)


def test_deterministic_sites_without_arguments(fitted):
    """As NumPyro's guides: the model runs on its defaults (here ``x`` is then drawn)."""
    guide, params = fitted
    s = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(2,))
    assert set(s) == {"mu", "mu_g", "mu2", "shift"}
    np.testing.assert_allclose(s["mu2"], 2 * s["mu"], rtol=1e-6)


def test_global_deterministic_follows_new_data():
    """NumPyro's pattern: fit on data, sample without it, recompute deterministics with Predictive."""

    def model(y=None):
        n = 1 if y is None else y.shape[0]
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        with numpyro.plate("N", n):
            y = numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        numpyro.deterministic("z", y - mu)

    y = 2.0 + jax.random.normal(jax.random.PRNGKey(0), (50,))
    guide = AutoPAVI(model, **SMALL)
    params = SVI(model, guide, optax.adam(3e-2), Trace_ELBO()).run(jax.random.PRNGKey(0), 300, y, progress_bar=False).params
    post = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=(200,))
    assert post.pop("z").shape == (200, 1)
    # exact posterior of mu: N(sum(y) / (n + 1/25), 1 / (n + 1/25))
    prec = 50 + 1 / 25
    assert abs(float(post["mu"].mean()) - float(y.sum()) / prec) < 4 * (1 / prec) ** 0.5
    pred = Predictive(model, post)(jax.random.PRNGKey(2), y[:7])
    np.testing.assert_allclose(pred["z"], y[:7] - post["mu"][:, None], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# forward-mode differentiation
# ---------------------------------------------------------------------------------------------
def test_forward_mode_differentiation():
    """A ``while_loop`` model: reverse mode cannot differentiate it, forward mode can."""

    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0))
        y = jax.lax.while_loop(lambda v: v < 10.0, lambda v: v + 1.0, x)
        numpyro.sample("obs", dist.Normal(y, 1.0), obs=10.5)

    if not _BASE_TAKES_FORWARD_MODE:
        with pytest.raises(ValueError, match="NumPyro >= 0.21"):
            AutoPAVI(model, forward_mode_differentiation=True)
        return
    guide = AutoPAVI(model, forward_mode_differentiation=True, **SMALL)
    assert guide._forward_mode_differentiation
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 20, forward_mode_differentiation=True, progress_bar=False)
    assert np.all(np.isfinite(result.losses))


# ---------------------------------------------------------------------------------------------
# supports no flow can handle: NumPyro's wording, then ours
# ---------------------------------------------------------------------------------------------
def test_discrete_latent_gets_numpyros_message():
    def model():
        p = numpyro.sample("p", dist.Beta(2.0, 2.0))
        k = numpyro.sample("k", dist.Bernoulli(p))
        numpyro.sample("obs", dist.Normal(k, 1.0), obs=1.0)

    with pytest.raises(ValueError, match=r"(?s)cannot handle discrete sample site 'k'.*enumerat"):
        handlers.seed(AutoPAVI(model), 0)()


def test_spherical_latent_gets_numpyros_message():
    def model():
        x = numpyro.sample("x", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        y = numpyro.sample("y", dist.ProjectedNormal(x))
        numpyro.sample("obs", dist.Normal(y, 1.0), obs=jnp.array([1.0, 0.0]))

    with pytest.raises(ValueError, match=r"spherical sample site 'y'.*ProjectedNormalReparam"):
        handlers.seed(AutoPAVI(model), 0)()


# ---------------------------------------------------------------------------------------------
# posterior API shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_shape", [(), (2,), (2, 3)])
def test_sample_shape_of_any_rank(fitted, sample_shape):
    guide, params = fitted
    s = guide.sample_posterior(jax.random.PRNGKey(1), params, X, sample_shape=sample_shape)
    assert s["mu"].shape == sample_shape
    assert s["mu_g"].shape == sample_shape + (G, 1)
    assert s["shift"].shape == sample_shape + (G, 1)


def test_median_and_quantiles_shapes(fitted):
    guide, params = fitted
    med = guide.median(params, X, num_samples=50)
    assert set(med) == {"mu", "mu_g"} and med["mu"].shape == () and med["mu_g"].shape == (G, 1)
    q = guide.quantiles(params, [0.1, 0.5, 0.9], X, num_samples=50)
    assert q["mu"].shape == (3,) and q["mu_g"].shape == (3, G, 1)
    assert np.all(np.diff(np.asarray(q["mu_g"]), axis=0) >= 0)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_posterior_api_shapes_match_autonormal(fitted):
    """``median``, ``quantiles`` (lists of one and of several levels, a single level) and
    ``sample_posterior`` give AutoNormal's shapes on the same model (issue 28: ``[0.5]``
    dropped its axis where ``[0.4]`` kept it)."""
    guide, params = fitted
    normal = AutoNormal(two_level)
    svi = SVI(two_level, normal, optax.adam(1e-2), Trace_ELBO())
    nparams = svi.get_params(svi.init(jax.random.PRNGKey(0), X))
    shape = lambda d: {k: tuple(np.shape(v)) for k, v in d.items() if k in ("mu", "mu_g")}
    assert shape(guide.median(params, X, num_samples=20)) == shape(normal.median(nparams))
    for levels in ([0.5], [0.4], [0.1, 0.5, 0.9], 0.5):
        got = guide.quantiles(params, levels, X, num_samples=20)
        assert shape(got) == shape(normal.quantiles(nparams, levels)), levels
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, X, sample_shape=(3,))
    ref = normal.sample_posterior(jax.random.PRNGKey(1), nparams, X, sample_shape=(3,))
    assert shape(draws) == shape(ref)


def test_predictive_from_guide_and_from_samples(fitted):
    guide, params = fitted
    from_guide = Predictive(two_level, guide=guide, params=params, num_samples=5)(jax.random.PRNGKey(2))
    # as with NumPyro's guides, the guide's own sites are not returned by default
    assert from_guide["x"].shape == (5, G, M) and from_guide["shift"].shape == (5, G, 1)
    post = guide.sample_posterior(jax.random.PRNGKey(3), params, X, sample_shape=(5,))
    from_samples = Predictive(two_level, posterior_samples=post)(jax.random.PRNGKey(4))
    assert from_samples["x"].shape == (5, G, M)
    if "mu_g" in from_samples:  # NumPyro >= 0.21 also returns the given latents
        np.testing.assert_allclose(from_samples["mu_g"], post["mu_g"])


# ---------------------------------------------------------------------------------------------
# AutoGuideList
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_shape", [(), (2, 3)])
def test_member_of_an_auto_guide_list(sample_shape):
    def model():
        a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        b = numpyro.sample("b", dist.Normal(a.sum(), 1.0))
        numpyro.deterministic("c", a * b)
        numpyro.sample("y", dist.Normal(b, 1.0), obs=0.5)

    guide = AutoGuideList(model)
    guide.append(AutoPAVI(handlers.block(model, hide=["b", "c"]), **SMALL))
    guide.append(AutoNormal(handlers.block(model, expose=["b"])))
    params = SVI(model, guide, optax.adam(1e-2), Trace_ELBO()).run(jax.random.PRNGKey(0), 20, progress_bar=False).params
    s = guide.sample_posterior(jax.random.PRNGKey(1), params, sample_shape=sample_shape)
    # AutoGuideList returns its members' latents (deterministic sites must be hidden from them)
    assert s["a"].shape == sample_shape + (2,) and s["b"].shape == sample_shape


# ---------------------------------------------------------------------------------------------
# NumPyro's VSBC diagnostic (NumPyro >= 0.22)
# ---------------------------------------------------------------------------------------------
def test_vsbc_diagnostic_runs_with_autopavi():
    calibration = pytest.importorskip("numpyro.infer.calibration")

    def model(x=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", 3, dim=-2):
            mu_g = numpyro.sample("mu_g", dist.Normal(mu, 1.0))
            with numpyro.plate("obs", 2, dim=-1):
                numpyro.sample("x", dist.Normal(mu_g, 0.5), obs=x)

    result = calibration.vsbc_diagnostic(
        jax.random.PRNGKey(0),
        model,
        AutoPAVI(model, encoding="free", **SMALL),
        numpyro.optim.Adam(1e-2),
        Trace_ELBO(),
        observed_sites=["x"],
        num_simulations=3,
        num_svi_steps=20,
        num_samples=20,
    )
    probs = jax.tree.leaves(result)[0]
    assert np.all(np.isfinite(np.asarray(probs)))
