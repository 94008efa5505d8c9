"""Flows against exact linear algebra: log-determinants vs ``slogdet(jacfwd)``, inverses vs
the forward map on extreme inputs, MADE masks vs the Jacobian's triangle, bounded scales."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numpyro_pavi.flows import (
    INNER_LOG_SCALE_BOUND,
    ConditionalAffine,
    ConditionalAutoregressive,
    ConditionalCoupling,
    ConditionalFlow,
    SMALL_PRODUCT,
    linear,
    resnet,
)

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True)


def _perturb(params, key, scale):
    """Random weights everywhere (init is the identity, which would hide errors)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, jnp.shape(x)) for x, k in zip(leaves, keys)])


def _layer(kind, d, C, flag):
    if kind == "affine":
        return ConditionalAffine(d, C, (8,), bilinear=min(2, C - 1) if C > 1 and flag else 0)
    if kind == "autoregressive":
        return ConditionalAutoregressive(d, C, (8, 8), reverse=flag)
    if kind == "coupling":
        return ConditionalCoupling(d, C, (8,), parity=int(flag))
    return ConditionalFlow(d, C, num_layers=2, layer=kind.split("-")[1], hidden=(8,), init_scale=0.3)


def _setup(kind, d, C, flag, seed, zscale, wscale=0.7):
    layer = _layer(kind, d, C, flag)
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    params = _perturb(layer.init(k[0]), k[1], wscale)
    z = zscale * jax.random.normal(k[2], (d,))
    c = jax.random.normal(k[3], (C,))
    return layer, params, z, c


def _fwd(layer, params, z, c):
    return layer.forward(params, z, c)


KINDS = ["affine", "autoregressive", "coupling", "flow-autoregressive", "flow-coupling"]
cases = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from([1, 2, 3, 5]),
    st.sampled_from([0, 1, 3]),
    st.booleans(),
    st.integers(0, 2**16),
    st.sampled_from([1.0, 10.0]),
)


