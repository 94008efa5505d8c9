"""AutoPAVI's errors: every misuse must fail early with a message that names what is wrong."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples import models

SMALL = {"encoding_dim": 2, "hidden_dims": (4,)}


def _init(model, *args, **guide_kw):
    guide = AutoPAVI(model, **{**SMALL, **guide_kw})
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    return guide, svi, svi.init(jax.random.PRNGKey(0), *args)


def _data(G=6, M=2, K=2):
    return models.simulate_random_effects(jax.random.PRNGKey(0), G, M, K)


@pytest.fixture(scope="module")
def fitted():
    """A set-up guide on random_effects (G=6, M=2, K=2) with free encodings."""
    x = _data()
    guide, svi, state = _init(models.random_effects, x, encoding="free")
    return guide, svi, state, x


# ---------------------------------------------------------------------------------------------
# model errors found at setup
# ---------------------------------------------------------------------------------------------
def discrete_model():
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", 3):
        k = numpyro.sample("k", dist.Bernoulli(0.5))
        numpyro.sample("y", dist.Normal(mu + k, 1.0), obs=jnp.zeros(3))


def test_discrete_latent_site():
    with pytest.raises(ValueError, match=r"(?s)discrete sample site 'k'.*Bernoulli.*enumerat.*AutoGuideList"):
        _init(discrete_model)


def oversubsampled_model():
    with numpyro.plate("grp", 3, subsample_size=5):
        numpyro.sample("t", dist.Normal(0.0, 1.0))


def test_subsample_size_larger_than_plate():
    with pytest.raises(ValueError, match=r"(?s)'grp'.*subsample_size=5.*3"):
        _init(oversubsampled_model)


def inconsistent_size_model():
    with numpyro.plate("g", 3):
        numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", 4):
        numpyro.sample("b", dist.Normal(0.0, 1.0))


def inconsistent_dim_model():
    with numpyro.plate("g", 3, dim=-1):
        numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", 3, dim=-2):
        numpyro.sample("b", dist.Normal(0.0, 1.0))


@pytest.mark.parametrize("model", [inconsistent_size_model, inconsistent_dim_model])
def test_plate_with_inconsistent_sizes_or_dims(model):
    with pytest.raises(ValueError, match=r"Plate 'g' is inconsistent"):
        _init(model)


def no_latent_model():
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=1.0)


def test_model_without_latent_sites():
    with pytest.raises(ValueError, match="no latent"):
        _init(no_latent_model)


def global_data_model():
    with numpyro.plate("g", 3):
        numpyro.sample("t", dist.Normal(0.0, 1.0))
    numpyro.sample("y", dist.Normal(0.0, 1.0), obs=1.0)


def test_set_encoding_without_data_in_plate():
    with pytest.raises(ValueError, match=r"(?s)encoding='set'.*\bg\b.*no observed site.*laplace=True"):
        _init(global_data_model, encoding="set", laplace=False)
    # with Laplace bases the base informs each element: no encoding, no parameter per element
    guide, svi, state = _init(global_data_model, encoding="set")
    assert guide.plan.no_encoding == {("g",)} and not any("g_auto" in k for k in svi.get_params(state))


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"encoding": "bogus"}, r"Unknown encoding 'bogus'"),
        ({"flow_type": "bogus"}, r"Unknown flow_type 'bogus'"),
        ({"encoding_dim": 0}, r"encoding_dim must be a positive int"),
        ({"encoding_dim": 2.0}, r"encoding_dim must be a positive int"),
        ({"encoding_dim": True}, r"encoding_dim must be a positive int"),
        ({"init_scale": -1}, r"init_scale must be a positive finite number"),
        ({"init_scale": float("nan")}, r"init_scale must be a positive finite number"),
        ({"init_scale": float("inf")}, r"init_scale must be a positive finite number"),
        ({"init_scale": "0.1"}, r"init_scale must be a positive finite number"),
        ({"hidden_dims": 32}, r"hidden_dims must be a tuple of positive ints"),
        ({"hidden_dims": (0,)}, r"hidden_dims must be a tuple of positive ints"),
        ({"num_flows": -1}, r"num_flows must be a non-negative int"),
        ({"flow_layers": -1}, r"num_flows must be a non-negative int"),  # the old name, mapped
        ({"chunk_size": 0}, r"chunk_size must be a positive int"),
    ],
)
def test_invalid_options(kwargs, match):
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        AutoPAVI(models.random_effects, **kwargs)


def test_numpy_ints_are_options():
    guide = AutoPAVI(models.random_effects, encoding_dim=np.int64(4), num_flows=np.int32(1), hidden_dims=[np.int64(8)])
    assert guide.options.encoding_dim == 4 and guide.options.hidden_dims == (8,)


def test_plates_of_one_name_must_agree():
    """NumPyro's trace keeps one plate statement per name: a plate of 10 for a site and one
    of 20 (subsampled) for its data would train with indices past the site's elements."""

    def model(y):
        with numpyro.plate("N", 10):
            numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("N", 20, subsample_size=10) as idx:
            numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match=r"Plate 'N' is inconsistent: declared with 10 elements and again with 20"):
        numpyro.handlers.seed(AutoPAVI(model), 0)(jnp.ones(20))


