"""Stored Laplace bases (``numpyro_pavi.base_state``): long-format data, rows subsampled.

The model is crossed Gaussian intercepts in long format with fixed variances, whose
posterior given ``mu`` (and jointly with it) is Gaussian and solved exactly by a dense
linear system.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.base_state import init_state, refresh, stored_base

SD_A, SD_B, SD_Y = 0.5, 0.7, 0.8
S, L, N = 30, 20, 600


def long_model(s, l, y, batch=None, latent_sd=False):
    """Crossed intercepts in long format; with ``latent_sd`` the students' sd is a latent
    ``tau``, so their precision depends on a global."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    sd_a = numpyro.sample("tau", dist.HalfNormal(1.0)) if latent_sd else SD_A
    with numpyro.plate("students", S):
        a = numpyro.sample("a", dist.Normal(0.0, sd_a))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, SD_B))
    with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[s[r]] + b[l[r]], SD_Y), obs=y[r])


def simulate(seed=0):
    rng = np.random.default_rng(seed)
    ws, wl = rng.lognormal(0, 1, S), rng.lognormal(0, 1.2, L)
    s = rng.choice(S, N, p=ws / ws.sum())
    l = rng.choice(L, N, p=wl / wl.sum())
    y = 0.3 + SD_A * rng.normal(size=S)[s] + SD_B * rng.normal(size=L)[l] + SD_Y * rng.normal(size=N)
    return jnp.asarray(s), jnp.asarray(l), jnp.asarray(y, jnp.float32)


def precision(s, l):
    """Posterior precision of ``(mu, a, b)`` and its data vector ``X^T y / sd^2`` (as a function)."""
    X = np.concatenate([np.ones((N, 1)), np.eye(S)[np.asarray(s)], np.eye(L)[np.asarray(l)]], 1)
    prior = np.diag(np.concatenate([[1.0], np.full(S, SD_A**-2), np.full(L, SD_B**-2)]))
    return prior + X.T @ X / SD_Y**2, lambda y: X.T @ np.asarray(y, float) / SD_Y**2


