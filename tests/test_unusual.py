"""Valid but unusual models and workflows: each gives the right answer, checked against an
exact one (factor terms, improper priors, a checkpoint resumed in a new process, plates inside
scan), and the unusual setups that cannot work get an error that says what to do (two
AutoPAVIs with one prefix, plates hidden by ``block``, event-dim data of another size)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.contrib.control_flow import scan
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoGuideList

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import models
from numpyro_pavi.checkpoint import fit, load_checkpoint

X = jnp.array([1.3, 0.2, -0.4, 2.1, 0.9, 1.5])
NUM_DRAWS = 2000


def _posterior(model, steps=2000, **guide_kw):
    guide = AutoPAVI(model, **guide_kw)
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    params = svi.run(jax.random.PRNGKey(0), steps, X, progress_bar=False).params
    return guide.sample_posterior(jax.random.PRNGKey(1), params, X, sample_shape=(NUM_DRAWS,))


def _assert_normal(draws, mean, sd, slack=0.1):
    """Draws against an exact normal: Monte Carlo error (4 standard errors) plus ``slack``
    posterior sds of optimization error at a constant rate."""
    draws = np.asarray(draws)
    assert abs(draws.mean() - mean) < 4 * sd / np.sqrt(draws.size) + slack * sd, (draws.mean(), mean)
    assert abs(draws.std() / sd - 1) < 4 / np.sqrt(2 * draws.size) + slack, (draws.std(), sd)


def factor_model(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", x.shape[0]):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(a, 1.0), obs=x)
    # with the N(0, 1) prior: an N(0, 1/2) prior on mu
    numpyro.factor("shrink", -0.5 * mu**2)


def test_factor_site():
    # x_g | mu ~ N(mu, 2): posterior precision 2 + n/2, mean (sum x / 2) / precision
    prec = 2.0 + X.size / 2
    draws = _posterior(factor_model)
    _assert_normal(draws["mu"], float(X.sum() / 2 / prec), float(prec**-0.5))


def improper_model(x):
    mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.real, (), ()))
    with numpyro.plate("groups", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x)


def test_improper_prior():
    # flat prior: mu | x ~ N(mean x, 1/n)
    draws = _posterior(improper_model)
    _assert_normal(draws["mu"], float(X.mean()), float(X.size**-0.5))


_RESUME = textwrap.dedent(
    """
    import sys
    import jax, numpy as np, optax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro_pavi import AutoPAVI
    from numpyro_pavi.examples import models
    from numpyro_pavi.checkpoint import fit

    x = models.simulate_random_effects(jax.random.PRNGKey(0), 6, 3, 1)
    guide = AutoPAVI(models.random_effects, encoding_dim=2, hidden_dims=(4,))
    svi = SVI(models.random_effects, guide, optax.adam(1e-2), Trace_ELBO())
    r = fit(svi, jax.random.PRNGKey(1), int(sys.argv[2]), x, checkpoint_path=sys.argv[1],
            checkpoint_every=10, progress_bar=False)
    leaves = jax.tree_util.tree_leaves(r.params)  # params hold nested dicts (encoders, flows)
    np.savez(sys.argv[3], losses=np.asarray(r.losses), **{f"leaf{i}": np.asarray(v) for i, v in enumerate(leaves)})
    """
)


@pytest.mark.slow
def test_checkpoint_resumes_in_a_new_process(tmp_path):
    """A run stopped at step 20 and resumed by a fresh process (new guide, nothing set up,
    default set encodings) ends bit-identical to one uninterrupted run."""
    script, ckpt = tmp_path / "resume.py", tmp_path / "run.ckpt"
    script.write_text(_RESUME)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    def run(path, steps, out):
        subprocess.run([sys.executable, str(script), str(path), str(steps), str(out)], check=True, env=env)
        return np.load(out)

    run(ckpt, 20, tmp_path / "first.npz")
    resumed = run(ckpt, 40, tmp_path / "resumed.npz")
    assert load_checkpoint(ckpt).step == 40
    x = models.simulate_random_effects(jax.random.PRNGKey(0), 6, 3, 1)
    guide = AutoPAVI(models.random_effects, encoding_dim=2, hidden_dims=(4,))
    svi = SVI(models.random_effects, guide, optax.adam(1e-2), Trace_ELBO())
    r = fit(svi, jax.random.PRNGKey(1), 40, x, checkpoint_every=10, progress_bar=False)
    ref = {"losses": np.asarray(r.losses)}
    ref.update({f"leaf{i}": np.asarray(v) for i, v in enumerate(jax.tree_util.tree_leaves(r.params))})
    assert set(resumed.files) == set(ref) and len(ref) > 1
    # Float-level only: two processes running the same program on CPU can round the loss
    # differently in the last bit (seen even between two fresh starts); bit-exact resume
    # within one process is test_checkpoint.py::test_exact_resume.
    for name, value in ref.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------
# plates inside scan: a Gaussian random walk per unit, exact posterior in closed form
# ---------------------------------------------------------------------------------------------
T_STEPS, UNITS, STEP_SD = 4, 3, 0.8


def random_walks(y):
    def step(z, y_t):
        with numpyro.plate("units", UNITS):
            z = numpyro.sample("z", dist.Normal(z, STEP_SD))
            numpyro.sample("y", dist.Normal(z, 1.0), obs=y_t)
        return z, None

    scan(step, jnp.zeros(UNITS), y)


def test_plate_inside_scan():
    """A plate opened in scan's body leaves no plate site: its frames give the size, and each
    unit's whole time series is one element of the flow."""
    y = 1.5 * jax.random.normal(jax.random.PRNGKey(3), (T_STEPS, UNITS))
    t = np.arange(1, T_STEPS + 1)
    precision = np.linalg.inv(STEP_SD**2 * np.minimum.outer(t, t)) + np.eye(T_STEPS)
    mean = np.linalg.solve(precision, np.asarray(y))
    sd = np.sqrt(np.diag(np.linalg.inv(precision)))[:, None]
    guide = AutoPAVI(random_walks, encoding_dim=4, hidden_dims=(8,))
    params = SVI(random_walks, guide, optax.adam(1e-2), Trace_ELBO()).run(jax.random.PRNGKey(0), 2000, y, progress_bar=False).params
    z = np.asarray(guide.sample_posterior(jax.random.PRNGKey(1), params, y, sample_shape=(NUM_DRAWS,))["z"])
    assert z.shape == (NUM_DRAWS, T_STEPS, UNITS)
    # 4 Monte Carlo standard errors plus 0.1 sd of optimization error
    assert np.max(np.abs(z.mean(0) - mean) / sd) < 4 / np.sqrt(NUM_DRAWS) + 0.1
    assert np.max(np.abs(z.std(0) / sd - 1)) < 4 / np.sqrt(2 * NUM_DRAWS) + 0.1


