"""A fit that reaches its optimum stays there: the fast subset of ``benchmarks/stress.py``.

Constant-rate Adam on models where 0.1's flows left the optimum (the crossed Bernoulli GLMM
of issue 15 exploded at 5e-3 and 1e-2), plus an ordered latent inside a plate and masked
observations (NaN losses or divergence in some processes before). Criterion: after the
burn-in no 100-step running mean rises above the best before it by more than 5%, and the
final loss is no worse than AutoNormal's by more than 0.5%.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI, check_losses
from numpyro_pavi.examples.glmms import crossed_bernoulli, simulate_crossed_bernoulli

# slow tier: statistical: long fits at constant rates
pytestmark = pytest.mark.slow

STEPS = 2500


def _fit(model, guide, args, lr, key=0, steps=STEPS):
    svi = SVI(model, guide, optax.adam(lr), Trace_ELBO())
    return np.asarray(svi.run(jax.random.PRNGKey(key), steps, *args, progress_bar=False).losses)


@pytest.fixture(scope="module")
def bernoulli():
    args, _ = simulate_crossed_bernoulli(0)
    peer = _fit(crossed_bernoulli, AutoNormal(crossed_bernoulli), args, 1e-2)
    return args, float(np.mean(peer[-100:]))


@pytest.mark.parametrize("kw", [{}, {"flow_type": "coupling", "num_flows": 2}], ids=["default", "coupling2"])
def test_crossed_bernoulli_stays_at_its_optimum(bernoulli, kw):
    args, peer_last = bernoulli
    losses = _fit(crossed_bernoulli, AutoPAVI(crossed_bernoulli, **kw), args, 1e-2)
    rep = check_losses(losses, window=100, rtol=0.05, burn_in=1000)
    assert not rep.exploded, rep
    assert rep.worst / rep.best < 1.05, rep
    assert float(np.mean(losses[-100:])) <= 1.005 * peer_last


def _ordered(y):
    with numpyro.plate("groups", y.shape[0], dim=-2):
        base = dist.Normal(0.0, 1.0).expand([3]).to_event(1)
        c = numpyro.sample("c", dist.TransformedDistribution(base, dist.transforms.OrderedTransform()))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(c[..., 1:2], 0.5), obs=y)


def _masked(y, mask):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", y.shape[0], dim=-2):
        mg = numpyro.sample("mg", dist.Normal(mu, 1.0))
        with numpyro.plate("obs", y.shape[1], dim=-1):
            numpyro.sample("y", dist.Normal(mg, 0.5).mask(mask), obs=y)


@pytest.mark.parametrize("which", ["ordered", "masked"])
def test_ordered_and_masked_models_stay_finite_and_stable(which):
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.normal(size=(20, 5)), jnp.float32)
    model, args = (_ordered, (y,)) if which == "ordered" else (_masked, (y, jnp.asarray(rng.uniform(size=(20, 5)) > 0.3)))
    for key in (0, 1):
        losses = _fit(model, AutoPAVI(model), args, 1e-2, key=key, steps=1500)
        assert np.all(np.isfinite(losses))
        assert not check_losses(losses, burn_in=500).exploded