@SETTINGS
@given(cases)
@pytest.mark.slow  # property test over many flows
def test_log_det_matches_slogdet_of_jacobian(case):
    kind, d, C, flag, seed, zscale = case
    layer, params, z, c = _setup(kind, d, C, flag, seed, zscale)
    _, logdet = _fwd(layer, params, z, c)
    jac = jax.jacfwd(lambda z_: _fwd(layer, params, z_, c)[0])(z)
    sign, ref = jnp.linalg.slogdet(jac)
    assert sign > 0  # every layer is orientation preserving
    np.testing.assert_allclose(logdet, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # quick tier <= 8 min on 2 cores: runs in the slow tier
@SETTINGS
@given(cases)
def test_inverse_undoes_forward_on_extreme_inputs(case):
    kind, d, C, flag, seed, zscale = case
    layer, params, z, c = _setup(kind, d, C, flag, seed, zscale)
    x, logdet = _fwd(layer, params, z, c)
    z_back, logdet_back = layer.inverse(params, x, c)
    assert bool(jnp.all(jnp.isfinite(x)))
    np.testing.assert_allclose(z_back, z, rtol=1e-4, atol=1e-4 * zscale)
    np.testing.assert_allclose(logdet_back, logdet, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer_kind", ["autoregressive", "coupling"])
@pytest.mark.parametrize("num_layers", [0, 1, 2])
def test_flow_log_prob_matches_sampling_density(layer_kind, num_layers):
    flow = ConditionalFlow(4, 3, num_layers=num_layers, layer=layer_kind, hidden=(8,), init_scale=0.2, bilinear=2)
    k = jax.random.split(jax.random.PRNGKey(num_layers), 4)
    params = _perturb(flow.init(k[0]), k[1], 0.7)
    noise = jax.random.normal(k[2], (50, 4))
    c = jax.random.normal(k[3], (50, 3))
    x, logq = flow.sample_and_log_prob(params, noise, c)
    np.testing.assert_allclose(flow.log_prob(params, x, c), logq, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_a_context_shared_by_all_rows_stays_one_row(kind):
    """A context the same for every element (global parents only) is passed as one row; the
    flow's outputs broadcast against the noise and equal those of the broadcast context."""
    layer, params, _, c = _setup(kind, 2, 3, True, 0, 1.0)
    z = jax.random.normal(jax.random.PRNGKey(9), (5, 2))
    shared = layer.forward(params, z, c[None])
    full = layer.forward(params, z, jnp.broadcast_to(c, (5, 3)))
    for a, b in zip(shared, full):  # a lone affine layer's log-det stays one row too
        np.testing.assert_allclose(np.broadcast_to(a, b.shape), b, rtol=1e-6, atol=1e-6)
    back = layer.inverse(params, full[0], c[None])
    np.testing.assert_allclose(back[0], z, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("reverse", [False, True])
def test_made_jacobian_is_triangular(reverse):
    d = 5
    layer = ConditionalAutoregressive(d, 2, (16, 16), reverse=reverse)
    params = _perturb(layer.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), 1.0)
    jac = jax.jacfwd(lambda z: layer.forward(params, z, jnp.ones(2))[0])(jnp.linspace(-1, 1, d))
    jac = np.asarray(jac)
    # x_i depends on z_j only for j <= i (reversed: j >= i); the diagonal is the scale
    upper = np.triu(jac, 1) if not reverse else np.tril(jac, -1)
    assert np.all(upper == 0.0)
    lower = np.tril(jac, -1) if not reverse else np.triu(jac, 1)
    assert np.any(lower != 0.0)  # the conditioner does use the earlier coordinates
    assert np.all(np.diag(jac) > 0)


@pytest.mark.parametrize("layer_kind", ["autoregressive", "coupling"])
def test_inner_layers_start_as_identity_and_keep_bounded_scales(layer_kind):
    flow = ConditionalFlow(3, 2, num_layers=2, layer=layer_kind, hidden=(8,), init_scale=1.0)
    params = flow.init(jax.random.PRNGKey(0))
    z = jnp.linspace(-10, 10, 3)
    c = jnp.ones(2)
    for layer, p in zip(flow.layers[:-1], params[:-1]):
        x, logdet = layer.forward(p, z, c)
        np.testing.assert_allclose(x, z, atol=1e-6)
        assert abs(float(logdet)) < 1e-6
        # huge weights: the log-scale stays within the smooth bound per transformed coordinate
        wild = _perturb(p, jax.random.PRNGKey(3), 100.0)
        _, logdet = layer.forward(wild, z, c)
        assert abs(float(logdet)) <= 3 * INNER_LOG_SCALE_BOUND + 1e-4


@pytest.mark.parametrize("rows", [1, 7, 1 + SMALL_PRODUCT // 32])
def test_linear_is_the_matrix_product_on_both_sides_of_its_threshold(rows):
    """``linear`` computes small products elementwise and large ones as ``@``: the values
    and both gradients equal the matrix product's either way."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x, w = jax.random.normal(kx, (rows, 4)), jax.random.normal(kw, (4, 8))
    g = jax.random.normal(kg, (rows, 8))
    small = rows * 4 * 8 <= SMALL_PRODUCT
    assert ("dot_general" in str(jax.make_jaxpr(linear)(x, w))) is not small
    with jax.default_matmul_precision("highest"):  # a GPU's default f32 product is TF32
        np.testing.assert_allclose(linear(x, w), x @ w, rtol=1e-5, atol=1e-5)
        ours = jax.grad(lambda x, w: jnp.sum(g * linear(x, w)), (0, 1))(x, w)
        ref = jax.grad(lambda x, w: jnp.sum(g * (x @ w)), (0, 1))(x, w)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [3, 1 + SMALL_PRODUCT // 24])
def test_bilinear_term_is_the_einsum_on_both_sides_of_the_threshold(rows):
    """The bilinear term ``enc^T T_k parents`` of an affine layer, elementwise for small
    inputs and an einsum for large ones, equals the einsum (values and gradients)."""
    layer = ConditionalAffine(2, 5, (8,), bilinear=2)
    params = _perturb(layer.init(jax.random.PRNGKey(0)), jax.random.PRNGKey(1), 0.5)
    c = jax.random.normal(jax.random.PRNGKey(2), (rows, 5))

    def reference(params, c):
        out = resnet(params["net"], c)
        out = out + jnp.einsum("...i,...j,ijk->...k", c[..., :2], c[..., 2:], params["bilinear"])
        return out[..., :2], out[..., 2:]

    with jax.default_matmul_precision("highest"):  # a GPU's default f32 product is TF32
        ours = layer._shift_scale(params, c, 1.0)
        shift, raw = reference(params, c)
        loss = lambda f: lambda p, c: jnp.sum(f(p, c)[0] ** 2)
        g_ours = jax.grad(loss(lambda p, c: layer._shift_scale(p, c, 1.0)), (0, 1))(params, c)
        g_ref = jax.grad(loss(reference), (0, 1))(params, c)
    np.testing.assert_allclose(ours[0], shift, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
