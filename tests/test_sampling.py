"""``sampling.sample_latents`` is a pure function of (plan, params, key, elements): it changes
nothing, and an element's draw depends on its own key and data only, not on which other
elements are drawn with it or on the chunking."""

from __future__ import annotations

import dataclasses
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import models
from numpyro_pavi.encoders import SetEncoder
from numpyro_pavi.plan import GuidePlan, build_plan, scales_first, with_encoder_width
from numpyro_pavi.sampling import sample_latents
from numpyro_pavi.structure import model_structure

G, M, K = 7, 2, 2
X = models.simulate_random_effects(jax.random.PRNGKey(0), G, M, K)


@pytest.fixture(scope="module")
def free_guide():
    """Free encodings, no Laplace bases: no site reads the model's data."""
    guide = AutoPAVI(models.random_effects, encoding="free", laplace=False, encoding_dim=2, hidden_dims=(4,))
    handlers.seed(guide, 0)(X)
    # non-zero encodings: elements must differ for the checks below to mean anything
    params = dict(guide.plan.init_values)
    params["groups_auto_encoding"] = jax.random.normal(jax.random.PRNGKey(1), (G, 2))
    return guide, params


def _draw(plan, params, key, groups, **kw):
    indices = {"groups": jnp.asarray(groups), "obs": jnp.arange(M)}
    sizes = {"groups": G, "obs": M}
    return sample_latents(plan, params, key, indices, None, sizes, {}, element_keys=True, **kw)


def test_sample_latents_is_pure(free_guide):
    guide, params = free_guide
    before = jax.tree.map(np.asarray, params)
    a = _draw(guide.plan, params, jax.random.PRNGKey(3), np.arange(G))
    b = _draw(guide.plan, params, jax.random.PRNGKey(3), np.arange(G))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(params)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(dataclasses.FrozenInstanceError):
        guide.plan.flows = {}


def test_an_elements_draw_does_not_depend_on_the_others(free_guide):
    guide, params = free_guide
    key = jax.random.PRNGKey(4)
    full_values, _, full_logq = _draw(guide.plan, params, key, np.arange(G))
    some = np.array([5, 2])
    values, _, logq = _draw(guide.plan, params, key, some)
    np.testing.assert_allclose(values["mu"], full_values["mu"], rtol=1e-6)
    np.testing.assert_allclose(values["mu_g"], full_values["mu_g"][some], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logq["mu_g"], full_logq["mu_g"][some], rtol=1e-5, atol=1e-5)
    # and the elements do differ (the check above is not vacuous)
    assert not np.allclose(full_values["mu_g"][2], full_values["mu_g"][5])


def test_chunking_does_not_change_the_draws(free_guide):
    guide, params = free_guide
    key = jax.random.PRNGKey(5)
    whole = _draw(guide.plan, params, key, np.arange(G))
    chunked = _draw(guide.plan, params, key, np.arange(G), chunk_size=3)
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _recording_map(monkeypatch) -> list:
    """Record the ``batch_size`` of every ``jax.lax.map`` call (None: one at a time)."""
    sizes, original = [], jax.lax.map

    def recording(f, xs, *, batch_size=None):
        sizes.append(batch_size)
        return original(f, xs, batch_size=batch_size)

    monkeypatch.setattr(jax.lax, "map", recording)
    return sizes


def test_small_draws_run_several_at_once_with_the_same_values(free_guide, monkeypatch):
    """A draw that solves no Newton problem is vectorized with others (draw_batch: a divisor
    of the number of draws, within chunk_size values); each equals its own draw alone."""
    guide, params = free_guide
    sizes = {"groups": G, "obs": M}
    assert guide.draw_batch(sizes, 6) == 6
    assert guide.draw_batch(sizes, 7) == 7
    assert guide.draw_batch({"groups": 10**5, "obs": M}, 6) == 1  # past chunk_size values: one at a time
    key = jax.random.PRNGKey(6)
    recorded = _recording_map(monkeypatch)
    batched = guide.sample_posterior(key, params, X, sample_shape=(6,))
    assert 6 in recorded
    one = guide.full_plate_sampler(params, X)
    alone = [one(k) for k in jax.random.split(key, 6)]
    for name in ("mu", "mu_g"):
        np.testing.assert_allclose(batched[name], np.stack([a[name] for a in alone]), rtol=1e-5, atol=1e-6)


