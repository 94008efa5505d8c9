"""Compiled programs: the one-shot ones compiled cheaply (same values as ``jax.jit``, on every
path), and the data passed to them as inputs rather than constants, except where a model
reads it on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from numpyro_pavi import compiling


def _newton_sqrt(a):
    # a loop and a solve: the kinds of ops the set-up probes compile
    def body(c):
        i, x = c
        return i + 1, x - (x * x - a) / (2 * x)

    x = jax.lax.while_loop(lambda c: c[0] < 30, body, (0, jnp.ones_like(a)))[1]
    return x, jnp.linalg.cholesky(jnp.diag(x) + 1.0)


@pytest.mark.parametrize("small_data", [compiling.SMALL_DATA, 0])
def test_run_once_agrees_with_jit(monkeypatch, small_data):
    monkeypatch.setattr(compiling, "SMALL_DATA", small_data)
    a = jnp.linspace(0.5, 40.0, 7)
    got = compiling.run_once(_newton_sqrt, a)
    want = jax.jit(_newton_sqrt)(a)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    np.testing.assert_allclose(got[0], np.sqrt(np.asarray(a)), rtol=1e-6)


def test_run_once_under_an_outer_trace():
    out = jax.eval_shape(lambda a: compiling.run_once(_newton_sqrt, a)[1], jax.ShapeDtypeStruct((4,), jnp.float32))
    assert out.shape == (4, 4)
    np.testing.assert_allclose(jax.jit(lambda a: compiling.run_once(_newton_sqrt, a)[0])(jnp.full(3, 9.0)), 3.0, rtol=1e-6)


def _constants(text: str) -> list[str]:
    return [line for line in text.splitlines() if "constant" in line and "5000x" in line]


def test_array_leaves_make_the_data_inputs_of_a_program_not_its_constants():
    x = np.arange(5000.0, dtype=np.float32)
    tree = ((x, 3, None), {"flag": True, "y": jnp.ones(2)})
    data, rebuild = compiling.array_leaves(tree)
    assert [d.shape for d in data] == [(5000,), (2,)]
    (a, kw) = rebuild([2 * d for d in data])
    assert a[1] == 3 and a[2] is None and kw["flag"] is True
    np.testing.assert_array_equal(a[0], 2 * x)

    def total(args, kwargs):
        return jnp.sum(args[0] ** 2) * kwargs["y"]

    closed = jax.jit(lambda: total(*tree)).lower().as_text()
    passed = jax.jit(lambda d: total(*rebuild(d))).lower(data).as_text()
    assert _constants(closed), "the closed-over array should be a constant here (the test's premise)"
    assert not _constants(passed)
    np.testing.assert_allclose(jax.jit(lambda d: total(*rebuild(d)))(data), total(*tree))


def test_run_once_takes_the_arrays_it_closes_over_as_inputs():
    x = np.arange(5000.0, dtype=np.float32)

    def fun(a, b):
        return {"sum": jnp.sum(jnp.asarray(x) * a), "pair": (b, None)}

    program, inputs = compiling.hoisted(fun, 2.0, jnp.ones(3))
    assert not _constants(program.lower(*inputs).as_text())
    assert _constants(jax.jit(lambda: fun(2.0, jnp.ones(3))).lower().as_text())  # the premise
    got = compiling.run_once(fun, 2.0, jnp.ones(3))
    np.testing.assert_allclose(got["sum"], 2.0 * x.sum(), rtol=1e-6)
    assert got["pair"][1] is None
    np.testing.assert_array_equal(got["pair"][0], np.ones(3))


def test_run_once_under_vmap_over_the_data_it_closes_over():
    out = jax.vmap(lambda x: compiling.run_once(lambda a: a * x + 1.0, 2.0))(jnp.arange(3.0))
    np.testing.assert_allclose(out, [1.0, 3.0, 5.0])


def _host_read_model(g, y):
    # the number of groups read off the data on the host: the data cannot be traced
    num_groups = int(np.asarray(g).max()) + 1
    _groups_model(g, y, num_groups)


def _groups_model(g, y, num_groups):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", num_groups):
        u = numpyro.sample("u", dist.Normal(mu, 1.0))
    with numpyro.plate("obs", y.shape[0]):
        numpyro.sample("y", dist.Normal(u[g], 0.5), obs=y)


@pytest.mark.parametrize("host_read", [False, True])
def test_large_data_are_inputs_unless_the_model_reads_them_on_the_host(monkeypatch, host_read):
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_pavi import AutoPAVI, fit

    monkeypatch.setattr(compiling, "SMALL_DATA", 0)  # every data set counts as large
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(4), 3)
    y = rng.normal(size=12)  # float64 NumPy data: put on the device once
    model, args = (_host_read_model, (g, y)) if host_read else (_groups_model, (g, y, 4))
    seeded = numpyro.handlers.seed(model, 0)
    data, _ = compiling.as_inputs((args, {}), lambda rb, d: jax.eval_shape(lambda dd: seeded(*rb(dd)[0]), d))
    if host_read:
        assert data == []  # closed over: tracing them raised one of HOST_VALUE_ERRORS
    else:
        assert len(data) == 2 and all(isinstance(d, jax.Array) for d in data)  # g and y, on the device
    # what fit and the posterior programs got from as_inputs (imported there by name)
    import numpyro_pavi.checkpoint
    import numpyro_pavi.summaries

    got = []

    def spy(tree, check=None):
        out = compiling.as_inputs(tree, check)
        got.append(len(out[0]))
        return out

    monkeypatch.setattr(numpyro_pavi.checkpoint, "as_inputs", spy)
    monkeypatch.setattr(numpyro_pavi.summaries, "as_inputs", spy)
    guide = AutoPAVI(model)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
    result = fit(svi, jax.random.PRNGKey(0), 5, *args)
    ref = svi.run(jax.random.PRNGKey(0), 5, *args, progress_bar=True)
    np.testing.assert_allclose(result.losses, ref.losses, rtol=1e-5)
    moments = guide.posterior_moments(jax.random.PRNGKey(1), result.params, *args, num_samples=4, batch_size=2)
    summary = guide.posterior_summary(jax.random.PRNGKey(1), result.params, *args, num_samples=4, chunk_size=2)
    assert moments["u"]["mean"].shape == summary["u"]["mean"].shape == (4,)
    # fit, posterior_moments, posterior_summary (whose in-loop fallback closes them over)
    assert got == ([0, 0, 2] if host_read else [2, 2, 2])


def test_small_data_stay_closed_over_and_are_not_traced(monkeypatch):
    monkeypatch.setattr(compiling, "SMALL_DATA", 10)

    def untraced(rebuild, data):
        pytest.fail("small data should not be traced")

    data, rebuild = compiling.as_inputs(((np.ones(10), 3), {}), untraced)
    assert data == []
    assert rebuild([])[0][1] == 3
    data, rebuild = compiling.as_inputs(((np.ones(11), 3), {}), lambda rb, d: None)
    assert len(data) == 1 and rebuild(data)[0][1] == 3


def _glmm(x, y, host_read=False):
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    if host_read and float(tau) > 100.0:  # a latent read on the host: cannot be traced
        tau = tau + 1.0
    with numpyro.plate("g", x.shape[0], subsample_size=4) as idx:
        u = numpyro.sample("u", dist.Normal(0.0, tau))
        numpyro.sample("y", dist.Poisson(jnp.exp(b0 + u + x[idx])), obs=y[idx])


def _host_data(x, y, mask):
    # reads its data on the host (a plate size from a NumPy mask): traced as it is
    n = int(mask.sum())
    b0 = numpyro.sample("b0", dist.Normal(0.0, 2.0))
    with numpyro.plate("g", n):
        numpyro.sample("y", dist.Poisson(jnp.exp(b0 + x[mask])), obs=y[mask])


def test_compiled_init_values_of_a_model_that_reads_its_data_on_the_host():
    from numpyro.infer.initialization import init_to_median

    from numpyro_pavi import autoguide

    x, y = np.linspace(-1.0, 1.0, 5, dtype=np.float32), np.array([0.0, 1.0, 3.0, 2.0, 5.0], np.float32)
    got = autoguide._compiled_initial_values(_host_data, jax.random.PRNGKey(0), init_to_median, (x, y, x > -0.6), {})
    assert got is not None and sorted(got) == ["b0"]


@pytest.mark.parametrize("host_read", [False, True])
def test_setup_takes_the_init_strategys_values_from_one_compiled_trace(host_read):
    """The guide's set-up computes the init strategy's values (and their unconstrained images
    and log densities) in one compiled trace of the model, the eager trace's values up to
    float32 round-off (NumPy data indexed by a subsample included); a model that reads a
    latent on the host gets the eager trace as before."""
    from numpyro.infer.initialization import init_to_median

    from numpyro_pavi import AutoPAVI, autoguide
    from numpyro_pavi.structure import seeded_model

    x = np.linspace(-1.0, 1.0, 5, dtype=np.float32)
    y = np.array([0.0, 1.0, 3.0, 2.0, 5.0], np.float32)
    key = jax.random.PRNGKey(3)
    got = autoguide._compiled_initial_values(_glmm, key, init_to_median, (x, y, host_read), {})
    if host_read:
        assert got is None
    else:
        eager = numpyro.handlers.trace(seeded_model(_glmm, key, init=init_to_median)).get_trace(x, y)
        assert sorted(got) == ["b0", "tau", "u"]
        for name, (value, unconstrained, log_prob) in got.items():
            np.testing.assert_allclose(value, eager[name]["value"], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(log_prob, eager[name]["fn"].log_prob(eager[name]["value"]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["tau"][1], np.log(got["tau"][0]), rtol=1e-5)
    guide = AutoPAVI(lambda x, y: _glmm(x, y, host_read), laplace=False)
    with numpyro.handlers.seed(rng_seed=3):
        draws = guide(x, y)
    assert set(draws) == {"b0", "tau", "u"} and np.all(np.isfinite(draws["u"]))
    # an eager call checks its densities (the Delta sites are not validated), naming the site
    nan = {"u_auto_flow": jax.tree.map(lambda v: jnp.full_like(v, jnp.nan), guide.plan.init_values["u_auto_flow"])}
    with pytest.raises(ValueError, match="log density of site 'u' is not finite"):
        with numpyro.handlers.seed(rng_seed=4), numpyro.handlers.substitute(data=nan):
            guide(x, y)


def test_a_guide_set_up_under_jit_gives_the_eager_params():
    """``svi.init`` traced under ``jit`` (the guide's setup sees tracers: its packed flows
    are built from traced initial values) gives the params of an eager ``svi.init``, packed
    the same way, up to float32 round-off."""
    import optax
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_pavi import AutoPAVI

    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("groups", y.shape[0]):
            theta = numpyro.sample("theta", dist.Normal(mu, 0.5))
            numpyro.sample("y", dist.Normal(theta, 0.3), obs=y)

    y = jnp.linspace(-1.0, 1.0, 6)
    states = []
    for jitted in (True, False):
        svi = SVI(model, AutoPAVI(model, encoding="free"), optax.adam(5e-3), Trace_ELBO())
        init = jax.jit(lambda k, svi=svi: svi.init(k, y)) if jitted else (lambda k, svi=svi: svi.init(k, y))
        states.append(svi.get_params(init(jax.random.PRNGKey(0))))
    traced, eager = states
    assert jax.tree.structure(traced) == jax.tree.structure(eager)
    assert np.ndim(eager["theta_auto_flow"]) == 1
    for name in eager:
        np.testing.assert_allclose(traced[name], eager[name], rtol=1e-5, atol=1e-6)


def test_uses_linalg_finds_lapack_calls_inside_loops_and_branches():
    eye = jnp.eye(3)
    assert compiling.uses_linalg(jax.make_jaxpr(jnp.linalg.cholesky)(eye))
    in_map = jax.make_jaxpr(lambda x: jax.lax.map(lambda y: jax.scipy.linalg.solve_triangular(y, y[0]), x))
    assert compiling.uses_linalg(in_map(jnp.ones((2, 3, 3))))
    in_cond = jax.make_jaxpr(lambda x: jax.lax.cond(x[0, 0] > 0, lambda y: jnp.linalg.eigh(y)[0], lambda y: y[0], x))
    assert compiling.uses_linalg(in_cond(eye))
    assert not compiling.uses_linalg(jax.make_jaxpr(lambda x: jnp.sin(x) @ x)(eye))


def _chained_sum(a, b, c):
    # the shape of a guide's gradient with respect to a global: elementwise work, then a sum
    return jnp.sum(a * b / (c * c) - 1.0 / c)


def test_compiler_options_keep_reductions_out_of_ynnpack(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # the user's own choice is checked below
    compiling._compiler_options.cache_clear()
    options = compiling.compiler_options()
    args = [jnp.linspace(0.5, 1.5, 30_000) + i for i in range(3)]
    program = jax.jit(_chained_sum, compiler_options=options).lower(*args).compile()
    np.testing.assert_allclose(program(*args), jax.jit(_chained_sum)(*args), rtol=1e-5)
    if jax.default_backend() == "cpu" and compiling._accepted(compiling._YNN_PRODUCTS_ONLY):
        assert options == compiling._YNN_PRODUCTS_ONLY
        assert "__ynn_fusion" not in program.as_text()
        # the one-shot programs get them too
        assert compiling._YNN_PRODUCTS_ONLY.items() <= compiling._cheap_options().items()
        # a copy: editing it changes no later program's options
        options["xla_cpu_use_fusion_emitters"] = False
        assert compiling.compiler_options() == compiling._YNN_PRODUCTS_ONLY
    # a choice the user made in XLA_FLAGS stands
    compiling._compiler_options.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    try:
        assert compiling.compiler_options() == {}
    finally:
        monkeypatch.undo()
        compiling._compiler_options.cache_clear()
