"""Cross-checks of the reference models (numpyro_pavi.examples.models) and exact answers (numpyro_pavi.examples.exact).

Three independent routes must agree:

* the closed-form random-effects posterior (per-coordinate algebra),
* the dense linear-Gaussian solver (Cholesky, Woodbury), itself checked against a direct
  ``scipy.stats.multivariate_normal`` evaluation and a numerical integral,
* the NumPyro models, through the identity ``log p(x) = log p(x, z) - log p(z | x)`` that
  holds at *every* z: ``log p(x, z)`` comes from ``numpyro.infer.util.log_density`` and
  ``log p(z | x)`` from the exact Gaussian posterior. A wrong model, a wrong posterior mean or
  covariance, or a wrong evidence makes the right-hand side depend on z or miss the evidence.

NumPyro computations run in float64 inside the ``x64`` fixture, which restores JAX's previous
setting afterwards because other test files share the process.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from numpyro import handlers
from numpyro.infer.util import log_density

from numpyro_pavi.examples import exact, models


def _log_joint(model, args, kwargs, values) -> float:
    lp, _ = log_density(model, args, kwargs, {k: jnp.asarray(v) for k, v in values.items()})
    return float(lp)


# Test data come from numpy: eager JAX sampling compiles every op for every shape, which would
# dominate this file's run time. The JAX simulators are exercised in their own test below.


def _random_effects_data(
    seed: int, G: int, M: int, K: int, scales=(0.5, 0.5, 0.1)
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    s0, s1, s2 = scales
    mu = s0 * rng.standard_normal(K)
    mu_g = mu + s1 * rng.standard_normal((G, 1, K))
    return mu_g + s2 * rng.standard_normal((G, M, K)), {"mu": mu, "mu_g": mu_g}


def _nested_data(
    seed: int, S: int, T: int, M: int, scales=(1.0, 0.5, 0.3, 0.2)
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    s0, s1, s2, s3 = scales
    mu = s0 * rng.standard_normal()
    mu_s = mu + s1 * rng.standard_normal((S, 1, 1))
    mu_st = mu_s + s2 * rng.standard_normal((S, T, 1))
    x = mu_st + s3 * rng.standard_normal((S, T, M))
    return x, {"mu": np.float64(mu), "mu_s": mu_s, "mu_st": mu_st}


def _ragged_data(
    seed: int, num_groups: int, max_size: int, scales=(1.0, 0.5, 0.5, 0.3)
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Unequal group sizes in [0, max_size] (empty groups allowed), shuffled group index."""
    rng = np.random.default_rng(seed)
    s_mu, s_a, s_b, s_y = scales
    sizes = rng.integers(0, max_size + 1, num_groups)
    sizes[0] = max(sizes[0], 1)  # never an empty data set
    group = rng.permutation(np.repeat(np.arange(num_groups), sizes)).astype(np.int32)
    mu_a, mu_b = s_mu * rng.standard_normal(2)
    a = mu_a + s_a * rng.standard_normal(num_groups)
    b = mu_b + s_b * rng.standard_normal(num_groups)
    cov = rng.standard_normal(group.shape)
    y = a[group] + b[group] * cov + s_y * rng.standard_normal(group.shape)
    return y, group, cov, {"mu_a": mu_a, "mu_b": mu_b, "a": a, "b": b}


