"""Laplace bases under every likelihood family of the likelihood matrix
(``benchmarks/likelihoods.py``): the base is the map actually sampled, with its exact
derivative, or the element falls back to its prior and says so.

The per-family tests are quick and exact: in float64, the derivative of each element's base
``(m, L)`` with respect to the parents (``b0``, ``tau``) must equal central finite
differences of the same map to 2e-3 relative: the iterations stop once the remaining
Newton step is below ``STOP_TOL`` (1e-3 sds), and the mode's derivative taken there is off
by about as much (the finite-difference error itself is O(h^2) = 1e-12). Before the fix, a damped last step gave
``t P^{-1} dg/dtheta`` with ``t = 1/2`` on StudentT(30) (50% off), and ``L`` lost its
dependence on the mode.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

from numpyro_pavi import AutoPAVI, LaplaceWarning
from numpyro_pavi.laplace import NEWTON_STEPS, log_joint, newton_base

_spec = importlib.util.spec_from_file_location(
    "likelihoods", os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "likelihoods.py")
)
likelihoods = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(likelihoods)

#: families whose log joint is smooth in the element: the Newton problem must converge
SMOOTH = [f for f in likelihoods.FAMILIES if f != "laplace"]


def _base_map(family, x, y, slope=False):
    """``theta (2,) -> (m, L)`` flattened, of site ``u``, in float64."""

    def f(theta):
        b0, tau = theta[0], theta[1]

        def logp(z, b0, tau):
            vals = {"b0": b0, "tau": tau, "u": z}
            return log_joint(likelihoods.model, vals, (x, y), dict(family=family, slope=slope))

        sg = jax.lax.stop_gradient
        prior = jnp.zeros((x.shape[0], 1), x.dtype)
        m, chol, report = newton_base(
            lambda z: logp(z, b0, tau), lambda z: logp(z, sg(b0), sg(tau)), prior, NEWTON_STEPS,
            fallback=prior, report=True,
        )  # fmt: skip
        return jnp.concatenate([m[:, 0], chol[:, 0, 0]]), report

    return jax.jit(f)


@pytest.mark.parametrize("family", list(likelihoods.FAMILIES))
def test_base_derivative_is_exact(family, x64):
    x, y = likelihoods.simulate(family, groups=6, per_group=5, seed=1)
    x, y = jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64 if y.dtype.kind == "f" else y.dtype)
    f = _base_map(family, x, y)
    theta = jnp.array([0.4, 0.8])
    (values, report) = f(theta)
    assert np.all(np.isfinite(np.asarray(values)))
    if family in SMOOTH:
        assert bool(jnp.all(report.converged())), f"{family}: decrements {report.decrement}"
    jac = jax.jit(jax.jacrev(lambda t: f(t)[0]))(theta)
    h = 1e-6
    # every shifted point in one compiled call
    shifted = jax.vmap(lambda t: f(t)[0])(theta + jnp.concatenate([h * jnp.eye(2), -h * jnp.eye(2)]))
    for i in range(2):
        fd = (shifted[i] - shifted[2 + i]) / (2 * h)
        np.testing.assert_allclose(np.asarray(jac[:, i]), np.asarray(fd), rtol=2e-3, atol=1e-4 * (1 + float(jnp.max(jnp.abs(fd)))))


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_heavy_tails_from_the_tails_converge():
    """StudentT(30) and Cauchy groups started 5 scales from their data (b0 far off, tau wide):
    the trust-region iterations reach each element's mode (zero gradient, concave)."""
    for family in ("studentt30", "studentt3", "cauchy"):
        x, y = likelihoods.simulate(family, seed=0)

        def logp(z):
            return log_joint(likelihoods.model, {"b0": 2.0, "tau": 1.5, "u": z}, (x, y), dict(family=family))

        m, _, report = newton_base(logp, logp, jnp.zeros((x.shape[0], 1)), report=True)
        assert bool(jnp.all(report.converged())), family
        np.testing.assert_array_less(np.abs(np.asarray(jax.grad(logp)(m))), 1e-2)