def test_plate_subsampled_inside_scan_raises():
    def model(y):
        def step(z, y_t):
            with numpyro.plate("units", UNITS, subsample_size=2):
                z = numpyro.sample("z", dist.Normal(0.0, 1.0))
            return z, None

        scan(step, jnp.zeros(2), y)

    with pytest.raises(ValueError, match=r"(?s)'units' is subsampled inside scan.*before scan"):
        handlers.seed(AutoPAVI(model), 0)(jnp.zeros((T_STEPS, UNITS)))


# ---------------------------------------------------------------------------------------------
# two AutoPAVIs in one AutoGuideList
# ---------------------------------------------------------------------------------------------
def two_effects(x):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 5, dim=-2):
        a = numpyro.sample("a", dist.Normal(mu, 1.0))
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("obs", 3, dim=-1):
            numpyro.sample("x", dist.Normal(a + b, 1.0), obs=x)


def _guide_list(prefix2):
    guide = AutoGuideList(two_effects)
    guide.append(AutoPAVI(handlers.block(two_effects, hide=["b"]), encoding_dim=2, hidden_dims=(4,)))
    guide.append(AutoPAVI(handlers.block(two_effects, hide=["a", "mu"]), encoding_dim=3, hidden_dims=(4,), prefix=prefix2))
    return guide


def test_two_autopavis_with_one_prefix_raise():
    svi = SVI(two_effects, _guide_list("auto"), optax.adam(1e-2), Trace_ELBO())
    with pytest.raises(ValueError, match=r"(?s)already created by another guide.*own prefix"):
        svi.init(jax.random.PRNGKey(0), jnp.ones((5, 3)))


@pytest.mark.slow  # two guides fitted
def test_two_autopavis_with_their_own_prefixes():
    guide = _guide_list("pavi2")
    svi = SVI(two_effects, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), jnp.ones((5, 3)))
    params = svi.get_params(state)
    assert "groups_auto_encoder_out" in params and "groups_pavi2_encoder_out" in params
    # each guide's encoder readout, unpacked by its own plan (GuidePlan.unpack)
    first, second = (g.plan.unpack(params) for g in guide._guides)
    assert first["groups_auto_encoder_out"]["w"].shape != second["groups_pavi2_encoder_out"]["w"].shape
    assert np.isfinite(float(svi.update(state, jnp.ones((5, 3)))[1]))


def test_plate_hidden_by_block_expose_raises():
    with pytest.raises(ValueError, match=r"(?s)'groups'.*hidden.*hide=\[\.\.\.\] instead"):
        handlers.seed(AutoPAVI(handlers.block(two_effects, expose=["b"])), 0)(jnp.ones((5, 3)))