def nested_long_model(school, student, y, batch=None):
    """Students nested in schools, rows subsampled: a student's stored base follows its
    school's draw. Gaussian with known variances: exact given ``mu``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(mu, 1.0))
        with numpyro.plate("students", 4):
            a = numpyro.sample("a", dist.Normal(k, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(a[student[r], school[r]], 1.0), obs=y[r])


def deep_nested_model(school, student, y, batch=None):
    """Students in schools in two regions, rows subsampled: two levels of nesting, each row
    reading its student's, school's and region's effects (a student's base follows its
    school's and its region's draws). Gaussian with known variances: exact given ``mu``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("regions", 2):
        g = numpyro.sample("g", dist.Normal(mu, 1.0))
        with numpyro.plate("schools", 3):
            k = numpyro.sample("k", dist.Normal(g, 1.0))
            with numpyro.plate("students", 4):
                a = numpyro.sample("a", dist.Normal(k, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        at = (school[r], r % 2)
        numpyro.sample("y", dist.Normal(a[(student[r],) + at] + 0.5 * k[at] + 0.5 * g[r % 2], 1.0), obs=y[r])


def interaction_model(school, student, y, batch=None):
    """A school-by-term interaction beside each factor's own effect, rows subsampled: the
    interaction's plates contain those of two crossed factors, no stored bases."""
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(0.0, 1.0))
    with numpyro.plate("terms", 2, dim=-2):
        t = numpyro.sample("t", dist.Normal(0.0, 1.0))
    with numpyro.plate("terms", 2, dim=-2), numpyro.plate("schools", 3):
        a = numpyro.sample("a", dist.Normal(k + t, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(a[r % 2, school[r]], 1.0), obs=y[r])


def nested_posterior(school, student, y, mu):
    """The exact posterior of ``nested_long_model`` given ``mu``: precision and mean of
    ``(k, a)``, ``a`` flattened as ``a[student, school]``."""
    K, M = 3, 4
    P, b = np.zeros((K + M * K,) * 2), np.zeros(K + M * K)
    P[:K, :K] = np.eye(K)
    b[:K] = mu
    for i in range(M):
        for j in range(K):
            q = K + i * K + j
            P[q, q] += 1.0
            P[j, j] += 1.0
            P[q, j] = P[j, q] = -1.0
    for r in range(len(y)):
        q = K + int(student[r]) * K + int(school[r])
        P[q, q] += 1.0
        b[q] += float(y[r])
    return P, np.linalg.solve(P, b)


def nested_long_data():
    rng = np.random.default_rng(0)
    return tuple(jnp.asarray(v) for v in (rng.integers(0, 3, 40), rng.integers(0, 4, 40), rng.normal(size=40)))


@pytest.fixture(scope="module")
def data():
    return simulate()


def train(data, steps):
    """A default guide trained with rows subsampled (100 of 600 per step)."""
    s, l, y = data
    guide = AutoPAVI(long_model)
    svi = SVI(long_model, guide, optax.adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), s, l, y, 100)
    update = jax.jit(lambda st: svi.update(st, s, l, y, 100))
    for _ in range(steps):
        state, _ = update(state)
    return guide, svi, state


@pytest.fixture(scope="module")
def fitted(data):
    return train(data, 300)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_spec_finds_long_format_sites(data):
    s, l, y = data
    guide = AutoPAVI(long_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(s, l, y, 100)
    spec = guide.plan.stored
    assert spec.sites == ("a", "b") and spec.globals == ("mu",) and spec.period == 6
    assert "stored Laplace bases: a, b" in guide.describe()

    # full batch, no Laplace bases, or nested sites: the per-step bases stay
    for make, batch in ((lambda m: AutoPAVI(m), None), (lambda m: AutoPAVI(m, laplace=False), 100)):
        other = make(long_model)
        with numpyro.handlers.seed(rng_seed=0):
            other._setup_prototype(s, l, y, batch)
        assert other.plan.stored is None

    from numpyro_pavi import LaplaceWarning

    g = AutoPAVI(interaction_model)
    with numpyro.handlers.seed(rng_seed=0), pytest.warns(LaplaceWarning, match="no stored Laplace bases"):
        g._setup_prototype(*nested_long_data(), 10)
    assert g.plan.stored is None
    g = AutoPAVI(deep_nested_model)  # students in schools in regions: a chain of blocks
    with numpyro.handlers.seed(rng_seed=0):
        g._setup_prototype(*nested_long_data(), 10)
    assert g.plan.stored.parents == (("k", "g"), ("a", "g"), ("a", "k"))
    assert "stored Laplace bases: g, k in g, a in k in g" in g.describe()


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_refresh_is_the_exact_joint_mode_and_derivative(data):
    """From scratch, a refresh gives the joint conditional mode of (a, b) given mu from all
    rows, its derivative in mu and each element's conditional precision, to float32."""
    s, l, y = data
    guide = AutoPAVI(long_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(s, l, y, 100)
    spec, structure = guide.plan.stored, guide.structure
    mu = 0.4
    state = refresh(long_model, structure, spec, init_state(structure, spec), jnp.array([mu]), ((s, l, y, 100), {}), sweeps=400)
    P, Xty = precision(s, l)
    local = P[1:, 1:]
    mode = np.linalg.solve(local, Xty(y)[1:] - P[1:, 0] * mu)
    deriv = -np.linalg.solve(local, P[1:, 0])
    got = np.concatenate([state.mode["a"][:, 0], state.mode["b"][:, 0]])
    jac = np.concatenate([state.jac["a"][:, 0, 0], state.jac["b"][:, 0, 0]])
    # each Gauss-Seidel sub-problem stops once its Newton step is under 1e-3 of its sd
    # (laplace.STOP_TOL): the sweeps stall there, about 0.005 posterior sds from the mode
    np.testing.assert_allclose(got, mode, atol=2e-3)
    np.testing.assert_allclose(jac, deriv, atol=1e-3)
    chol = np.concatenate([state.chol["a"][:, 0, 0], state.chol["b"][:, 0, 0]])
    np.testing.assert_allclose(chol**2, np.diag(local), rtol=1e-4)
    # the base at other globals follows the derivative, and carries it for the gradient
    idx = {"students": jnp.arange(S), "lecturers": jnp.arange(L)}
    site = structure.latent["a"]
    m, _ = stored_base(state, site, idx, jnp.array([mu + 0.1]))
    np.testing.assert_allclose(m[:, 0], mode[:S] + 0.1 * deriv[:S], atol=2e-3)
    grad = jax.grad(lambda th: stored_base(state, site, idx, th)[0].sum())(jnp.array([mu]))
    np.testing.assert_allclose(grad[0], deriv[:S].sum(), rtol=3e-3)


@pytest.mark.slow
def test_state_is_kept_and_warm_equals_cold(fitted, data):
    """SVI carries the state (refreshed once per pass over the rows) and the warm state of a
    converged fit is the joint mode a refresh from scratch finds at the same globals."""
    s, l, y = data
    guide, svi, state = fitted
    stored = state.mutable_state[guide._state_name]["state"]
    assert int(stored.count) == 301  # svi.init and 300 steps
    spec, structure = guide.plan.stored, guide.structure
    cold = refresh(long_model, structure, spec, init_state(structure, spec), stored.anchor, ((s, l, y, 100), {}), sweeps=400)
    for name in spec.sites:
        np.testing.assert_allclose(stored.mode[name], cold.mode[name], atol=1e-3)
        np.testing.assert_allclose(stored.jac[name], cold.jac[name], atol=1e-3)
    # one step between refreshes leaves the state as it is (count aside)
    nxt, _ = svi.update(state, s, l, y, 100)
    after = nxt.mutable_state[guide._state_name]["state"]
    assert int(after.count) == 302
    np.testing.assert_array_equal(after.mode["a"], stored.mode["a"])


@pytest.mark.slow
def test_draws_from_stored_bases_run_several_at_once(fitted, data):
    """Draws from the stored bases solve nothing per draw: vectorized (draw_batch > 1) and
    equal to each draw alone; without the state each draw solves for its bases: one at a
    time."""
    s, l, y = data
    guide, svi, state = fitted
    params = {**svi.get_params(state), **state.mutable_state}
    sizes = {"students": S, "lecturers": L, "ratings": N}
    assert guide.draw_batch(sizes, 8) == 8
    assert guide.draw_batch(sizes, 8, with_state=False) == 1
    key = jax.random.PRNGKey(7)
    batched = guide.sample_posterior(key, params, s, l, y, sample_shape=(8,))
    one = guide.full_plate_sampler(params, s, l, y)
    alone = [one(k) for k in jax.random.split(key, 8)]
    for name in ("mu", "a", "b"):
        np.testing.assert_allclose(batched[name], np.stack([a[name] for a in alone]), rtol=1e-5, atol=1e-5)


def bernoulli_long_model(s, l, y, batch=None):
    """``long_model``'s crossed intercepts under a Bernoulli likelihood: bases not exact."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("students", S):
        a = numpyro.sample("a", dist.Normal(0.0, SD_A))
    with numpyro.plate("lecturers", L):
        b = numpyro.sample("b", dist.Normal(0.0, SD_B))
    with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Bernoulli(logits=mu + a[s[r]] + b[l[r]]), obs=y[r])


@pytest.mark.slow
def test_stored_bases_are_read_by_the_flows_where_not_exact(data):
    """An element of a long table's crossed factor has no encoding: where its stored base
    is not exact (a Bernoulli likelihood) its flow reads the base, as per-step bases' flows
    do; a Gaussian likelihood's base is exact and is not read."""
    s, l, y = data
    guide = AutoPAVI(bernoulli_long_model)
    numpyro.handlers.seed(guide, 0)(s, l, (y > 0.3).astype(jnp.float32), 100)
    assert guide.plan.stored.sites == ("a", "b")
    assert guide.plan.base_context == {"a", "b"}
    exact = AutoPAVI(long_model)
    numpyro.handlers.seed(exact, 0)(s, l, y, 100)
    assert exact.plan.stored.sites == ("a", "b") and not exact.plan.base_context


@pytest.mark.slow
def test_rows_subsampled_fit_matches_exact_posterior(data):
    """Rows subsampled 100 of 600, default guide, constant adam 5e-3: posterior means and
    sds of (mu, a, b) against the exact Gaussian posterior (1,000 draws: the Monte Carlo
    error of a mean is 0.03 sd, of an sd 2%). The sds come out 7% narrow at 1,500 steps
    (median ratio 0.930 in this code and the code before it, where the bound was 0.93 and
    passed by 1e-5): the band guards that, not an exact width."""
    s, l, y = data
    guide, svi, state = train(data, 1500)
    P, Xty = precision(s, l)
    cov = np.linalg.inv(P)
    mean, sd = cov @ Xty(y), np.sqrt(np.diag(cov))
    params = {**svi.get_params(state), **state.mutable_state}
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, s, l, y, None, sample_shape=(1000,))
    x = np.concatenate([np.asarray(draws["mu"])[:, None], np.asarray(draws["a"]), np.asarray(draws["b"])], 1)
    z = np.abs(x.mean(0) - mean) / sd
    ratio = x.std(0) / sd
    assert np.median(z) < 0.1 and z.max() < 0.5, (np.median(z), z.max())
    assert 0.9 < np.median(ratio) < 1.07, np.median(ratio)


@pytest.mark.slow
def test_checkpoint_resume_carries_the_state(tmp_path, data):
    """The stored bases are part of the SVI state: a run killed after 7 steps and resumed
    from its checkpoint ends bit-identical to 14 uninterrupted steps (a refresh included)."""
    from numpyro_pavi import fit, load_checkpoint

    s, l, y = data
    svi = SVI(long_model, AutoPAVI(long_model), optax.adam(5e-3), Trace_ELBO())
    key = jax.random.PRNGKey(3)
    ref = fit(svi, key, 14, s, l, y, 100, progress_bar=False)
    path = tmp_path / "run.pkl"
    fit(svi, key, 7, s, l, y, 100, checkpoint_path=path, checkpoint_every=7, progress_bar=False)
    assert load_checkpoint(path).step == 7
    resumed = fit(svi, key, 14, s, l, y, 100, checkpoint_path=path, checkpoint_every=7, progress_bar=False)
    np.testing.assert_array_equal(resumed.losses, ref.losses)
    for a, b in zip(jax.tree.leaves(resumed.state.mutable_state), jax.tree.leaves(ref.state.mutable_state)):
        np.testing.assert_array_equal(a, b)
    stored = ref.state.mutable_state[svi.guide._state_name]["state"]
    assert int(stored.count) == 15  # init and 14 steps: refreshes at 0, 6 and 12


@pytest.mark.slow
def test_streamed_summary_of_a_long_format_fit(fitted, data):
    """posterior_summary streams students, then lecturers (crossed), from the stored bases
    passed with the params: it matches sample_posterior's moments within Monte Carlo error."""
    s, l, y = data
    guide, svi, state = fitted
    params = {**svi.get_params(state), **state.mutable_state}
    summ = guide.posterior_summary(jax.random.PRNGKey(4), params, s, l, y, None, num_samples=1000, chunk_size=8)
    draws = guide.sample_posterior(jax.random.PRNGKey(5), params, s, l, y, None, sample_shape=(1000,))
    for site in ("a", "b"):
        x = np.asarray(draws[site])
        z = np.abs(summ[site]["mean"] - x.mean(0)) / x.std(0)
        assert z.max() < 0.25, (site, z.max())
        np.testing.assert_allclose(summ[site]["sd"], x.std(0), rtol=0.15)


def scale_model(s, l, y, batch=None):
    return long_model(s, l, y, batch, latent_sd=True)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_stored_width_follows_the_globals(data):
    """A stored base's precision factor carries its derivative in the globals: here a
    student's precision is ``1/tau^2 + n/sd_y^2`` (``n`` its rows), exactly; at another
    ``tau`` the stored base's factor is that expansion, and its gradient the exact one."""
    s, l, y = data
    guide = AutoPAVI(scale_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(s, l, y, 100)
    spec, structure = guide.plan.stored, guide.structure
    assert spec.globals == ("mu", "tau")
    theta = jnp.array([0.3, np.log(0.6)])
    state = refresh(scale_model, structure, spec, init_state(structure, spec), theta, ((s, l, y, 100), {}), sweeps=400)
    n = np.bincount(np.asarray(s), minlength=S)

    def exact_chol(log_tau):
        return np.sqrt(np.exp(-2 * log_tau) + n / SD_Y**2)

    np.testing.assert_allclose(state.chol["a"][:, 0, 0], exact_chol(np.log(0.6)), rtol=1e-4)
    deriv = -np.exp(-2 * np.log(0.6)) / exact_chol(np.log(0.6))
    np.testing.assert_allclose(state.dchol["a"][:, 0, 0, 1], deriv, rtol=1e-3)
    np.testing.assert_allclose(state.dchol["a"][:, 0, 0, 0], 0.0, atol=1e-5)  # mu: no effect on widths
    idx = {"students": jnp.arange(S), "lecturers": jnp.arange(L)}
    site = structure.latent["a"]
    for step in (0.05, -0.2):
        _, chol = stored_base(state, site, idx, theta + jnp.array([0.0, step]))
        # first order, the diagonal through exp: off by the second-order term only
        np.testing.assert_allclose(chol[:, 0, 0], exact_chol(np.log(0.6) + step), rtol=3 * step**2)
    grad = jax.grad(lambda th: stored_base(state, site, idx, th)[1].sum())(theta)
    np.testing.assert_allclose(grad[1], deriv.sum(), rtol=1e-3)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_a_long_table_without_globals_gets_its_exact_stored_bases():
    """Crossed effects with fixed priors and no global site: the stored state has nothing
    to follow (an empty last axis), trains, and holds the exact joint posterior mode."""
    rng = np.random.default_rng(1)
    n_s, n_l, n = 6, 5, 60
    s, l = rng.integers(0, n_s, n), rng.integers(0, n_l, n)
    y = jnp.asarray(rng.normal(size=n), jnp.float32)

    def no_globals(s, l, y, batch=None):
        with numpyro.plate("students", n_s):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("lecturers", n_l):
            b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
            numpyro.sample("y", dist.Normal(a[s[r]] + b[l[r]], 1.0), obs=y[r])

    s, l = jnp.asarray(s), jnp.asarray(l)
    guide = AutoPAVI(no_globals)
    svi = SVI(no_globals, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), s, l, y, 10)
    assert guide.plan.stored.sites == ("a", "b") and guide.plan.stored.globals == ()
    state, loss = svi.update(state, s, l, y, 10)
    assert np.isfinite(loss)
    X = np.concatenate([np.eye(n_s)[np.asarray(s)], np.eye(n_l)[np.asarray(l)]], 1)
    exact = np.linalg.solve(np.eye(n_s + n_l) + X.T @ X, X.T @ np.asarray(y, float))
    stored = state.mutable_state[guide._state_name]["state"]
    got = np.concatenate([stored.mode["a"][:, 0], stored.mode["b"][:, 0]])
    np.testing.assert_allclose(got, exact, atol=3e-3)

    # the stored bases are the training data's modes: with other data they would give the
    # training posterior, so passing them with other data is an error naming the fix
    params = {**svi.get_params(state), **state.mutable_state}
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, s, l, y, sample_shape=(3,))
    assert draws["a"].shape == (3, n_s)
    with pytest.raises(ValueError, match="Observed site 'y' holds other values.*svi.get_params"):
        guide.sample_posterior(jax.random.PRNGKey(1), params, s, l, y + 1.0, sample_shape=(3,))
    with pytest.raises(ValueError, match="Observed site 'y' holds other values"):
        guide.posterior_summary(jax.random.PRNGKey(1), params, s, l, y + 1.0, num_samples=3)
    other = guide.sample_posterior(jax.random.PRNGKey(1), svi.get_params(state), s, l, y + 1.0, sample_shape=(3,))
    assert np.all(np.isfinite(other["a"]))


def small_long_model(sd_a: float):
    """6 students x 5 lecturers in long format, a global ``mu``, students' prior sd ``sd_a``."""

    def model(s, l, y, batch=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("students", 6):
            a = numpyro.sample("a", dist.Normal(0.0, sd_a))
        with numpyro.plate("lecturers", 5):
            b = numpyro.sample("b", dist.Normal(0.0, 1.0))
        with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
            numpyro.sample("y", dist.Normal(mu + a[s[r]] + b[l[r]], 1.0), obs=y[r])

    return model


def test_a_refresh_at_non_finite_globals_keeps_the_state():
    """A refresh at NaN globals (a step stable_update rejects) leaves the stored bases as
    they were, so later refreshes do not warm-start from NaN."""
    from numpyro_pavi.sampling import _advance

    s, l, y = (jnp.asarray(x) for x in (np.arange(60) % 6, np.arange(60) % 5, np.linspace(-1, 1, 60)))
    small = small_long_model(1.0)
    guide = AutoPAVI(small)
    svi = SVI(small, guide, optax.adam(1e-3), Trace_ELBO())
    stored = svi.init(jax.random.PRNGKey(0), s, l, y, 10).mutable_state[guide._state_name]["state"]
    stored = stored._replace(count=jnp.zeros_like(stored.count) + guide.plan.stored.period)  # a refresh step
    nan = jnp.full((1,), jnp.nan)
    after = _advance(guide.plan, stored, nan, nan, ((s, l, y, 10), {}), training=True)
    assert int(after.count) == int(stored.count) + 1
    for old, new in zip(jax.tree.leaves(stored._replace(count=0)), jax.tree.leaves(after._replace(count=0))):
        np.testing.assert_array_equal(old, new)
    fine = _advance(guide.plan, stored, jnp.ones(1), jnp.ones(1), ((s, l, y, 10), {}), training=True)
    assert np.all(np.isfinite(fine.mode["a"])) and not np.allclose(fine.anchor, stored.anchor)


def test_a_wide_element_has_one_width_with_and_without_a_state():
    """A student with no ratings under a N(0, 100) prior: its base's width is lifted to an
    sd of 10 in the training state and in a posterior's refresh from scratch alike."""
    from numpyro_pavi.sampling import _advance

    rng = np.random.default_rng(1)
    s = jnp.asarray(rng.integers(0, 5, 60))  # student 5 has no ratings
    l = jnp.asarray(rng.integers(0, 5, 60))
    y = jnp.asarray(rng.normal(size=60), jnp.float32)
    wide = small_long_model(100.0)
    guide = AutoPAVI(wide)
    svi = SVI(wide, guide, optax.adam(1e-3), Trace_ELBO())
    trained = svi.init(jax.random.PRNGKey(0), s, l, y, 10).mutable_state[guide._state_name]["state"]
    fresh = _advance(guide.plan, None, jnp.zeros(1), jnp.zeros(1), ((s, l, y, None), {}), training=False)
    np.testing.assert_allclose(1.0 / trained.chol["a"][5, 0, 0], 10.0, rtol=1e-4)
    np.testing.assert_allclose(fresh.chol["a"][:, 0, 0], trained.chol["a"][:, 0, 0], rtol=1e-3)


def slopes_model(s, l, x, y, batch=None):
    """A per-student intercept ``a`` and slope ``c`` written as two sites on one plate
    (lme4's ``(1 + x | student)``), crossed lecturers ``b``, fixed variances."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("students", SLOPE_S):
        a = numpyro.sample("a", dist.Normal(0.0, SD_A))
        c = numpyro.sample("c", dist.Normal(0.2, SD_C))
    with numpyro.plate("lecturers", SLOPE_L):
        b = numpyro.sample("b", dist.Normal(0.0, SD_B))
    with numpyro.plate("ratings", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[s[r]] + c[s[r]] * x[r] + b[l[r]], SD_Y), obs=y[r])


SLOPE_S, SLOPE_L, SLOPE_N, SD_C = 8, 5, 120, 0.4


def simulate_slopes(seed=0, n=SLOPE_N):
    rng = np.random.default_rng(seed)
    s, l, x = rng.integers(0, SLOPE_S, n), rng.integers(0, SLOPE_L, n), rng.normal(1.0, 1.0, n)
    eta = 0.3 + SD_A * rng.normal(size=SLOPE_S)[s] + (0.2 + SD_C * rng.normal(size=SLOPE_S))[s] * x
    y = eta + SD_B * rng.normal(size=SLOPE_L)[l] + SD_Y * rng.normal(size=n)
    return jnp.asarray(s), jnp.asarray(l), jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def slopes_posterior(s, l, x, y):
    """Exact Gaussian posterior of ``(mu, a, c, b)``: precision and mean."""
    s, l, x = np.asarray(s), np.asarray(l), np.asarray(x, float)
    X = np.concatenate([np.ones((len(s), 1)), np.eye(SLOPE_S)[s], np.eye(SLOPE_S)[s] * x[:, None], np.eye(SLOPE_L)[l]], 1)
    prior = np.concatenate([[1.0], np.full(SLOPE_S, SD_A**-2), np.full(SLOPE_S, SD_C**-2), np.full(SLOPE_L, SD_B**-2)])
    prior_mean = np.concatenate([[0.0], np.zeros(SLOPE_S), np.full(SLOPE_S, 0.2), np.zeros(SLOPE_L)])
    P = np.diag(prior) + X.T @ X / SD_Y**2
    return P, np.linalg.solve(P, prior * prior_mean + X.T @ np.asarray(y, float) / SD_Y**2)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_sites_on_one_plate_share_a_stored_block_with_the_exact_conditionals():
    """An intercept and a slope on the students' plate are one block of the stored state:
    a refresh gives their joint conditional mode given mu (and its derivative) and each
    student's 2 x 2 precision; the intercept's base is its marginal over the slope, the
    slope's its Gaussian conditional given the sampled intercept, both exact here."""
    s, l, x, y = simulate_slopes()
    guide = AutoPAVI(slopes_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(s, l, x, y, 30)
    spec, structure = guide.plan.stored, guide.structure
    assert spec.sites == ("a", "c", "b") and spec.blocks == (("a", "c"), ("b",))
    assert "stored Laplace bases: a+c, b" in guide.describe()
    mu = 0.4
    model_args = ((s, l, x, y, 30), {})
    state = refresh(slopes_model, structure, spec, init_state(structure, spec), jnp.array([mu]), model_args, sweeps=400)
    P, _ = slopes_posterior(s, l, x, y)
    # given mu: the local block of (a, c, b) and its right-hand side
    _, mean_all = slopes_posterior(s, l, x, y)
    local = P[1:, 1:]
    rhs = local @ mean_all[1:] + P[1:, 0] * (mean_all[0] - mu)
    mode, deriv = np.linalg.solve(local, rhs), -np.linalg.solve(local, P[1:, 0])
    a_, c_, b_ = (slice(0, SLOPE_S), slice(SLOPE_S, 2 * SLOPE_S), slice(2 * SLOPE_S, None))
    np.testing.assert_allclose(state.mode["a"], np.stack([mode[a_], mode[c_]], -1), atol=2e-3)
    np.testing.assert_allclose(state.mode["b"][:, 0], mode[b_], atol=2e-3)
    np.testing.assert_allclose(state.jac["a"][..., 0], np.stack([deriv[a_], deriv[c_]], -1), atol=1e-3)
    block = np.einsum("...ij,...kj->...ik", state.chol["a"], state.chol["a"])  # each student's 2 x 2
    i = np.arange(SLOPE_S)
    exact = np.stack([np.stack([local[i, i], local[i, SLOPE_S + i]], -1), np.stack([local[SLOPE_S + i, i], local[SLOPE_S + i, SLOPE_S + i]], -1)], -2)
    np.testing.assert_allclose(block, exact, rtol=1e-4)

    idx = {"students": jnp.arange(SLOPE_S), "lecturers": jnp.arange(SLOPE_L)}
    sites = [structure.latent["a"], structure.latent["c"]]
    m_a, chol_a = stored_base(state, sites[0], idx, jnp.array([mu]), sites)
    np.testing.assert_allclose(m_a[:, 0], mode[a_], atol=2e-3)
    schur = exact[:, 0, 0] - exact[:, 0, 1] ** 2 / exact[:, 1, 1]
    np.testing.assert_allclose(chol_a[:, 0, 0] ** 2, schur, rtol=1e-4)
    a_draw = jnp.asarray(mode[a_] + 0.3)[:, None]
    m_c, chol_c = stored_base(state, sites[1], idx, jnp.array([mu]), sites, {"a": a_draw})
    np.testing.assert_allclose(m_c[:, 0], mode[c_] - exact[:, 1, 0] / exact[:, 1, 1] * 0.3, atol=2e-3)
    np.testing.assert_allclose(chol_c[:, 0, 0] ** 2, exact[:, 1, 1], rtol=1e-4)
    # the gradient reaches the sampled intercept: d m_c / d a = -P_ca / P_cc
    grad = jax.grad(lambda v: stored_base(state, sites[1], idx, jnp.array([mu]), sites, {"a": v})[0].sum())(a_draw)
    np.testing.assert_allclose(grad[:, 0], -exact[:, 1, 0] / exact[:, 1, 1], rtol=1e-4)


@pytest.mark.slow
def test_rows_subsampled_fit_with_an_intercept_and_slope_block_matches_exact():
    """The intercept-and-slope long table, 40 of 240 rows per step, default guide, constant
    adam 5e-3, 1,500 steps: posterior means against the exact Gaussian posterior, and sds
    and each student's intercept-slope correlation against the exact optimum of the
    guide's family (1,000 draws: Monte Carlo error 0.03 sd on a mean, 2% on an sd, 0.03 on
    a correlation).

    The family's optimum: ``mu`` exact; given ``mu``, a student's block and each lecturer
    Gaussian, independent of one another, at the exact conditional mean with the precision
    of their own block of the posterior's (a student's 2 x 2, with the crossed lecturers
    held): narrower than the exact marginals (here by a median 12%), as any family without
    the students x lecturers covariance is."""
    s, l, x, y = simulate_slopes(1, n=240)
    guide = AutoPAVI(slopes_model)
    svi = SVI(slopes_model, guide, optax.adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), s, l, x, y, 40)
    assert guide.plan.stored.blocks == (("a", "c"), ("b",))
    # a jointly Gaussian block: the slope's base is its exact conditional given the
    # intercept's draw, and its flow does not read that draw
    assert "a" not in guide.structure.latent["c"].conditions_on
    update = jax.jit(lambda st: svi.update(st, s, l, x, y, 40))
    for _ in range(1500):
        state, _ = update(state)
    P, mean = slopes_posterior(s, l, x, y)
    sd = np.sqrt(np.diag(np.linalg.inv(P)))
    params = {**svi.get_params(state), **state.mutable_state}
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, s, l, x, y, sample_shape=(1000,))
    got = np.concatenate([np.asarray(draws["mu"])[:, None]] + [np.asarray(draws[n]) for n in ("a", "c", "b")], 1)
    z = np.abs(got.mean(0) - mean) / sd
    assert np.median(z) < 0.1 and z.max() < 0.5, (np.median(z), z.max())

    # the family's optimum: block-diagonal conditional precision given mu, exact derivative
    local = P[1:, 1:]
    block = np.zeros_like(local)
    k = np.arange(SLOPE_S)
    for rows in [np.array([i, SLOPE_S + i]) for i in k] + [np.array([2 * SLOPE_S + j]) for j in range(SLOPE_L)]:
        block[np.ix_(rows, rows)] = local[np.ix_(rows, rows)]
    J = -np.linalg.solve(local, P[1:, 0])
    family = np.linalg.inv(block) + np.outer(J, J) * sd[0] ** 2
    family_sd = np.concatenate([[sd[0]], np.sqrt(np.diag(family))])
    ratio = got.std(0) / family_sd
    assert 0.95 < np.median(ratio) < 1.05, np.median(ratio)
    assert 0.85 < ratio.min() and ratio.max() < 1.15, (ratio.min(), ratio.max())
    family_corr = family[k, SLOPE_S + k] / np.sqrt(family[k, k] * family[SLOPE_S + k, SLOPE_S + k])
    got_corr = np.array([np.corrcoef(got[:, 1 + i], got[:, 1 + SLOPE_S + i])[0, 1] for i in k])
    assert np.abs(family_corr).max() > 0.3  # the block matters here
    np.testing.assert_allclose(got_corr, family_corr, atol=0.1)


def test_rows_subsampled_without_stored_bases_drops_the_per_step_bases_with_a_warning():
    """Rows subsampled where the stored bases do not apply (an interaction of two crossed
    factors, or a global site after the local ones): a step's base would read only its batch, so the
    local sites are sampled without one, and a LaplaceWarning names them and why."""
    from numpyro_pavi import LaplaceWarning

    school, student, y = nested_long_data()

    def late_global(school, student, y, batch=None):
        with numpyro.plate("schools", 3):
            k = numpyro.sample("k", dist.Normal(0.0, 1.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
            numpyro.sample("y", dist.Normal(k[school[r]], sigma), obs=y[r])

    crossed = "site 'a' sits on plates containing those of sites on crossed plates \\('k', 't'\\)"
    for model, reason in ((interaction_model, crossed), (late_global, "global site 'sigma' comes after")):
        guide = AutoPAVI(model)
        with numpyro.handlers.seed(rng_seed=0), pytest.warns(LaplaceWarning, match=f"(?s)plate 'rows'.*{reason}.*laplace=False"):
            guide._setup_prototype(school, student, y, 10)
        assert guide.plan.stored is None and not any(guide.plan.on_laplace(s) for s in guide.structure.latent.values())
        # the full batch keeps the per-step bases, without the warning
        full = AutoPAVI(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LaplaceWarning)
            with numpyro.handlers.seed(rng_seed=0):
                full._setup_prototype(school, student, y)
        assert any(full.plan.on_laplace(s) for s in full.structure.latent.values())


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_a_block_with_an_imputed_sibling_converges_with_the_first_site_exact():
    """A student's intercept and its partly observed covariate (``obs_mask``: NumPyro
    imputes the missing cells as a latent ``c_unobserved`` on the same plate, unscored at
    the observed ones) form one block: the unscored cells get a unit quadratic, as the
    per-step bases give them, so every element converges, no LaplaceWarning, and the
    intercept's precision at an observed student is its exact conditional one."""
    rng = np.random.default_rng(0)
    n_s, n_l, n = 6, 4, 60
    s, l = jnp.asarray(rng.integers(0, n_s, n)), jnp.asarray(rng.integers(0, n_l, n))
    y = jnp.asarray(rng.normal(size=n), jnp.float32)
    cobs = jnp.asarray(rng.normal(size=n_s), jnp.float32)
    cmask = jnp.array([True, True, True, False, False, False])

    def imputed(s, l, y, cobs, cmask, batch=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("students", n_s):
            a = numpyro.sample("a", dist.Normal(0.0, 0.5))
            c = numpyro.sample("c", dist.Normal(a, 0.4), obs=cobs, obs_mask=cmask)
        with numpyro.plate("lecturers", n_l):
            b = numpyro.sample("b", dist.Normal(0.0, 0.7))
        with numpyro.plate("ratings", n, subsample_size=batch) as r:
            numpyro.sample("y", dist.Normal(mu + a[s[r]] + b[l[r]] + c[s[r]], 0.8), obs=y[r])

    from numpyro_pavi import LaplaceWarning

    guide = AutoPAVI(imputed)
    svi = SVI(imputed, guide, optax.adam(1e-3), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LaplaceWarning)
        state = svi.init(jax.random.PRNGKey(0), s, l, y, cobs, cmask, 10)
    assert guide.plan.stored.blocks == (("a", "c_unobserved"), ("b",))
    stored = state.mutable_state[guide._state_name]["state"]
    assert bool(jnp.all(stored.concave["a"])) and float(jnp.max(stored.decrement["a"])) < 1e-2
    # an observed student: prior 1/0.25, observed c 1/0.16, its rows 1/0.64 each; no coupling
    count = np.bincount(np.asarray(s), minlength=n_s)[:3]
    p = np.einsum("...ij,...kj->...ik", stored.chol["a"], stored.chol["a"])[:3]
    np.testing.assert_allclose(p[:, 0, 0], 4.0 + 6.25 + count / 0.64, rtol=1e-4)
    np.testing.assert_allclose(p[:, 0, 1], 0.0, atol=1e-4)


def test_a_nested_site_follows_its_parents_draw_exactly():
    """Students nested in schools, rows subsampled: a refresh gives the joint mode of (k, a)
    given mu and its derivative; a school's base is its exact marginal (the students
    integrated out: a Schur complement), a student's the exact conditional given its
    school's draw, whose gradient reaches that draw."""
    school, student, y = nested_long_data()
    guide = AutoPAVI(nested_long_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(school, student, y, 10)
    spec, structure = guide.plan.stored, guide.structure
    assert spec.blocks == (("k",), ("a",)) and spec.parents == (("a", "k"),)
    assert "stored Laplace bases: k, a in k" in guide.describe()
    # jointly Gaussian in (k, a): the student's base is its exact conditional given its
    # school's draw, so its flow does not read that draw (and runs once, not per student)
    assert "k" not in structure.latent["a"].conditions_on
    mu, K = 0.3, 3
    state = jax.jit(lambda m: refresh(nested_long_model, structure, spec, init_state(structure, spec), m, ((school, student, y, 10), {}), sweeps=400))(jnp.array([mu]))
    P, mean = nested_posterior(school, student, y, mu)
    np.testing.assert_allclose(state.mode["k"][:, 0], mean[:K], atol=2e-3)
    np.testing.assert_allclose(np.ravel(state.mode["a"][..., 0]), mean[K:], atol=2e-3)
    d_mean = np.linalg.solve(P, np.r_[np.ones(K), np.zeros(len(mean) - K)])  # the mean's derivative in mu
    np.testing.assert_allclose(state.jac["k"][:, 0, 0], d_mean[:K], atol=1e-3)

    idx = {"schools": jnp.arange(K), "students": jnp.arange(4), "rows": jnp.arange(10)}
    k_site, a_site = structure.latent["k"], structure.latent["a"]
    m_k, chol_k = stored_base(state, k_site, idx, jnp.array([mu]), [k_site])
    cov = np.linalg.inv(P)
    np.testing.assert_allclose(m_k[:, 0], mean[:K], atol=2e-3)
    np.testing.assert_allclose(chol_k[:, 0, 0] ** 2, 1.0 / np.diag(cov)[:K], rtol=1e-4)
    k_draw = jnp.asarray(mean[:K] + np.array([0.5, -0.2, 0.1]))[:, None]

    def student_mean(k):
        return stored_base(state, a_site, idx, jnp.array([mu]), [a_site], None, [([k_site], k)])

    m_a, chol_a = student_mean(k_draw)
    P_aa, P_ak = P[K:, K:], P[K:, :K]
    exact = np.linalg.solve(P_aa, P_aa @ mean[K:] - P_ak @ (np.asarray(k_draw[:, 0]) - mean[:K]))
    np.testing.assert_allclose(np.ravel(m_a[..., 0]), exact, atol=2e-3)
    np.testing.assert_allclose(np.ravel(chol_a[..., 0, 0] ** 2), np.diag(P_aa), rtol=1e-4)
    grad = jax.grad(lambda k: student_mean(k)[0].sum())(k_draw)[:, 0]
    np.testing.assert_allclose(grad, -(P_ak / np.diag(P_aa)[:, None]).sum(0), rtol=1e-4)


def parent_sets_width(school, student, y, batch=None):
    """A school's effect sets its students' spread: a student is Gaussian given its school,
    with a width that depends on the school's draw."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(0.0, 0.5))
        with numpyro.plate("students", 4):
            a = numpyro.sample("a", dist.Normal(0.0, jnp.exp(k)))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[student[r], school[r]], 1.0), obs=y[r])


def parent_enters_nonlinearly(school, student, y, batch=None):
    """A student's mean is a nonlinear function of its school's effect (a fixed width)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(0.0, 0.5))
        with numpyro.plate("students", 4):
            a = numpyro.sample("a", dist.Normal(jnp.sin(k), 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[student[r], school[r]], 1.0), obs=y[r])


def width_from_two_parents(school, student, y, batch=None):
    """A two-site parent block whose difference sets its students' width: moving both parent
    sites together would leave it unchanged."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(0.0, 0.5))
        q = numpyro.sample("q", dist.Normal(0.0, 0.5))
        with numpyro.plate("students", 4):
            a = numpyro.sample("a", dist.Normal(k, jnp.exp(k - q)))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(mu + a[student[r], school[r]], 1.0), obs=y[r])


def deep_nested_poisson(school, student, y, batch=None):
    """``deep_nested_model``'s chain with Poisson counts: a school's base is a Laplace
    marginal over its students, not its exact conditional given its region."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("regions", 2):
        g = numpyro.sample("g", dist.Normal(mu, 1.0))
        with numpyro.plate("schools", 3):
            k = numpyro.sample("k", dist.Normal(g, 1.0))
            with numpyro.plate("students", 4):
                a = numpyro.sample("a", dist.Normal(k, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        rate = jnp.exp(a[student[r], school[r], r % 2])
        numpyro.sample("y", dist.Poisson(rate), obs=jnp.round(jnp.abs(y[r]) * 3))


def test_a_nested_site_reads_its_parent_where_its_base_does_not_follow_it():
    """The stored base follows a parent's draw in its mode, to first order: where the parent
    sets the child's width, or its mean nonlinearly, the child's flow keeps the parent's
    draw in its context (the probe finds the problem not quadratic jointly with it)."""
    school, student, y = nested_long_data()
    for model in (parent_sets_width, parent_enters_nonlinearly, width_from_two_parents):
        guide = AutoPAVI(model)
        with numpyro.handlers.seed(rng_seed=0):
            guide._setup_prototype(school, student, y, 10)
        assert guide.plan.stored.parents == (("a", "k"),)
        assert "a" in guide.plan.quadratic, model.__name__
        assert "k" in guide.structure.latent["a"].conditions_on, model.__name__
    # a chain over Poisson students: no block's base is its exact conditional
    guide = AutoPAVI(deep_nested_poisson)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(school, student, y, 10)
    assert "a" not in guide.plan.quadratic
    assert "g" in guide.structure.latent["k"].conditions_on
    assert {"g", "k"} <= set(guide.structure.latent["a"].conditions_on)


@pytest.mark.slow
def test_rows_subsampled_nested_fit_matches_exact_posterior():
    """Students nested in schools (known variances), 10 of 40 rows per step, default guide,
    constant adam 5e-3, 1,500 steps: given mu the family holds the exact posterior (a
    school's marginal, a student's conditional on its school's draw), so means and sds
    match the exact ones (1,000 draws: Monte Carlo error 0.03 sd on a mean, 2% on an sd)."""
    school, student, y = nested_long_data()
    guide = AutoPAVI(nested_long_model)
    svi = SVI(nested_long_model, guide, optax.adam(5e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), school, student, y, 10)
    update = jax.jit(lambda st: svi.update(st, school, student, y, 10))
    for _ in range(1500):
        state, _ = update(state)
    params = {**svi.get_params(state), **state.mutable_state}
    draws = guide.sample_posterior(jax.random.PRNGKey(1), params, school, student, y, sample_shape=(1000,))
    # jointly with mu ~ N(0, 1), k ~ N(mu, 1): the full Gaussian posterior of (mu, k, a)
    K, M = 3, 4
    P0, _ = nested_posterior(school, student, y, 0.0)
    P = np.zeros((1 + len(P0),) * 2)
    P[1:, 1:] = P0
    P[0, 0] = 1.0 + K
    P[0, 1 : 1 + K] = P[1 : 1 + K, 0] = -1.0
    b = np.zeros(len(P))
    for r in range(len(y)):
        b[1 + K + int(student[r]) * K + int(school[r])] += float(y[r])
    mean, sd = np.linalg.solve(P, b), np.sqrt(np.diag(np.linalg.inv(P)))
    got = np.concatenate([np.asarray(draws["mu"])[:, None], np.asarray(draws["k"]), np.reshape(np.asarray(draws["a"]), (1000, M * K))], 1)
    z = np.abs(got.mean(0) - mean) / sd
    ratio = got.std(0) / sd
    assert np.median(z) < 0.1 and z.max() < 0.3, (np.median(z), z.max())
    assert 0.94 < np.median(ratio) < 1.06 and 0.88 < ratio.min() and ratio.max() < 1.12, ratio


def two_site_parent(school, student, x, y, batch=None):
    """A school's intercept and slope (a parent block of two sites) over its students."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(mu, 1.0))
        q = numpyro.sample("q", dist.Normal(0.0, 0.5))
        with numpyro.plate("students", 4):
            a = numpyro.sample("a", dist.Normal(k + 0.5 * q, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(a[student[r], school[r]] + q[school[r]] * x[r], 1.0), obs=y[r])


def two_extra_plates(school, student, x, y, batch=None):
    """A child on two plates more than its parent (terms x students within schools)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("schools", 3):
        k = numpyro.sample("k", dist.Normal(mu, 1.0))
        with numpyro.plate("students", 4), numpyro.plate("terms", 2, dim=-3):
            a = numpyro.sample("a", dist.Normal(k, 1.0))
    with numpyro.plate("rows", y.shape[0], subsample_size=batch) as r:
        numpyro.sample("y", dist.Normal(a[r % 2, student[r], school[r]], 1.0), obs=y[r])


def exact_given_mu(model, data, guide, names, mu):
    """The exact posterior of the local sites ``names`` given ``mu``, read off the log
    joint's Hessian (quadratic in them): ``(P, mean, cuts)``, the sites flattened in
    ``names``' order, site ``names[i]`` at ``cuts[i]:cuts[i + 1]``."""
    from numpyro.infer.util import log_density

    shapes = {n: guide.prototype_trace[n]["value"].shape for n in names}
    cuts = np.cumsum([0] + [int(np.prod(shapes[n])) for n in names])

    def log_joint(flat):
        vals = {n: flat[cuts[i] : cuts[i + 1]].reshape(shapes[n]) for i, n in enumerate(names)}
        return log_density(model, data, {}, {"mu": jnp.array(mu), **vals})[0]

    zero = jnp.zeros(cuts[-1])
    P = -np.asarray(jax.hessian(log_joint)(zero), float)
    return P, np.linalg.solve(P, np.asarray(jax.grad(log_joint)(zero), float)), cuts


@pytest.mark.slow
@pytest.mark.parametrize("model", [two_site_parent, two_extra_plates])
def test_nested_blocks_of_other_shapes_are_exact(model):
    """A parent block of two sites, and a child with two plates more than its parent:
    the parent's stored precision is its exact marginal (each school's 2 x 2), the child's
    base the exact conditional given a parent draw; the exact posterior given mu is read
    off the log joint's Hessian (quadratic in the local sites)."""
    rng = np.random.default_rng(0)
    n = 40
    data = tuple(jnp.asarray(v) for v in (rng.integers(0, 3, n), rng.integers(0, 4, n), rng.normal(size=n).astype(np.float32), rng.normal(size=n).astype(np.float32)))
    guide = AutoPAVI(model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(*data, 10)
    spec, structure = guide.plan.stored, guide.structure
    (parent, *_), (child,) = spec.blocks
    assert spec.parents == ((child, parent),)
    mu = 0.3
    state = refresh(model, structure, spec, init_state(structure, spec), jnp.array([mu]), (data + (10,), {}), sweeps=400)

    names = [n for n, s in structure.latent.items() if s.plates]  # site layout, flattened in order
    P, mean, cuts = exact_given_mu(model, data, guide, names, mu)
    cov = np.linalg.inv(P)
    rows = {n: np.arange(cuts[i], cuts[i + 1]) for i, n in enumerate(names)}
    outer = spec.block_of(parent)
    for j in range(3):  # each school's marginal over its students
        ids = [rows[s][j] for s in outer]
        got = np.asarray(state.chol[parent][j] @ state.chol[parent][j].T)
        np.testing.assert_allclose(got, np.linalg.inv(cov[np.ix_(ids, ids)]), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(state.mode[parent][j], mean[ids], atol=2e-3)

    draw = state.mode[parent] + jnp.array([0.4, -0.3])[: len(outer)]
    sites = [structure.latent[s] for s in outer]
    site = structure.latent[child]
    idx = {p: jnp.arange(info.size) for p, info in structure.plates.items()}
    m, chol = stored_base(state, site, idx, jnp.array([mu]), [site], None, [(sites, draw)])
    c, p = rows[child], np.concatenate([rows[s] for s in outer])
    shift = np.concatenate([np.asarray(draw[:, i]) for i in range(len(outer))]) - mean[p]
    exact = mean[c] - np.linalg.solve(P[np.ix_(c, c)], P[np.ix_(c, p)] @ shift)
    assert site.plates == structure.plate_order(site.plates)  # canonical grid = site layout here
    np.testing.assert_allclose(np.ravel(m[..., 0]), exact, atol=2e-3)
    np.testing.assert_allclose(np.ravel(chol[..., 0, 0] ** 2), np.diag(P)[c], rtol=1e-4)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_a_chain_of_nested_blocks_is_exact():
    """Students in schools in regions, each row reading all three levels: a refresh gives
    each region's exact marginal precision, each school's exact conditional given its
    region (its students integrated out), and each student's exact conditional given its
    school and region; the bases' modes follow the ancestors' draws exactly (the exact
    posterior given mu read off the log joint's Hessian: quadratic in the local sites)."""
    school, student, y = nested_long_data()
    data = (school, student, y)
    guide = AutoPAVI(deep_nested_model)
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(*data, 10)
    spec, structure = guide.plan.stored, guide.structure
    mu = 0.3
    state = refresh(deep_nested_model, structure, spec, init_state(structure, spec), jnp.array([mu]), (data + (10,), {}), sweeps=400)

    names = ["g", "k", "a"]
    shapes = {n: guide.prototype_trace[n]["value"].shape for n in names}  # (2,), (3, 2), (4, 3, 2)
    P, mean, cuts = exact_given_mu(deep_nested_model, data, guide, names, mu)
    ids = {n: np.arange(cuts[i], cuts[i + 1]).reshape(shapes[n]) for i, n in enumerate(names)}
    sites = {n: structure.latent[n] for n in names}
    for n in names:
        np.testing.assert_allclose(np.ravel(state.mode[n][..., 0]), mean[np.ravel(ids[n])], atol=2e-3)

    # a region: its marginal; a school: its conditional given the regions in the (k, g) marginal
    cov = np.linalg.inv(P)
    outer = np.concatenate([np.ravel(ids["g"]), np.ravel(ids["k"])])
    Q = np.linalg.inv(cov[np.ix_(outer, outer)])  # precision of (g, k), students integrated out
    np.testing.assert_allclose(np.asarray(state.chol["g"][:, 0, 0]) ** 2, 1.0 / np.diag(cov)[ids["g"]], rtol=1e-4)
    np.testing.assert_allclose(np.ravel(state.chol["k"][..., 0, 0]) ** 2, np.diag(Q)[2:], rtol=1e-4)

    idx = {p: jnp.arange(info.size) for p, info in structure.plates.items()}
    theta = jnp.array([mu])
    g_draw = state.mode["g"] + jnp.array([[0.4], [-0.3]])
    m_k, _ = stored_base(state, sites["k"], idx, theta, [sites["k"]], None, [([sites["g"]], g_draw)])
    shift = np.ravel(g_draw[:, 0]) - mean[ids["g"]]
    exact_k = mean[np.ravel(ids["k"])] - np.linalg.solve(Q[2:, 2:], Q[2:, :2] @ shift)
    np.testing.assert_allclose(np.ravel(m_k[..., 0]), exact_k, atol=2e-3)

    k_draw = jnp.reshape(jnp.asarray(exact_k), (3, 2, 1)) + 0.2
    m_a, chol_a = stored_base(
        state, sites["a"], idx, theta, [sites["a"]], None, [([sites["g"]], g_draw), ([sites["k"]], k_draw)]
    )
    c = np.ravel(ids["a"])
    shift = np.concatenate([np.ravel(g_draw[:, 0]) - mean[ids["g"]], np.ravel(k_draw[..., 0]) - mean[np.ravel(ids["k"])]])
    exact_a = mean[c] - np.linalg.solve(P[np.ix_(c, c)], P[np.ix_(c, outer)] @ shift)
    np.testing.assert_allclose(np.ravel(m_a[..., 0]), exact_a, atol=2e-3)
    np.testing.assert_allclose(np.ravel(chol_a[..., 0, 0]) ** 2, np.diag(P)[c], rtol=1e-4)


def test_the_control_variate_has_mean_zero_over_batches_and_removes_the_rows_noise():
    """A step's control variate (``base_state.control_variate``) averages to zero over a
    partition of the rows into batches, for any draw, so the ELBO stays unbiased; and it
    takes most of the rows' noise out of the batch log joint's gradient at a draw near the
    stored mode (the gradient's variance over the batches falls by 10x here; the test asks 4x)."""
    from numpyro_pavi.base_state import _rows_log_joint, control_variate

    s, l, y = simulate()
    model = lambda s, l, y, batch=None: long_model(s, l, y, batch, latent_sd=True)  # noqa: E731
    guide = AutoPAVI(model)
    B = 100
    with numpyro.handlers.seed(rng_seed=0):
        guide._setup_prototype(s, l, y, B)
    spec, structure = guide.plan.stored, guide.structure
    theta0 = jnp.array([{"tau": np.log(SD_A), "mu": 0.3}[g] for g in spec.globals])
    args = ((s, l, y, B), {})
    state = jax.jit(lambda t: refresh(model, structure, spec, init_state(structure, spec), t, args, sweeps=100))(theta0)
    rng = np.random.default_rng(1)
    theta = theta0 + jnp.asarray(0.1 * rng.normal(size=2), jnp.float32)
    draw = {n: state.mode[n] + jnp.asarray(0.2 * rng.normal(size=state.mode[n].shape), jnp.float32) for n in state.mode}
    full = {"students": jnp.arange(S), "lecturers": jnp.arange(L)}
    batches = np.random.default_rng(2).permutation(N).reshape(N // B, B)

    @jax.jit
    def one_batch(rows):
        idx = {**full, "ratings": rows}
        logp = _rows_log_joint(model, structure, spec, idx, args)
        cv = lambda t, v: control_variate(model, structure, spec, state, t, v, idx, args)  # noqa: E731
        flat = lambda g: jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(g)])  # noqa: E731
        g = jax.grad(logp, (0, 1))(theta, draw)
        gc = jax.grad(lambda t, v: logp(t, v) - cv(t, v), (0, 1))(theta, draw)
        return cv(theta, draw), flat(g), flat(gc)

    cvs, raw, reduced = (np.array(x) for x in zip(*[one_batch(jnp.asarray(rows)) for rows in batches]))
    assert abs(cvs.mean()) < 1e-3 * np.abs(cvs).max() + 1e-3, cvs
    assert np.abs(cvs).max() > 1.0  # not zero by construction: each batch's own is large
    spread = lambda g: np.sum(np.var(np.array(g), axis=0))  # noqa: E731
    assert spread(reduced) < 0.25 * spread(raw), (spread(reduced), spread(raw))  # 0.10 when written
    # the two gradients agree on average over the partition (the same ELBO)
    np.testing.assert_allclose(np.mean(reduced, 0), np.mean(raw, 0), atol=1e-2 * np.abs(np.mean(raw, 0)).max())


def test_a_state_from_before_the_score_is_refreshed_and_an_unrefreshed_one_adds_nothing():
    """A stored state without ``score`` (an earlier version's) trains: the step refreshes it,
    so its score comes from the same refresh as its modes; a state that never refreshed
    (a first refresh rolled back as non-finite) gives a zero control variate, not a
    biased one."""
    from numpyro_pavi.base_state import control_variate
    from numpyro_pavi.sampling import _advance

    s, l, y = (jnp.asarray(x) for x in (np.arange(60) % 6, np.arange(60) % 5, np.linspace(-1, 1, 60)))
    small = small_long_model(1.0)
    guide = AutoPAVI(small)
    svi = SVI(small, guide, optax.adam(1e-3), Trace_ELBO())
    stored = svi.init(jax.random.PRNGKey(0), s, l, y, 10).mutable_state[guide._state_name]["state"]
    old = stored._replace(score=None, count=jnp.ones_like(stored.count))
    args = ((s, l, y, 10), {})
    after = _advance(guide.plan, old, jnp.ones(1), jnp.ones(1), args, training=True)
    assert after.score is not None and float(jnp.abs(after.score["a"]).sum()) > 0
    np.testing.assert_allclose(after.anchor, jnp.ones(1))
    spec, structure = guide.plan.stored, guide.structure
    fresh = init_state(structure, spec)
    idx = {"students": jnp.arange(6), "lecturers": jnp.arange(5), "ratings": jnp.arange(10)}
    values = {n: m + 1.0 for n, m in fresh.mode.items()}
    assert float(control_variate(small, structure, spec, fresh, jnp.ones(1), values, idx, args)) == 0.0
    assert float(control_variate(small, structure, spec, after, jnp.ones(1), values, idx, args)) != 0.0
