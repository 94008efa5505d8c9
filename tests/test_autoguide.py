"""AutoPAVI as a NumPyro autoguide: param names, subsampling, jit/run/Predictive/AutoGuideList,
pickling, chunked sampling, introspection, quantiles and the non-mean-field structure.

Two module-level guides are shared (JAX compilation dominates the cost):

* ``fitted``: ``models.random_effects`` (G=10, M=2, K=2), free encodings, default prefix,
  set up with ``subsample_size=4`` and trained with ``svi.run``;
* ``guide_list``: an ``AutoGuideList`` of AutoPAVI (prefix ``"foo"``, default encoding) on
  ``random_effects`` and an AutoNormal on an extra global site.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoGuideList, AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import models

G, M, K, B, D = 10, 2, 2, 4, 2
X = models.simulate_random_effects(jax.random.PRNGKey(0), G, M, K)
SMALL = {"encoding_dim": D, "hidden_dims": (4,)}


@pytest.fixture(scope="module")
def fitted():
    guide = AutoPAVI(models.random_effects, encoding="free", **SMALL)
    svi = SVI(models.random_effects, guide, optax.adam(1e-2), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(0), 10, X, subsample_size=B, progress_bar=False)
    return guide, svi, result


def _tree_size(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


# ---------------------------------------------------------------------------------------------
# param names
# ---------------------------------------------------------------------------------------------
def test_param_names_follow_numpyro_conventions(fitted):
    _guide, _, result = fitted
    params = result.params
    assert set(params) == {"mu_auto_flow", "mu_g_auto_flow", "groups_auto_encoding"}
    # one encoding per element of the *full* plate, even though the model is subsampled
    assert params["groups_auto_encoding"].shape == (G, D)
    assert _tree_size(params["mu_g_auto_flow"]) > 0


def test_flows_are_stored_packed_one_vector_per_param(fitted):
    """A flow's layers are one vector in the param store (a step's state then has a few
    leaves per site, as AutoNormal's): ``plan.unpack`` gives them back as the flow's
    pytree, exactly, and the posterior methods take either form."""
    guide, _, result = fitted
    params = result.params
    flow = params["mu_g_auto_flow"]
    assert flow.ndim == 1 and flow.shape[0] == _tree_size(guide.plan.init_values["mu_g_auto_flow"])
    unpacked = guide.plan.unpack(params)
    assert jax.tree.structure(unpacked["mu_g_auto_flow"]) == jax.tree.structure(guide.plan.init_values["mu_g_auto_flow"])
    np.testing.assert_array_equal(np.concatenate([np.ravel(v) for v in jax.tree.leaves(unpacked["mu_g_auto_flow"])]), flow)
    assert guide.plan.unpack(unpacked)["mu_g_auto_flow"] is unpacked["mu_g_auto_flow"]
    key = jax.random.PRNGKey(3)
    a, b = (guide.sample_posterior(key, p, X, sample_shape=(4,)) for p in (params, unpacked))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# ---------------------------------------------------------------------------------------------
# subsampling
# ---------------------------------------------------------------------------------------------
def test_guide_and_model_share_subsample_indices(fitted):
    guide, _, result = fitted
    seeded = handlers.seed(handlers.substitute(guide, data=result.params), 3)
    guide_tr = handlers.trace(seeded).get_trace(X, subsample_size=B)
    model = handlers.replay(handlers.seed(models.random_effects, 4), guide_tr)
    model_tr = handlers.trace(model).get_trace(X, subsample_size=B)
    idx = np.asarray(guide_tr["groups"]["value"])
    assert idx.shape == (B,) and len(set(idx.tolist())) == B and idx.max() < G
    np.testing.assert_array_equal(np.asarray(model_tr["groups"]["value"]), idx)
    assert guide_tr["mu_g"]["value"].shape == (B, 1, K)
    # the model scores the guide's values on the guide's groups
    np.testing.assert_array_equal(model_tr["mu_g"]["value"], guide_tr["mu_g"]["value"])
    np.testing.assert_array_equal(model_tr["x"]["value"], X[idx])
    # both are scaled by G / B
    assert guide_tr["mu_g"]["scale"] == pytest.approx(G / B)
    assert model_tr["x"]["scale"] == pytest.approx(G / B)


def test_jit_update_with_other_subsample_size(fitted):
    """Set up with B=4, update under jit with B=8 on the same state."""
    _, svi, result = fitted
    update = jax.jit(lambda state: svi.update(state, X, subsample_size=8))
    state, loss = update(result.state)
    assert np.isfinite(float(loss))
    state, loss2 = update(state)
    assert np.isfinite(float(loss2))
    changed = jax.tree.map(lambda a, b: not np.allclose(a, b), svi.get_params(state), result.params)
    assert any(jax.tree.leaves(changed))


def test_svi_run_losses_finite(fitted):
    _, _, result = fitted
    losses = np.asarray(result.losses)
    assert losses.shape == (10,) and np.all(np.isfinite(losses))


def test_sample_posterior_on_subsampled_model_is_quiet(fitted):
    guide, _, result = fitted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        guide.sample_posterior(jax.random.PRNGKey(1), result.params, X, subsample_size=B)


# ---------------------------------------------------------------------------------------------
# sample_posterior: shapes, pickling, chunking
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def posterior(fitted):
    guide, _, result = fitted
    return guide.sample_posterior(jax.random.PRNGKey(7), result.params, X, sample_shape=(3,))


def test_sample_posterior_full_plate_shapes(posterior):
    assert set(posterior) == {"mu", "mu_g"}
    assert posterior["mu"].shape == (3, K)
    assert posterior["mu_g"].shape == (3, G, 1, K)
    assert np.all(np.isfinite(posterior["mu_g"]))
    # samples differ across draws and across groups
    assert not np.allclose(posterior["mu_g"][0], posterior["mu_g"][1])
    assert not np.allclose(posterior["mu_g"][:, 0], posterior["mu_g"][:, 1])


def test_pickle_round_trip(fitted, posterior):
    guide, _, result = fitted
    loaded = pickle.loads(pickle.dumps(guide))
    again = loaded.sample_posterior(jax.random.PRNGKey(7), result.params, X, sample_shape=(3,))
    assert set(again) == set(posterior)
    for name in posterior:
        np.testing.assert_allclose(again[name], posterior[name], rtol=1e-6, atol=1e-6)


def test_chunked_sampling_matches_unchunked(fitted, posterior):
    guide, _, result = fitted
    assert guide.chunk_size >= G
    chunked = copy.copy(guide)
    chunked.chunk_size = 3  # 10 groups: chunks of 3, 3, 3 and a remainder of 1
    out = chunked.sample_posterior(jax.random.PRNGKey(7), result.params, X, sample_shape=(3,))
    for name in posterior:
        np.testing.assert_allclose(out[name], posterior[name], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Predictive
# ---------------------------------------------------------------------------------------------
def test_predictive_returns_latents_and_observed(fitted):
    guide, _, result = fitted
    predictive = Predictive(
        models.random_effects, guide=guide, params=result.params, num_samples=5, return_sites=["mu", "mu_g", "x"]
    )
    out = predictive(jax.random.PRNGKey(2), X)
    assert out["mu"].shape == (5, K)
    assert out["mu_g"].shape == (5, G, 1, K)
    assert out["x"].shape == (5, G, M, K)
    assert all(np.all(np.isfinite(v)) for v in out.values())
    # the observed site is the data, since Predictive conditions on it
    np.testing.assert_allclose(out["x"][0], X)


# ---------------------------------------------------------------------------------------------
# introspection, quantiles, structure
# ---------------------------------------------------------------------------------------------
def test_describe_and_num_params(fitted):
    guide, _, result = fitted
    text = guide.describe()
    for name in ("mu", "mu_g", "groups"):
        assert name in text
    assert guide.num_params() == _tree_size(result.params)
    assert str(guide.num_params()) in text


def test_median_and_quantiles(fitted):
    guide, _, result = fitted
    key = jax.random.PRNGKey(5)
    q = guide.quantiles(result.params, [0.1, 0.5, 0.9], X, num_samples=64, rng_key=key)
    med = guide.median(result.params, X, num_samples=64, rng_key=key)
    assert set(q) == set(med) == {"mu", "mu_g"}
    assert q["mu"].shape == (3, K) and med["mu"].shape == (K,)
    assert q["mu_g"].shape == (3, G, 1, K) and med["mu_g"].shape == (G, 1, K)
    for name in q:
        assert np.all(q[name][0] <= med[name]) and np.all(med[name] <= q[name][2])
        assert np.all(q[name][0] < q[name][2])
        # same key and sample count: the median is the 0.5 quantile
        np.testing.assert_allclose(med[name], q[name][1], rtol=1e-6, atol=1e-6)


def test_guide_is_not_mean_field(fitted):
    guide, _, _ = fitted
    assert guide.structure.latent["mu_g"].conditions_on == ("mu",)
    assert guide.structure.latent["mu"].conditions_on == ()
    # mu_g's flow is conditioned on its element's encoding and on the sampled mu
    assert guide.plan.flows["mu_g"].context_dim == D + K
    assert guide.plan.flows["mu"].context_dim == 0  # a global without parents: no context


# ---------------------------------------------------------------------------------------------
# AutoGuideList and prefix
# ---------------------------------------------------------------------------------------------
def model_with_tau(x):
    models.random_effects(x)
    numpyro.sample("tau", dist.HalfNormal(1.0))


@pytest.fixture(scope="module")
def guide_list():
    guides = AutoGuideList(model_with_tau)
    guides.append(AutoPAVI(handlers.block(model_with_tau, hide=["tau"]), prefix="foo", **SMALL))
    guides.append(AutoNormal(handlers.block(model_with_tau, expose=["tau"])))
    svi = SVI(model_with_tau, guides, optax.adam(1e-2), Trace_ELBO())
    return guides, svi.run(jax.random.PRNGKey(0), 5, X, progress_bar=False)


def test_prefix_changes_param_names(guide_list):
    _, result = guide_list
    pavi = {k for k in result.params if "_foo_" in k}
    assert {"mu_foo_flow", "mu_g_foo_flow"} <= pavi
    assert not any(k.startswith(("mu_auto", "mu_g_auto", "groups_auto")) for k in result.params)
    # the AutoNormal keeps its own prefix for tau
    assert set(result.params) - pavi == {"tau_auto_loc", "tau_auto_scale"}


def test_inside_auto_guide_list(guide_list):
    guides, result = guide_list
    assert np.all(np.isfinite(np.asarray(result.losses)))
    samples = guides.sample_posterior(jax.random.PRNGKey(1), result.params, X, sample_shape=(3,))
    assert samples["mu"].shape == (3, K)
    assert samples["mu_g"].shape == (3, G, 1, K)
    assert samples["tau"].shape == (3,)
    assert np.all(samples["tau"] > 0)


_INIT_SCRIPT = """
import hashlib, jax, numpy as np, numpyro
from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.models import crossed
y = np.arange(12.0).reshape(4, 3) / 10
guide = AutoPAVI(crossed, laplace=False)
numpyro.handlers.seed(guide, 0)(y)
leaves = jax.tree_util.tree_leaves_with_path(dict(guide.plan.init_values))
digest = hashlib.sha256(b"".join(str(p).encode() + np.asarray(v).tobytes() for p, v in leaves)).hexdigest()
print(list(guide.plan.sources), digest)
"""


@pytest.mark.slow  # two interpreters
def test_initial_parameters_do_not_depend_on_the_hash_seed():
    """Two plate sets of one size (crossed rows and cols) get their encoders in model order,
    not in a set's order: the same key gives the same guide in every interpreter (and every
    process of a multi-process run)."""
    import subprocess
    import sys

    outs = []
    for seed in ("1", "2"):  # two seeds that ordered a set of (rows,), (cols,) both ways
        env = {**__import__("os").environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"}
        proc = subprocess.run(
            [sys.executable, "-c", _INIT_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(proc.stdout.strip().splitlines()[-1])
    assert outs[0].startswith("[('rows',), ('cols',)]")
    assert len(set(outs)) == 1, outs