@pytest.mark.parametrize(
    "idx, match",
    [([1, 5, 17], r"Plate 'N' got subsample indices \[1, 5, 17\] outside its 10 elements"),
     ([1, 5, 5], r"Plate 'N' holds latent site 'a' but got repeated subsample indices \[1, 5, 5\]")],
)  # fmt: skip
def test_user_subsample_indices_must_be_elements(idx, match):
    def model(y, idx):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.handlers.substitute(data={"N": idx}):
            plate = numpyro.plate("N", 10, subsample_size=idx.shape[0])
        with plate:
            a = numpyro.sample("a", dist.Normal(mu, 1.0))
            numpyro.sample("y", dist.Normal(a, 1.0), obs=y[idx])

    with pytest.raises(ValueError, match=match):
        numpyro.handlers.seed(AutoPAVI(model), 0)(jnp.ones(10), jnp.array(idx))


def test_rows_drawn_with_replacement_are_legal():
    """Repeated indices on a plate of observations only (rows drawn with replacement)."""

    def model(y, idx):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.handlers.substitute(data={"rows": idx}):
            plate = numpyro.plate("rows", 10, subsample_size=idx.shape[0])
        with plate:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    numpyro.handlers.seed(AutoPAVI(model), 0)(jnp.ones(10), jnp.array([1, 1, 3]))


def test_check_params_wants_a_dict():
    guide = AutoPAVI(models.random_effects)
    numpyro.handlers.seed(guide, 0)(jnp.ones((4, 3, 2)))
    with pytest.raises(ValueError, match="params must be a dict"):
        guide.check_params(None)


def test_subsample_size_zero_names_the_plate():
    with pytest.raises(ValueError, match=r"Plate 'groups' has subsample_size=0"):
        numpyro.handlers.seed(AutoPAVI(models.random_effects), 0)(jnp.ones((4, 3, 2)), subsample_size=0)


def test_renamed_options_warn_and_still_work():
    """The options' names before 0.3 map to NumPyro's names, with a FutureWarning each."""
    with pytest.warns(FutureWarning, match=r"flow_layers=\.\.\.\) is deprecated.*num_flows"):
        guide = AutoPAVI(models.random_effects, flow_layers=2, flow_layer="coupling", hidden=(4,))
    assert (guide.num_flows, guide.flow_type, guide.hidden_dims) == (2, "coupling", (4,))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['num_flow'\]"):
        AutoPAVI(models.random_effects, num_flow=2)


# ---------------------------------------------------------------------------------------------
# misuse after setup
# ---------------------------------------------------------------------------------------------
def test_latent_event_shape_change_at_update(fitted):
    _guide, svi, state, _ = fitted
    with pytest.raises(ValueError, match=r"Latent site 'mu' changed shape"):
        svi.update(state, _data(K=3))


def test_plate_size_change_at_update(fitted):
    _guide, svi, state, _ = fitted
    with pytest.raises(ValueError, match=r"mu_g|groups"):
        svi.update(state, _data(G=8))


def test_latent_event_shape_change_at_sample_posterior(fitted):
    guide, svi, state, _ = fitted
    with pytest.raises(ValueError, match=r"'mu'"):
        guide.sample_posterior(jax.random.PRNGKey(0), svi.get_params(state), _data(K=3))


def test_new_plate_size_at_sample_posterior_with_free_encodings(fitted):
    guide, svi, state, _ = fitted
    with pytest.raises(ValueError, match=r"Plate 'groups' has 8 elements here but 6"):
        guide.sample_posterior(jax.random.PRNGKey(0), svi.get_params(state), _data(G=8))


@pytest.mark.parametrize("method", ["sample_posterior", "median", "quantiles"])
def test_sampling_before_setup(method, fitted):
    _guide, svi, state, x = fitted
    fresh = AutoPAVI(models.random_effects, **SMALL)
    params = svi.get_params(state)
    call = {
        "sample_posterior": lambda: fresh.sample_posterior(jax.random.PRNGKey(0), params, x),
        "median": lambda: fresh.median(params, x),
        "quantiles": lambda: fresh.quantiles(params, [0.1, 0.9], x),
    }[method]
    with pytest.raises(RuntimeError, match="not set up"):
        call()
    assert "not set up" in fresh.describe()


def test_unseeded_guide_call_before_setup():
    guide = AutoPAVI(models.random_effects, **SMALL)
    with pytest.raises(RuntimeError, match="seed"):
        guide(_data())