def test_non_smooth_likelihood_loses_its_base_with_a_warning():
    """A Laplace likelihood has no curvature: at setup its Newton problems do not converge,
    and the site loses its base with a warning naming it and the option."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    x, y = likelihoods.simulate("laplace", groups=8, per_group=4)
    guide = AutoPAVI(likelihoods.model)
    svi = SVI(likelihoods.model, guide, Adam(5e-3), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = svi.run(jax.random.PRNGKey(0), 5, x, y, family="laplace", progress_bar=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LaplaceWarning)]
    assert any("site 'u' is off" in m and "laplace=False" in m for m in msgs), msgs
    assert not guide.plan.on_laplace(guide.structure.latent["u"])
    assert guide.check_bases(result.params, x, y, family="laplace") == {}
    assert np.all(np.isfinite(np.asarray(result.losses)))


def test_the_setup_warning_names_the_later_sites_a_newton_problem_shares():
    """A random intercept's Newton problem holds the slope of the same plate: where it
    fails, the warning says so and names the slope (it blamed the intercept's own
    likelihood alone); the slope's own warning names no sibling."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    x, y = likelihoods.simulate("laplace", slope=True, groups=8, per_group=4)
    guide = AutoPAVI(likelihoods.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SVI(likelihoods.model, guide, Adam(5e-3), Trace_ELBO()).init(jax.random.PRNGKey(0), x, y, family="laplace", slope=True)
    msgs = {m[m.index("'") + 1 : m.index("' is off")]: m for m in (str(w.message) for w in caught) if "' is off" in m}
    assert set(msgs) == {"u", "v"}, msgs
    assert "whose Newton problem it shares ('v')" in msgs["u"]
    assert "Newton problem it shares" not in msgs["v"]


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_check_bases_warns_where_elements_do_not_converge():
    """A site kept on its base whose elements do not converge (here: the Laplace likelihood
    with the setup decision overridden): check_bases warns after the fit, naming the site,
    and reports the share that converged. The compiled steps themselves do not warn (no
    host callback: test_compiled_step_holds_no_host_callback); here 50% or more of the
    elements converged at svi.init, so the start-of-training warning stays quiet too."""
    import dataclasses

    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    x, y = likelihoods.simulate("laplace", groups=8, per_group=4)
    guide = AutoPAVI(likelihoods.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LaplaceWarning)
        with numpyro.handlers.seed(rng_seed=0):
            guide(x, y, family="laplace")  # setup: the site loses its base
    guide.plan = dataclasses.replace(guide.plan, laplace_sites=frozenset({"u"}))
    svi = SVI(likelihoods.model, guide, Adam(5e-3), Trace_ELBO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = svi.run(jax.random.PRNGKey(0), 10, x, y, family="laplace", progress_bar=False)
        report = guide.check_bases(result.params, x, y, family="laplace", num_samples=4)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LaplaceWarning)]
    assert any("at posterior draws" in m and "site 'u'" in m for m in msgs), msgs
    assert 0.0 <= report["u"]["converged"] < 0.95


def test_start_of_training_warning_fires_once_below_half():
    """The eager check (svi.init's call of the guide): warns once per site below half,
    never for a share at or above it, a NaN share (no scored element) or a traced one."""
    from numpyro_pavi.autoguide import _warn_unconverged

    warned = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for share in (0.5, 0.9, float("nan")):
            _warn_unconverged("u", jnp.asarray(share), warned)
        jax.jit(lambda c: _warn_unconverged("u", c, warned) or c)(jnp.asarray(0.1))
        assert not caught and not warned
        _warn_unconverged("u", jnp.asarray(0.3), warned)
        _warn_unconverged("u", jnp.asarray(0.2), warned)  # once per site
    msgs = [str(w.message) for w in caught if issubclass(w.category, LaplaceWarning)]
    assert len(msgs) == 1 and "site 'u'" in msgs[0] and "start of training" in msgs[0], msgs
    assert warned == {"u"}


