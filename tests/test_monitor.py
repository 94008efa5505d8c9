"""Divergence monitoring: the loss criterion, KeepBest inside svi.run, fit's best params and
its warning naming the site."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import DivergenceWarning, KeepBest, best_params, check_losses, fit
from numpyro_pavi.monitor import running_mean

X = jnp.asarray(np.random.default_rng(0).normal(1.5, 1.0, size=200), dtype=jnp.float32)


def model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def _jumping_adam():
    # converges, then climbs the loss from step 400 on (a negative rate): a sure divergence
    return optax.adam(lambda step: jnp.where(step < 400, 0.05, -0.05))


def test_running_mean_and_check_losses():
    losses = np.concatenate([np.linspace(10, 1, 50), np.ones(100), np.full(50, 3.0)])
    rm = running_mean(losses, 10)
    assert rm.shape == (191,)
    np.testing.assert_allclose(rm[60], 1.0)
    report = check_losses(losses, window=10, rtol=0.05, burn_in=20)
    assert report.diverged and report.unstable
    assert report.best == pytest.approx(1.0) and report.last == pytest.approx(3.0)
    assert 58 <= report.best_step <= 150  # the first window of ones ends at step 58
    calm = check_losses(np.concatenate([np.linspace(10, 1, 50), np.ones(150)]), window=10, burn_in=60)
    assert not calm.diverged and not calm.unstable
    assert report.exploded and report.max_rise == pytest.approx(2.0)
    # still converging at the burn-in: above the final best, but it never rose
    slow = check_losses(np.linspace(10, 1, 300), window=10, burn_in=20)
    assert slow.unstable and not slow.exploded and slow.max_rise == 0.0
    nan = check_losses(np.concatenate([np.ones(50), [np.nan]]), window=10)
    assert nan.diverged and nan.last == np.inf


def test_keep_best_follows_the_same_path_and_keeps_the_best():
    plain = SVI(model, AutoNormal(model), _jumping_adam(), Trace_ELBO())
    kept = SVI(model, AutoNormal(model), KeepBest(_jumping_adam(), window=50), Trace_ELBO())
    r1 = plain.run(jax.random.PRNGKey(0), 600, X, progress_bar=False)
    r2 = kept.run(jax.random.PRNGKey(0), 600, X, progress_bar=False)
    np.testing.assert_array_equal(r1.losses, r2.losses)  # wrapping changes nothing
    assert check_losses(r2.losses, window=50, burn_in=0).diverged
    best = best_params(kept, r2.state)
    # the last loc is far off; the best is at the exact posterior mean
    post_mean = float(jnp.sum(X) / (X.shape[0] + 1e-2))
    assert abs(float(r2.params["mu_auto_loc"]) - post_mean) > 1.0
    assert abs(float(best["mu_auto_loc"]) - post_mean) < 0.1
    with pytest.raises(TypeError, match="KeepBest"):
        best_params(plain, r1.state)
    # inside AverageParams: the same record, unwrapped
    from numpyro_pavi import AverageParams

    wrapped = SVI(model, AutoNormal(model), AverageParams(KeepBest(_jumping_adam(), window=50), window=10), Trace_ELBO())
    r3 = wrapped.run(jax.random.PRNGKey(0), 600, X, progress_bar=False)
    np.testing.assert_array_equal(best_params(wrapped, r3.state)["mu_auto_loc"], best["mu_auto_loc"])


def test_fit_returns_best_params_and_names_the_site(tmp_path):
    svi = SVI(model, AutoNormal(model), _jumping_adam(), Trace_ELBO())
    with pytest.warns(DivergenceWarning, match=r"site 'mu'.*best parameters were returned"):
        res = fit(svi, jax.random.PRNGKey(0), 600, X, progress_bar=True, window=50)  # fit's default bar
    post_mean = float(jnp.sum(X) / (X.shape[0] + 1e-2))
    assert abs(float(res.params["mu_auto_loc"]) - post_mean) < 0.1
    assert abs(float(svi.get_params(res.state)["mu_auto_loc"]) - post_mean) > 1.0  # state: the last
    # resumed in segments: the same best params
    path = tmp_path / "ck.pkl"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DivergenceWarning)
        fit(svi, jax.random.PRNGKey(0), 450, X, progress_bar=False, window=50, checkpoint_path=path, checkpoint_every=200)
        res2 = fit(svi, jax.random.PRNGKey(0), 600, X, progress_bar=False, window=50, checkpoint_path=path)
    np.testing.assert_array_equal(res2.params["mu_auto_loc"], res.params["mu_auto_loc"])


def test_fit_names_the_site_with_autopavi():
    from numpyro_pavi import AutoPAVI

    svi = SVI(model, AutoPAVI(model), _jumping_adam(), Trace_ELBO())
    with pytest.warns(DivergenceWarning, match=r"Largest change: site 'mu': its draws moved by up to"):
        res = fit(svi, jax.random.PRNGKey(0), 600, X, progress_bar=False, window=50)
    draws = res.params["mu_auto_flow"]  # the best parameters: a working guide near the optimum
    assert jax.tree.structure(draws) == jax.tree.structure(svi.get_params(res.state)["mu_auto_flow"])


@pytest.mark.parametrize("progress_bar", [False, True])
def test_fit_is_quiet_on_a_stable_run(progress_bar):
    svi = SVI(model, AutoNormal(model), optax.adam(0.05), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DivergenceWarning)
        res = fit(svi, jax.random.PRNGKey(0), 400, X, progress_bar=progress_bar, window=50)
    np.testing.assert_array_equal(res.params["mu_auto_loc"], svi.get_params(res.state)["mu_auto_loc"])
