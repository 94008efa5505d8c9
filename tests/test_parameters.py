"""Every parameter of the guide can learn: none is a weight that no input ever reaches.

Counted as in the review that found them: after a short fit, the absolute gradients of 20
single-draw ELBO estimates, summed; a parameter whose sum is exactly zero never moves. Before,
`ragged_groups`'s default guide had 720 such parameters of 1,220: flows sized for an encoding
that Laplace bases made always zero, a hidden path fed by no input (a global's conditioner),
and the MADE weights that their masks cut (half of a 2-d site's).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.models import (
    random_effects,
    ragged_groups,
    simulate_ragged_groups,
    simulate_random_effects,
)


def _dead(model, args, kwargs, **options):
    """Parameters whose absolute gradients, summed over 20 ELBO draws after 20 steps, are 0
    (after a fit, not at random points: a hidden path with no input has a zero-initialized
    output layer, and tanh(0) = 0 keeps it and its bias at zero gradient for ever)."""
    guide = AutoPAVI(model, **options)
    svi = SVI(model, guide, optax.adam(5e-3), Trace_ELBO())
    params = svi.run(jax.random.PRNGKey(0), 20, *args, progress_bar=False, **kwargs).params
    grad = jax.jit(jax.grad(lambda p, k: Trace_ELBO().loss(k, p, model, guide, *args, **kwargs)))
    total = jax.tree.map(jnp.zeros_like, params)
    for i in range(20):
        total = jax.tree.map(lambda a, g: a + jnp.abs(g), total, grad(params, jax.random.PRNGKey(100 + i)))
    dead = {
        jax.tree_util.keystr(path): int(np.sum(np.asarray(leaf) == 0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(total)
        if np.any(np.asarray(leaf) == 0)
    }
    return dead, sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(total))


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
def test_ragged_groups_default_guide_has_no_dead_parameter():
    y, group, covariate = simulate_ragged_groups(jax.random.PRNGKey(0), 30)
    dead, total = _dead(ragged_groups, (y, group, covariate), {"num_groups": 30})
    assert not dead, dead
    assert total == 500  # 1,220 before, 720 of them dead


@pytest.mark.slow
def test_two_dimensional_sites_have_no_masked_out_weight():
    """A 2-d site's autoregressive layer: its MADE masks cut one input and one output."""
    x = simulate_random_effects(jax.random.PRNGKey(0), 12, 4, 2)
    dead, _ = _dead(random_effects, (x,), {})
    assert not dead, dead