def test_gaussian_laplace_draws_run_several_at_once(monkeypatch):
    """A Laplace base quadratic in its site (one Newton step, closed forms up to 2 x 2) is
    vectorized across draws too, with the same values, where the model's own operations
    hold no LAPACK call (read from a draw's jaxpr); an iterated base is not."""
    guide = AutoPAVI(models.random_effects, encoding="free", encoding_dim=2, hidden_dims=(4,))
    handlers.seed(guide, 0)(X)
    assert guide.plan.quadratic == {"mu_g"}
    sizes = {"groups": G, "obs": M}
    params = guide.plan.init_values
    one = guide.full_plate_sampler(params, X)
    assert guide.draw_batch(sizes, 4, sampler=one) == 4
    assert guide.draw_batch(sizes, 4) == 1  # passes through the model: not without its jaxpr
    assert guide.draw_batch(sizes, 4, sampler=lambda k: jnp.linalg.cholesky(jnp.eye(2) + k[0])) == 1
    key = jax.random.PRNGKey(8)
    recorded = _recording_map(monkeypatch)
    batched = guide.sample_posterior(key, params, X, sample_shape=(4,))
    assert 4 in recorded
    alone = [one(k) for k in jax.random.split(key, 4)]
    for name in ("mu", "mu_g"):
        np.testing.assert_allclose(batched[name], np.stack([a[name] for a in alone]), rtol=1e-5, atol=1e-5)
    quadratic = guide.plan
    guide.plan = dataclasses.replace(quadratic, quadratic=frozenset())  # as if Newton iterated
    try:
        assert guide.draw_batch(sizes, 4, sampler=one) == 1
    finally:
        guide.plan = quadratic


def test_build_plan_is_deterministic_and_names_params_as_numpyro(free_guide):
    guide, _ = free_guide
    plan = guide.plan

    def build():
        locs = _init_locs(plan, guide)
        return build_plan(
            plan.model, plan.structure, plan.options, guide.prototype_trace, locs, jax.random.PRNGKey(9), (X,)
        )

    again, other = build(), build()
    assert isinstance(again, GuidePlan)
    for x, y in zip(jax.tree.leaves(dict(again.init_values)), jax.tree.leaves(dict(other.init_values))):
        np.testing.assert_array_equal(x, y)
    assert set(plan.init_values) == {"mu_auto_flow", "mu_g_auto_flow", "groups_auto_encoding"}
    assert plan.sources == {("groups",): ()} and not plan.reads_data()
    assert "encoding: free" in plan.describe() and f"groups[{G}]" in plan.describe()


def _init_locs(plan, guide):
    from numpyro.distributions.transforms import biject_to

    trace = guide.prototype_trace
    return {n: biject_to(s.support).inv(trace[n]["value"]) for n, s in plan.structure.latent.items()}


def test_set_encoder_width_is_the_encoding_dim():
    assert with_encoder_width(SetEncoder(), 4).out_dim == 4
    with pytest.raises(ValueError, match=r"SetEncoder\(out_dim=6\) disagrees with encoding_dim=4"):
        with_encoder_width(SetEncoder(out_dim=6), 4)


def test_scales_are_drawn_before_the_locations_beside_them():
    """The leading globals are reordered scales first (a vector sd, an LKJ factor, an sd on
    a flat prior; not a probability), each conditioned on every global drawn before it; a
    global after the first local site keeps its place (a local's base may read what was
    drawn before it)."""

    def model():
        b0 = numpyro.sample("b0", dist.Normal(0.0, 1.0))
        sd = numpyro.sample("sd", dist.HalfNormal(jnp.ones(2)).to_event(1))
        beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
        corr = numpyro.sample("corr", dist.LKJCholesky(2, 1.0))
        prob = numpyro.sample("prob", dist.Beta(2.0, 2.0))  # a probability, not a scale
        width = numpyro.sample("width", dist.Uniform(0.0, 10.0))  # an sd with a flat prior
        with numpyro.plate("g", 3):
            u = numpyro.sample("u", dist.MultivariateNormal(b0 + beta, scale_tril=sd[:, None] * corr))
            numpyro.sample("y", dist.Normal(u[:, 0] * prob, width), obs=np.zeros(3))
        numpyro.sample("late", dist.HalfNormal(1.0))

    structure = model_structure(handlers.trace(handlers.seed(model, 0)).get_trace())
    latent = scales_first(structure).latent
    assert list(latent) == ["sd", "corr", "width", "b0", "beta", "prob", "u", "late"]
    given = [latent[n].conditions_on for n in ["sd", "corr", "width", "b0"]]
    assert given == [(), ("sd",), ("sd", "corr"), ("sd", "corr", "width")]
    for name in ["u", "late"]:
        assert latent[name] == structure.latent[name]
    assert scales_first(scales_first(structure)) == scales_first(structure)


def _schools(y):
    """Eight schools' shape, the location written before its scale (module level: pickled)."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(5.0))
    with numpyro.plate("schools", y.shape[0]):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_a_pickled_guide_keeps_its_order_and_draws():
    """A guide's order (scales first) is part of its plan: a pickled guide comes back with
    the same order, params and draws, without tracing the model again."""
    y = jnp.arange(4.0)
    guide = AutoPAVI(_schools, laplace=False, encoding_dim=2, hidden_dims=(4,))
    handlers.seed(guide, 0)(y)
    params = jax.tree.map(lambda v: v + 0.1, dict(guide.plan.init_values))
    before = guide.sample_posterior(jax.random.PRNGKey(1), params, y, sample_shape=(3,))
    loaded = pickle.loads(pickle.dumps(guide))
    assert list(loaded.plan.structure.latent) == ["tau", "mu", "theta"]
    assert loaded.plan.structure.latent["mu"].conditions_on == ("tau",)
    assert set(loaded.plan.init_values) == set(guide.plan.init_values)
    after = loaded.sample_posterior(jax.random.PRNGKey(1), params, y, sample_shape=(3,))
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6, atol=1e-6)