def test_unseeded_guide_call_after_setup(fitted):
    guide, svi, state, x = fitted
    with pytest.raises(RuntimeError, match="seed"):
        handlers.substitute(guide, data=svi.get_params(state))(x)


def test_params_of_another_guide(fitted):
    guide, svi, state, x = fitted
    normal = AutoNormal(models.random_effects)
    other = SVI(models.random_effects, normal, optax.adam(1e-2), Trace_ELBO())
    params = other.get_params(other.init(jax.random.PRNGKey(0), x))
    with pytest.raises(ValueError, match=r"params lack \['mu_auto_flow'"):
        guide.sample_posterior(jax.random.PRNGKey(0), params, x)
    # AutoPAVI params under another prefix are not this guide's either
    renamed = {k.replace("_auto_", "_foo_"): v for k, v in svi.get_params(state).items()}
    with pytest.raises(ValueError, match=r"params lack"):
        guide.sample_posterior(jax.random.PRNGKey(0), renamed, x)


def test_params_with_wrong_shapes(fitted):
    guide, svi, state, x = fitted
    params = dict(svi.get_params(state))
    params["groups_auto_encoding"] = jnp.zeros((6, 3))
    with pytest.raises(ValueError, match=r"groups_auto_encoding"):
        guide.sample_posterior(jax.random.PRNGKey(0), params, x)


def test_fitted_fixture_is_usable(fitted):
    """The misuse tests above share this guide: check it is a working one."""
    guide, svi, state, x = fitted
    samples = guide.sample_posterior(jax.random.PRNGKey(0), svi.get_params(state), x)
    assert samples["mu_g"].shape == (6, 1, 2)
    assert np.all(np.isfinite(samples["mu_g"]))


def test_wrong_types_for_encoder_and_ragged():
    with pytest.raises(TypeError, match="encoder must be a numpyro_pavi.SetEncoder"):
        AutoPAVI(models.random_effects, encoder="deep_sets")
    with pytest.raises(TypeError, match=r"ragged\['groups'\] must be numpyro_pavi.Ragged"):
        AutoPAVI(models.ragged_groups, ragged={"groups": "group"})


# ---------------------------------------------------------------------------------------------
# posterior-method arguments and missing data
# ---------------------------------------------------------------------------------------------
def test_swapped_key_and_params(fitted):
    guide, svi, state, x = fitted
    with pytest.raises(TypeError, match="swapped"):
        guide.sample_posterior(svi.get_params(state), jax.random.PRNGKey(0), x)


def test_empty_sample_shape_gives_empty_draws(fitted):
    guide, svi, state, x = fitted
    params = svi.get_params(state)
    full = guide.sample_posterior(jax.random.PRNGKey(0), params, x, sample_shape=(2,))
    empty = guide.sample_posterior(jax.random.PRNGKey(0), params, x, sample_shape=(0,))
    assert set(empty) == set(full)
    for name in full:
        assert empty[name].shape == (0,) + full[name].shape[1:] and empty[name].dtype == full[name].dtype
    with pytest.raises(ValueError, match="sample_shape"):
        guide.sample_posterior(jax.random.PRNGKey(0), params, x, sample_shape=(-1,))


@pytest.mark.parametrize("call", ["median0", "q>1", "q_empty"])
def test_invalid_quantile_arguments(fitted, call):
    guide, svi, state, x = fitted
    params = svi.get_params(state)
    with pytest.raises(ValueError, match="num_samples" if call == "median0" else "quantiles"):
        if call == "median0":
            guide.median(params, x, num_samples=0)
        else:
            guide.quantiles(params, [1.5] if call == "q>1" else [], x)


def test_nan_in_observed_data_names_the_site():
    x = _data().at[1, 0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match=r"(?s)'x' holds 1 NaN.*obs_mask"):
        _init(models.random_effects, x, encoding="free")


def masked_model(x, mask):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    with numpyro.plate("obs", x.shape[0]):
        numpyro.sample("x", dist.Normal(mu, 1.0), obs=x, obs_mask=mask)


def test_nan_in_masked_cells_is_allowed():
    x = jnp.array([0.5, jnp.nan, 1.5, jnp.nan])
    mask = jnp.isfinite(x)
    guide = AutoPAVI(masked_model, encoding="free", **SMALL)
    svi = SVI(masked_model, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x, mask)
    assert np.isfinite(float(svi.evaluate(state, x, mask)))


def test_free_encodings_with_other_data_raise(fitted):
    guide, svi, state, x = fitted
    params = svi.get_params(state)
    # the training data, even as float64 NumPy, is fine
    guide.sample_posterior(jax.random.PRNGKey(0), params, np.asarray(x, np.float64), sample_shape=(2,))
    with pytest.raises(ValueError, match=r"(?s)'x' holds other values.*free.*encoding='set'"):
        guide.sample_posterior(jax.random.PRNGKey(0), params, x + 1.0, sample_shape=(2,))