def _crossed_data(seed: int, R: int, C: int, scales=(1.0, 1.0, 0.5)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    s_r, s_c, s_y = scales
    r = s_r * rng.standard_normal((R, 1))
    c = s_c * rng.standard_normal(C)
    return r + c + s_y * rng.standard_normal((R, C)), {"r": r, "c": c}


# ---------------------------------------------------------------------------------------------
# Closed form vs dense, dense vs direct
# ---------------------------------------------------------------------------------------------


def _check_closed_form_matches_dense(x: np.ndarray, s0: float, s1: float, s2: float) -> None:
    closed = exact.random_effects_posterior(x, s0, s1, s2)
    dense = exact.posterior_from_dense(exact.random_effects_dense(x, s0, s1, s2))
    G, _, K = x.shape
    tol = {"rtol": 1e-8, "atol": 1e-8}
    np.testing.assert_allclose(closed["mu_mean"], dense.mean["mu"], **tol)
    np.testing.assert_allclose(closed["mu_sd"], dense.sd["mu"], **tol)
    np.testing.assert_allclose(closed["mu_g_mean"], dense.mean["mu_g"][:, 0, :], **tol)
    np.testing.assert_allclose(closed["mu_g_sd"], dense.sd["mu_g"][:, 0, :], **tol)
    # Dense layout: z = [mu (K), mu_g (G, 1, K)], so cov(mu[k], mu_g[g, k]) is at (k, K + g K + k).
    g, k = np.meshgrid(np.arange(G), np.arange(K), indexing="ij")
    np.testing.assert_allclose(closed["cov_mu_mu_g"], dense.flat_cov[k, K + g * K + k], **tol)
    np.testing.assert_allclose(closed["log_evidence"], dense.log_evidence, **tol)


@pytest.mark.parametrize("G,M,K", [(1, 1, 1), (3, 4, 2), (6, 2, 3)])
def test_closed_form_random_effects_matches_dense(G, M, K):
    x, _ = _random_effects_data(G * 100 + M * 10 + K, G, M, K)
    _check_closed_form_matches_dense(x, 0.5, 0.5, 0.1)


@settings(max_examples=25, deadline=None)
@given(
    G=st.integers(1, 5),
    M=st.integers(1, 4),
    K=st.integers(1, 3),
    scales=st.tuples(*[st.floats(0.05, 3.0)] * 3),
    seed=st.integers(0, 2**16),
)
def test_closed_form_random_effects_matches_dense_property(G, M, K, scales, seed):
    x, _ = _random_effects_data(seed, G, M, K, scales)
    _check_closed_form_matches_dense(x, *scales)


@pytest.mark.parametrize("vector_noise", [False, True])
def test_linear_gaussian_posterior_matches_direct_formulas(vector_noise):
    rng = np.random.default_rng(0)
    n, d = 7, 4
    A = rng.standard_normal((n, d))
    m0 = rng.standard_normal(d)
    F = rng.standard_normal((d, d))
    C0 = F @ F.T + 0.5 * np.eye(d)
    y = rng.standard_normal(n)
    noise = rng.uniform(0.2, 2.0, n) if vector_noise else 0.7
    D = np.diag(np.broadcast_to(noise, (n,)))
    got = exact.linear_gaussian_posterior(A, m0, C0, y, noise)

    # Observation-space (Kalman) form: no precision matrix, no Woodbury.
    S = A @ C0 @ A.T + D
    gain = np.linalg.solve(S, A @ C0).T
    np.testing.assert_allclose(got["mean"], m0 + gain @ (y - A @ m0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(got["cov"], C0 - gain @ A @ C0, rtol=1e-10, atol=1e-10)
    want = scipy.stats.multivariate_normal(A @ m0, S).logpdf(y)
    assert got["log_evidence"] == pytest.approx(want, abs=1e-10)


def test_random_effects_log_evidence_matches_numerical_integral():
    """log p(x) by quadrature over mu and each mu_g, for G=2, M=3, K=1: no Gaussian algebra."""
    s0, s1, s2 = 0.5, 0.5, 0.1
    x = _random_effects_data(7, 2, 3, 1)[0][..., 0]  # (G, M)

    def pdf(v, loc, scale):
        # Plain formula: scipy.stats' per-call overhead dominates thousands of scalar calls.
        return np.exp(-0.5 * ((v - loc) / scale) ** 2) / (math.sqrt(2 * math.pi) * scale)

    def group_marginal(mu: float, xg: np.ndarray) -> float:
        def integrand(mu_g: float) -> float:
            return pdf(mu_g, mu, s1) * np.prod(pdf(xg, mu_g, s2))

        c = float(xg.mean())
        # The integrand is concentrated within a few s2/sqrt(M) of the group mean.
        return scipy.integrate.quad(integrand, c - 1.0, c + 1.0, points=[c], epsabs=0, epsrel=1e-10)[0]

    def outer(mu: float) -> float:
        return pdf(mu, 0.0, s0) * group_marginal(mu, x[0]) * group_marginal(mu, x[1])

    evidence = scipy.integrate.quad(outer, -12 * s0, 12 * s0, epsabs=0, epsrel=1e-10)[0]
    got = exact.random_effects_posterior(x[..., None], s0, s1, s2)["log_evidence"]
    assert got == pytest.approx(math.log(evidence), abs=1e-7)


# ---------------------------------------------------------------------------------------------
# log p(x) = log p(x, z) - log p(z | x) against the NumPyro models
# ---------------------------------------------------------------------------------------------


def _random_effects_closed_log_post(closed: dict, mu: np.ndarray, mu_g: np.ndarray) -> float:
    """log p(mu, mu_g | x) from the closed form: p(mu | x) prod_g p(mu_g | mu, x)."""
    norm = scipy.stats.norm
    mu_var = closed["mu_sd"] ** 2
    slope = closed["cov_mu_mu_g"] / mu_var
    cond_mean = closed["mu_g_mean"] + slope * (mu - closed["mu_mean"])
    cond_sd = np.sqrt(closed["mu_g_sd"] ** 2 - closed["cov_mu_mu_g"] ** 2 / mu_var)
    return float(
        norm.logpdf(mu, closed["mu_mean"], closed["mu_sd"]).sum() + norm.logpdf(mu_g[:, 0, :], cond_mean, cond_sd).sum()
    )


def test_random_effects_identity_closed_form(x64):
    x, truth = _random_effects_data(0, 5, 4, 3)
    closed = exact.random_effects_posterior(x, 0.5, 0.5, 0.1)
    rng = np.random.default_rng(1)
    points = [
        {k: np.asarray(v) for k, v in truth.items()},
        # Far from the posterior: the identity must hold at any z, not only near the mode.
        {"mu": rng.standard_normal(3), "mu_g": rng.standard_normal((5, 1, 3))},
    ]
    for z in points:
        lhs = _log_joint(models.random_effects, (x,), {}, z) - _random_effects_closed_log_post(
            closed, z["mu"], z["mu_g"]
        )
        assert lhs == pytest.approx(closed["log_evidence"], rel=1e-10, abs=1e-8)


@functools.cache
def _cases():
    """(model, args, kwargs, exact posterior) for each model, with non-default scales."""
    re_scales = {"s0": 0.7, "s1": 0.4, "s2": 0.2}
    x_re, _ = _random_effects_data(1, 4, 3, 2, tuple(re_scales.values()))
    nested_scales = {"s0": 1.2, "s1": 0.6, "s2": 0.35, "s3": 0.25}
    x_n, _ = _nested_data(2, 3, 2, 4, tuple(nested_scales.values()))
    ragged_scales = {"s_mu": 1.3, "s_a": 0.6, "s_b": 0.4, "s_y": 0.25}
    y, group, cov, _ = _ragged_data(3, 6, 7, tuple(ragged_scales.values()))
    crossed_scales = {"s_r": 0.9, "s_c": 1.4, "s_y": 0.6}
    y_c, _ = _crossed_data(4, 5, 3, tuple(crossed_scales.values()))
    return (
        (
            models.random_effects,
            (x_re,),
            re_scales,
            exact.posterior_from_dense(exact.random_effects_dense(x_re, **re_scales)),
        ),
        (
            models.nested_three_level,
            (x_n,),
            nested_scales,
            exact.nested_three_level_posterior(x_n, **nested_scales),
        ),
        (
            models.ragged_groups,
            (y, group, cov),
            {"num_groups": 6, **ragged_scales},
            exact.ragged_groups_posterior(y, group, cov, 6, **ragged_scales),
        ),
        (models.crossed, (y_c,), crossed_scales, exact.crossed_posterior(y_c, **crossed_scales)),
    )


def _log_joint_traced(model, args, kwargs, z):
    return log_density(model, args, kwargs, z)[0]


def test_log_evidence_identity_dense_all_models(x64):
    rng = np.random.default_rng(0)
    for model, args, kwargs, post in _cases():
        # One compilation per model instead of one eager dispatch per op and point.
        log_joint = jax.jit(functools.partial(_log_joint_traced, model, args, kwargs))
        draws = post.sample(rng, 2)
        far = post.unflatten(3.0 * rng.standard_normal(post.flat_mean.shape))
        points = [{k: v[i] for k, v in draws.items()} for i in range(2)] + [far]
        for z in points:
            lhs = float(log_joint(z)) - post.log_prob(z)
            assert lhs == pytest.approx(post.log_evidence, rel=1e-10, abs=1e-8), model.__name__


def test_site_posterior_shapes_match_model_sites(x64):
    """Exact means are in site layout, so they substitute into the model as they are."""
    for model, args, kwargs, post in _cases():
        trace = handlers.trace(handlers.seed(model, 0)).get_trace(*args, **kwargs)
        latent = {n for n, s in trace.items() if s["type"] == "sample" and not s["is_observed"]}
        assert latent == set(post.mean), model.__name__
        for name in latent:
            assert post.mean[name].shape == trace[name]["value"].shape, name
            assert post.sd[name].shape == trace[name]["value"].shape, name
            assert np.all(post.sd[name] > 0)


def test_site_posterior_log_prob_batches():
    x, _ = _random_effects_data(3, 3, 2, 2)
    post = exact.posterior_from_dense(exact.random_effects_dense(x))
    draws = post.sample(np.random.default_rng(0), 4)
    batched = post.log_prob(draws)
    single = [post.log_prob({k: v[i] for k, v in draws.items()}) for i in range(4)]
    np.testing.assert_allclose(batched, single, rtol=1e-12)
    np.testing.assert_allclose(post.flatten(post.unflatten(post.flat_mean)), post.flat_mean)


def test_defaults_of_models_and_exact_agree():
    pairs = [
        (models.random_effects, exact.random_effects_posterior),
        (models.random_effects, exact.random_effects_dense),
        (models.nested_three_level, exact.nested_three_level_posterior),
        (models.ragged_groups, exact.ragged_groups_posterior),
        (models.crossed, exact.crossed_posterior),
    ]
    for model, fn in pairs:
        m_params = inspect.signature(model).parameters
        for name, p in inspect.signature(fn).parameters.items():
            if name.startswith("s") and p.default is not inspect.Parameter.empty:
                assert m_params[name].default == p.default, (model.__name__, fn.__name__, name)


# ---------------------------------------------------------------------------------------------
# Subsampled models
# ---------------------------------------------------------------------------------------------


def _subsampled_log_joint(model, args, kwargs, plate: str, idx, values) -> float:
    with warnings.catch_warnings():
        # NumPyro warns when the substituted indices are not subsample_size long (full indices).
        warnings.filterwarnings("ignore", message="subsample_size does not match")
        sub = handlers.substitute(model, data={plate: jnp.asarray(idx)})
        return _log_joint(sub, args, kwargs, values)


def test_subsampled_models_with_full_indices_equal_full_models(x64):
    rng = np.random.default_rng(0)
    for model, args, kwargs, post in _cases():
        z = {k: v[0] for k, v in post.sample(rng, 1).items()}
        full = _log_joint(model, args, kwargs, z)
        if model is models.ragged_groups:
            plates = {"obs": (len(args[0]), "subsample_size")}
        elif model is models.crossed:
            plates = {
                "rows": (args[0].shape[0], "subsample_size"),
                "cols": (args[0].shape[1], "col_subsample_size"),
            }
        else:
            plate = "groups" if model is models.random_effects else "subjects"
            plates = {plate: (args[0].shape[0], "subsample_size")}
        for plate, (size, arg) in plates.items():
            sub_kwargs = {**kwargs, arg: 2}
            got = _subsampled_log_joint(model, args, sub_kwargs, plate, np.arange(size), z)
            assert got == pytest.approx(full, rel=1e-12, abs=1e-10), (model.__name__, plate)


def test_subsampled_random_effects_slices_data_and_scales(x64):
    """With B of G groups, the in-plate terms are those of the chosen groups times G / B."""
    G, M, K, B = 6, 3, 2, 2
    x, z = _random_effects_data(5, G, M, K)
    idx = np.array([4, 1])
    got = _subsampled_log_joint(
        models.random_effects,
        (x,),
        {"subsample_size": B},
        "groups",
        idx,
        {"mu": z["mu"], "mu_g": z["mu_g"][idx]},
    )
    lp_mu = scipy.stats.norm.logpdf(z["mu"], 0.0, 0.5).sum()
    lp_selected = _log_joint(models.random_effects, (x[idx],), {}, {"mu": z["mu"], "mu_g": z["mu_g"][idx]})
    assert got == pytest.approx(lp_mu + G / B * (lp_selected - lp_mu), rel=1e-12)


def test_subsampled_nested_slices_data_and_scales(x64):
    S, T, M, B = 5, 2, 3, 3
    x, z = _nested_data(6, S, T, M)
    idx = np.array([3, 0, 4])
    z_sub = {"mu": z["mu"], "mu_s": z["mu_s"][idx], "mu_st": z["mu_st"][idx]}
    got = _subsampled_log_joint(models.nested_three_level, (x,), {"subsample_size": B}, "subjects", idx, z_sub)
    lp_mu = scipy.stats.norm.logpdf(z["mu"], 0.0, 1.0)
    lp_selected = _log_joint(models.nested_three_level, (x[idx],), {}, z_sub)
    assert got == pytest.approx(lp_mu + S / B * (lp_selected - lp_mu), rel=1e-12)


def test_subsampled_crossed_rows_slice_data_and_scale(x64):
    R, C, B = 6, 4, 2
    y, z = _crossed_data(7, R, C)
    idx = np.array([5, 2])
    z_sub = {"r": z["r"][idx], "c": z["c"]}
    got = _subsampled_log_joint(models.crossed, (y,), {"subsample_size": B}, "rows", idx, z_sub)
    lp_c = scipy.stats.norm.logpdf(z["c"], 0.0, 1.0).sum()  # "c" is outside "rows": unscaled
    lp_selected = _log_joint(models.crossed, (y[idx],), {}, z_sub)
    assert got == pytest.approx(lp_c + R / B * (lp_selected - lp_c), rel=1e-12)


def test_subsampled_ragged_obs_slice_data_and_scale(x64):
    y, group, cov, z = _ragged_data(8, 4, 6)
    N, B = len(y), 3
    assert N >= 4  # the three indices below are distinct
    idx = np.array([N - 1, 0, N // 2])
    got = _subsampled_log_joint(
        models.ragged_groups, (y, group, cov), {"num_groups": 4, "subsample_size": B}, "obs", idx, z
    )
    norm = scipy.stats.norm
    lp_prior = (
        norm.logpdf(z["mu_a"], 0, 1.0)
        + norm.logpdf(z["mu_b"], 0, 1.0)
        + norm.logpdf(z["a"], z["mu_a"], 0.5).sum()
        + norm.logpdf(z["b"], z["mu_b"], 0.5).sum()
    )
    g = group[idx]
    lp_y = norm.logpdf(y[idx], z["a"][g] + z["b"][g] * cov[idx], 0.3).sum()
    assert got == pytest.approx(lp_prior + N / B * lp_y, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# Simulators and input checks
# ---------------------------------------------------------------------------------------------


def test_simulators_shapes_and_unequal_groups():
    key = jax.random.PRNGKey(0)
    x, z = models.simulate_random_effects(key, 3, 4, return_latents=True)
    assert x.shape == (3, 4, 2) and z["mu"].shape == (2,) and z["mu_g"].shape == (3, 1, 2)
    x, z = models.simulate_nested_three_level(key, 2, 3, 4, return_latents=True)
    assert x.shape == (2, 3, 4) and z["mu_s"].shape == (2, 1, 1) and z["mu_st"].shape == (2, 3, 1)
    y, z = models.simulate_crossed(key, 3, 5, return_latents=True)
    assert y.shape == (3, 5) and z["r"].shape == (3, 1) and z["c"].shape == (5,)
    y, group, cov = models.simulate_ragged_groups(key, 20, min_size=1, max_size=12)
    assert y.shape == group.shape == cov.shape
    sizes = np.bincount(np.asarray(group), minlength=20)
    assert sizes.min() >= 1 and sizes.max() <= 12 and len(set(sizes.tolist())) > 1
    assert not np.all(np.diff(np.asarray(group)) >= 0)  # shuffled, not sorted by group


def test_exact_input_checks():
    with pytest.raises(ValueError, match="group indices"):
        exact.ragged_groups_posterior(np.zeros(2), np.array([0, 3]), np.zeros(2), num_groups=3)
    with pytest.raises(ValueError, match=r"\(G, M, K\)"):
        exact.random_effects_posterior(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="noise_var"):
        exact.linear_gaussian_posterior(np.eye(2), np.zeros(2), np.eye(2), np.zeros(2), 0.0)