def test_smooth_likelihood_check_bases_is_quiet():
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    x, y = likelihoods.simulate("studentt30", groups=8, per_group=4)
    guide = AutoPAVI(likelihoods.model)
    svi = SVI(likelihoods.model, guide, Adam(5e-3), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaplaceWarning)
        result = svi.run(jax.random.PRNGKey(0), 20, x, y, family="studentt30", progress_bar=False)
        report = guide.check_bases(result.params, x, y, family="studentt30", num_samples=4)
    assert report["u"]["converged"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize(("family", "median_bar"), [("studentt30", 0.1), ("cauchy", 0.2)])
def test_fit_matches_nuts(family, median_bar):
    """The issue's model: 15 groups x 6 observations, constant Adam 5e-3, 2,000 steps,
    against NUTS (1,000 + 2,000). StudentT(30) meets the issue's bar (median 0.1 sd, globals
    0.3 sd; measured 0.012 and 0.135, RESULTS section 11); Cauchy reaches 0.125 and 0.142
    (before the fix: 1.95 and 4.49), so its median bar is 0.2. NUTS's Monte Carlo error on
    a mean is about 0.03 sd at this length."""

    class Args:
        groups, per_group, seed, lr, steps, warmup, samples, draws = 15, 6, 0, 5e-3, 2000, 1000, 2000, 4000
        keys = (0,)

    row = likelihoods.one_family(family, False, Args)
    assert row["AutoPAVI"]["median"] <= median_bar and row["AutoPAVI"]["max_global"] <= 0.3, row["AutoPAVI"]
    assert row["loss_excess_rel"] <= 0.005


def test_finite_cotangent_drops_only_non_finite_gradient_entries():
    """The identity in value; in the gradient, entries whose cotangent is NaN or inf become 0
    and the others pass unchanged."""
    from numpyro_pavi.laplace import finite_cotangent

    x = jnp.array([1.0, -8.0, 2.0])
    # d/dx of sqrt(x) * w: NaN where x < 0 (sqrt's derivative), 0.5 / sqrt(x) elsewhere
    f = lambda v: jnp.sum(jnp.sqrt(finite_cotangent(v) * jnp.array([1.0, 1.0, 1.0])))
    g_plain = jax.grad(lambda v: jnp.sum(jnp.sqrt(v)))(x)
    g = jax.grad(f)(x)
    assert np.isnan(np.asarray(g_plain)[1])
    np.testing.assert_allclose(np.asarray(g), [0.5, 0.0, 0.5 / np.sqrt(2.0)], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(finite_cotangent(x)), np.asarray(x))


@pytest.mark.slow
def test_truncated_normal_with_a_slope_trains_without_nan():
    """NumPyro's TruncatedNormal has NaN third derivatives 8 scales past its bound; through
    the Laplace base of a random slope that made the gradient of step 56 NaN, and every
    parameter after it (likelihood matrix, truncated normal with a slope). The parents'
    cotangents through a base are now kept finite."""
    from numpyro.infer import SVI, Trace_ELBO

    f = lambda e: numpyro.distributions.TruncatedNormal(e, 0.5, low=-1.0).log_prob(-0.5)
    assert np.isnan(float(jax.grad(jax.grad(jax.grad(f)))(-6.0)))  # the cause, upstream
    x, y = likelihoods.simulate("truncnormal", slope=True)
    kw = dict(family="truncnormal", slope=True)
    guide = AutoPAVI(likelihoods.model)
    svi = SVI(likelihoods.model, guide, numpyro.optim.Adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, y, **kw)
    run = jax.jit(lambda s: jax.lax.scan(lambda s_, _: svi.update(s_, x, y, **kw), s, None, length=80))
    state, losses = run(state)
    assert np.all(np.isfinite(np.asarray(losses)))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree_util.tree_leaves(svi.get_params(state)))