# ---------------------------------------------------------------------------------------------
# event-dim observations are features: new data must keep their size
# ---------------------------------------------------------------------------------------------
def test_event_dim_observations_with_another_size_raise():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", y.shape[0]):
            a = numpyro.sample("a", dist.Normal(mu, 1.0))
            numpyro.sample("y", dist.Normal(a[:, None], 1.0).expand(y.shape).to_event(1), obs=y)

    guide = AutoPAVI(model, encoding="set", encoding_dim=2, hidden_dims=(4,))
    params = SVI(model, guide, optax.adam(1e-2), Trace_ELBO()).run(jax.random.PRNGKey(0), 5, jnp.ones((4, 3)), progress_bar=False).params
    # more groups with the same event size: fine
    assert guide.sample_posterior(jax.random.PRNGKey(0), params, jnp.ones((7, 3)))["a"].shape == (7,)
    with pytest.raises(ValueError, match=r"(?s)'y' gives its set encoder 5 features.*3 in training.*numpyro.plate"):
        guide.sample_posterior(jax.random.PRNGKey(0), params, jnp.ones((7, 5)))


# ---------------------------------------------------------------------------------------------
# obs_mask with NaN in the missing cells: exact posterior (missing cells simply drop out)
# ---------------------------------------------------------------------------------------------
def masked_groups(y, mask):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", y.shape[0], dim=-2):
        mg = numpyro.sample("mg", dist.Normal(mu, 1.0))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(mg, 0.5), obs=y, obs_mask=mask)


@pytest.mark.slow  # statistical: a fit against the exact posterior
def test_obs_mask_with_nan_exact_posterior():
    """NumPyro imputes the missing cells as a latent site ``y_unobserved`` scored only there; the
    guide scores only those cells too (else its entropy on the others grows without bound), and
    the set encoder reads the observed cells and an indicator of which they are."""
    rng = np.random.default_rng(0)
    G, M = 8, 4
    y = rng.normal(size=(G, 1)) + 0.5 * rng.normal(size=(G, M))
    mask = rng.uniform(size=(G, M)) > 0.3
    # joint Gaussian posterior of (mu, mg_1..G) from the observed cells only
    precision = np.zeros((G + 1, G + 1))
    precision[0, 0] = 1 + G
    precision[0, 1:] = precision[1:, 0] = -1
    precision[1:, 1:] = np.diag(1 + mask.sum(1) / 0.25)
    cov = np.linalg.inv(precision)
    mean = cov @ np.concatenate([[0.0], np.where(mask, y, 0).sum(1) / 0.25])
    y_nan = jnp.asarray(np.where(mask, y, np.nan), jnp.float32)
    guide = AutoPAVI(masked_groups, encoding_dim=4, hidden_dims=(8,))
    svi = SVI(masked_groups, guide, optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 2500, y_nan, jnp.asarray(mask), progress_bar=False)
    losses = np.asarray(result.losses)
    assert np.all(np.isfinite(losses)) and losses[-100:].mean() > losses[1000:].min() - 1.0  # no fall without bound
    plan = {line.split()[1]: line.split("encoding: ")[1] for line in guide.describe().splitlines() if line.startswith("plates ")}
    # groups are encoded from their observed cells; the missing cells have no data of their
    # own: their Laplace base (the prior given their group) needs no encoding
    assert plan == {"groups": "set from nested:y_observed", "groups/obs": "none (Laplace bases)"}
    post = guide.sample_posterior(jax.random.PRNGKey(1), result.params, y_nan, jnp.asarray(mask), sample_shape=(NUM_DRAWS,))
    z = np.concatenate([np.asarray(post["mu"])[:, None], np.asarray(post["mg"])[:, :, 0]], 1)
    sd = np.sqrt(np.diag(cov))
    tol = 4 / np.sqrt(NUM_DRAWS) + 0.1  # Monte Carlo (4 standard errors) plus 0.1 sd
    assert np.max(np.abs(z.mean(0) - mean) / sd) < tol
    assert np.max(np.abs(z.std(0) / sd - 1)) < 4 / np.sqrt(2 * NUM_DRAWS) + 0.1
    # imputed cells: y | data ~ N(E[mg], Var[mg] + 0.25)
    imputed = np.asarray(post["y_unobserved"])[:, ~mask]
    m = np.broadcast_to(mean[1:, None], (G, M))[~mask]
    s = np.sqrt(np.broadcast_to(np.diag(cov)[1:, None], (G, M))[~mask] + 0.25)
    assert np.max(np.abs(imputed.mean(0) - m) / s) < tol
    assert not np.any(np.isnan(np.asarray(post["y"])))
    # LOO counts the observed cells only, each once
    import arviz as az

    from numpyro_pavi.arviz import to_inference_data

    idata = to_inference_data(guide, result.params, y_nan, jnp.asarray(mask), num_samples=50, log_likelihood=True)
    ll = idata.log_likelihood["y_observed"]
    assert ll.shape == (1, 50, int(mask.sum())) and np.all(np.isfinite(ll.values))
    assert az.loo(idata).n_data_points == int(mask.sum())