def test_higher_modes_flags_exactly_the_elements_on_a_lower_mode():
    """Three elements of one log density, each a sum of independent terms: a Gaussian, and
    a two-component mixture (weights 0.3 at -2, 0.7 at +2, sds 0.5) started once near each
    mode. Newton stops on the mode it starts next to; only the element on the lower mode
    (log density 0.85 nats below the other, 8 of its sds away: the probe 4 sds out lies
    in the valley, whose slope points to the heavier side) is flagged."""
    from numpyro_pavi.laplace import higher_modes, newton_iterate

    def logp(z):
        gauss = -0.5 * z[0, 0] ** 2
        comp = lambda v: jnp.logaddexp(jnp.log(0.3) - 2.0 * (v + 2.0) ** 2, jnp.log(0.7) - 2.0 * (v - 2.0) ** 2)
        return gauss + comp(z[1, 0]) + comp(z[2, 0])

    z, chol, rep = newton_iterate(logp, jnp.array([[0.7], [-1.7], [1.7]]))
    assert bool(jnp.all(rep.converged()))
    np.testing.assert_allclose(np.asarray(z[:, 0]), [0.0, -2.0, 2.0], atol=1e-3)
    flagged = higher_modes(logp, z, chol, rep)
    np.testing.assert_array_equal(np.asarray(flagged), [False, True, False])


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_check_bases_reports_multimodal_elements_and_warns():
    """Per group, one observation 0 of a two-component location mixture (weights 0.3 at
    ``u``, 0.7 at ``u + 4``, sds 0.5) under a wide prior ``u ~ N(0, 5)``: every element has
    two modes, near 0 and near -4, the second 0.53 nats higher, and Newton from the prior
    mean stops on the first. check_bases reports all of them and warns naming the site; a
    second site of the same plate, ``w``, with a Normal likelihood, reports none."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    dist = numpyro.distributions

    def model(y):
        with numpyro.plate("groups", y.shape[0]):
            u = numpyro.sample("u", dist.Normal(0.0, 5.0))
            w = numpyro.sample("w", dist.Normal(0.0, 5.0))
            comps = dist.Normal(u[..., None] + jnp.array([0.0, 4.0]), 0.5)
            numpyro.sample("y", dist.MixtureSameFamily(dist.Categorical(probs=jnp.array([0.3, 0.7])), comps), obs=y)
            numpyro.sample("y_w", dist.Normal(w, 0.5), obs=y)

    y = jnp.zeros(6)
    guide = AutoPAVI(model)
    result = SVI(model, guide, Adam(5e-3), Trace_ELBO()).run(jax.random.PRNGKey(0), 2, y, progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = guide.check_bases(result.params, y, num_samples=2)
    msgs = [str(w.message) for w in caught if issubclass(w.category, LaplaceWarning)]
    assert report["u"]["converged"] == report["w"]["converged"] == 1.0
    assert report["u"]["multimodal"] == 1.0 and report["w"]["multimodal"] == 0.0, report
    assert len(msgs) == 1 and "site 'u'" in msgs[0] and "higher mode" in msgs[0], msgs


def test_compiled_step_holds_no_host_callback():
    """A host callback anywhere in a step's program (even in a branch never taken) sends every
    call of it through JAX's Python dispatch path: 0.8-3.6 ms more a step on small models,
    paid at every step by svi.run and fit, which call the compiled step from Python. The
    convergence warning is given at svi.init instead (tests above)."""
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.optim import Adam

    from numpyro_pavi.compiling import primitives_in

    x, y = likelihoods.simulate("studentt30", groups=4, per_group=3)
    guide = AutoPAVI(likelihoods.model)
    svi = SVI(likelihoods.model, guide, Adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, y, family="studentt30")
    assert guide.plan.on_laplace(guide.structure.latent["u"])  # the Newton problem is in the step
    names = primitives_in(jax.make_jaxpr(lambda s: svi.update(s, x, y, family="studentt30"))(state))
    assert "while" in names or "scan" in names  # the walk reached the Newton loop's body
    assert not [n for n in names if "callback" in n], sorted(names)
