"""Tests for numpyro_pavi.encoders (float32 throughout; x64 is deliberately not enabled)."""

from __future__ import annotations

import functools
import math
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numpyro_pavi.encoders import (
    SetEncoder,
    init_isab,
    init_mab,
    init_mlp,
    init_pma,
    init_sab,
    isab,
    mab,
    mlp,
    pma,
    sab,
)

KINDS = ("deep_sets", "set_transformer")
IN_DIM = 3
DIM = 8
RTOL, ATOL = 1e-4, 1e-5
FEW = settings(max_examples=12, deadline=None)


def _perturb(params, key, scale=0.3):
    """Jitter every leaf so zero-initialised biases and the small read-out layer are generic.

    With the library's initialisation the outputs are ~1e-2 and many biases are exactly 0,
    which could hide bugs (e.g. a bias applied to padded entries) below the tolerance.
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [leaf + scale * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


@functools.cache
def _setup(kind: str, pool: str = "mean"):
    enc = SetEncoder(kind=kind, out_dim=5, hidden_dim=DIM, num_heads=2, num_inducing=3, num_blocks=2, pool=pool)
    # The set transformer (no layer norm) amplifies jitter through its residual stack, so it
    # gets less of it; both end up with outputs of order 0.1-1.
    scale = 0.3 if kind == "deep_sets" else 0.1
    params = _perturb(enc.init(jax.random.key(0), IN_DIM), jax.random.key(1), scale)
    return enc, params


@functools.cache
def _block_params(block: str):
    key = jax.random.key(2)
    if block == "sab":
        return _perturb(init_sab(key, DIM, num_heads=2), jax.random.key(3))
    return _perturb(init_isab(key, DIM, num_inducing=3, num_heads=2), jax.random.key(3), 0.1)


# Every test goes through these jitted entry points (the encoder is a hashable static
# argument) and reuses a handful of shapes: on CPU one jit compile is far cheaper than eager
# mode, which compiles every primitive separately for every new shape.
_call = jax.jit(SetEncoder.__call__, static_argnums=0)
_segments = jax.jit(SetEncoder.segments, static_argnums=(0, 4))
_sab = jax.jit(sab, static_argnums=2)
_isab = jax.jit(isab, static_argnums=2)
_pma = jax.jit(pma, static_argnums=2)
MAX_N = 6  # unpadded set sizes used by the tests are 1..MAX_N


def _normal(seed: int, shape) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape)


def _close(a, b, rtol=RTOL, atol=ATOL):
    a, b = np.asarray(a), np.asarray(b)
    # float32 round-off is relative to the largest entry, not to each (possibly tiny) entry.
    scale = max(1.0, float(np.max(np.abs(b), initial=0.0)))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


# ----------------------------------------------------------------------------------------
# Invariance / equivariance
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(data=st.data(), n=st.integers(1, MAX_N), seed=st.integers(0, 2**16))
def test_encoder_permutation_invariant(kind, data, n, seed):
    enc, params = _setup(kind)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    x = 2.0 * _normal(seed, (n, IN_DIM))
    _close(_call(enc, params, x[perm], None), _call(enc, params, x, None))


@pytest.mark.parametrize("block", ["sab", "isab"])
@FEW
@given(data=st.data(), n=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**16))
def test_blocks_permutation_equivariant(block, data, n, seed):
    fn = _sab if block == "sab" else _isab
    params = _block_params(block)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    mask = jnp.asarray(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    x = _normal(seed, (n, DIM))
    out = fn(params, x, 2, None)
    assert out.shape == (n, DIM)
    _close(fn(params, x[perm], 2, None), out[perm])
    # With a key mask too (rows of masked elements included: they are still a function of
    # their own row and the unmasked set, so they must permute along).
    out = fn(params, x, 2, mask)
    _close(fn(params, x[perm], 2, mask[perm]), out[perm])


@FEW
@given(data=st.data(), n=st.sampled_from([1, 2, 5]), seed=st.integers(0, 2**16))
def test_pma_permutation_invariant(data, n, seed):
    params = _perturb(init_pma(jax.random.key(4), DIM, num_seeds=2), jax.random.key(5), 0.1)
    perm = np.asarray(data.draw(st.permutations(range(n))))
    x = _normal(seed, (n, DIM))
    out = _pma(params, x, 2, None)
    assert out.shape == (2, DIM)
    _close(_pma(params, x[perm], 2, None), out)


@pytest.mark.parametrize("kind", KINDS)
def test_encoder_is_not_constant(kind):
    # Guards the invariance tests against passing trivially for a degenerate encoder.
    enc, params = _setup(kind)
    a = _call(enc, params, _normal(10, (4, IN_DIM)), None)
    b = _call(enc, params, _normal(11, (4, IN_DIM)), None)
    c = _call(enc, params, _normal(10, (4, IN_DIM))[:3], None)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_mab_matches_reference_single_head():
    params = _perturb(init_mab(jax.random.key(6), DIM, dim_kv=4, num_heads=1), jax.random.key(7))
    x, y = _normal(8, (3, DIM)), _normal(9, (5, 4))
    mask = jnp.array([True, False, True, True, False])
    y = jnp.where(mask[:, None], y, 1e30)
    ym = y[mask]
    lin = lambda p, t: t @ p["w"] + p["b"]
    q, k, v = lin(params["wq"], x), lin(params["wk"], ym), lin(params["wv"], ym)
    w = jax.nn.softmax(q @ k.T / math.sqrt(DIM), axis=-1)
    h = x + lin(params["wo"], w @ v)
    expected = h + mlp(params["ff"], h)
    _close(mab(params, x, y, 1, mask), expected)
    _close(mab(params, x, ym, 1), expected)


# ----------------------------------------------------------------------------------------
# Padding and masks
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(
    valid=st.lists(st.booleans(), min_size=MAX_N, max_size=MAX_N).filter(any),
    seed=st.integers(0, 2**16),
)
def test_padding_with_mask_equals_unpadded(kind, valid, seed):
    enc, params = _setup(kind)
    mask = np.asarray(valid)
    x = _normal(seed, (MAX_N, IN_DIM))
    # Huge padded values: any leak (even multiplied by a zero attention weight) would show.
    x = jnp.where(mask[:, None], x, 1e30 * _normal(seed + 1, x.shape))
    _close(_call(enc, params, x, jnp.asarray(mask)), _call(enc, params, x[mask], None))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("pad", [jnp.inf, -jnp.inf, jnp.nan])
def test_nonfinite_padding_has_no_effect(kind, pad):
    enc, params = _setup(kind)
    x = _normal(12, (MAX_N, IN_DIM))
    mask = jnp.array([True, False, True, True, False, True])
    xp = jnp.where(mask[:, None], x, pad)
    _close(_call(enc, params, xp, mask), _call(enc, params, x[mask], None))


@pytest.mark.parametrize("kind", KINDS)
def test_all_masked_set_is_finite(kind):
    enc, params = _setup(kind)
    x = 1e30 * _normal(13, (1, MAX_N, IN_DIM))
    out = _call(enc, params, x, jnp.zeros((1, MAX_N), bool))
    assert out.shape == (1, 5)
    assert np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("pool", ["mean", "sum"])
def test_deep_sets_pooling(pool):
    enc, params = _setup("deep_sets", pool)
    x = _normal(14, (3, IN_DIM))
    twice = _call(enc, params, jnp.concatenate([x, x]), None)
    once = _call(enc, params, x, None)
    if pool == "mean":  # a multiset and its double have the same mean
        _close(twice, once)
    else:
        assert float(jnp.max(jnp.abs(twice - once))) > 1e-4


# ----------------------------------------------------------------------------------------
# Ragged segments
# ----------------------------------------------------------------------------------------

SEG_ROWS = 12  # flat rows, fixed so the jitted segments() compiles once per kind
SEG_REAL = 4  # real segments 0..3; segment 4 holds the filler rows


@pytest.mark.parametrize("kind", KINDS)
@FEW
@given(
    data=st.data(),
    lengths=st.lists(st.integers(0, 3), min_size=SEG_REAL, max_size=SEG_REAL).filter(any),
    seed=st.integers(0, 2**16),
)
def test_segments_equal_per_segment_calls(kind, data, lengths, seed):
    enc, params = _setup(kind)
    ids = np.repeat(np.arange(SEG_REAL + 1), lengths + [SEG_ROWS - sum(lengths)])
    # Rows need not be grouped by segment.
    ids = ids[np.asarray(data.draw(st.permutations(range(SEG_ROWS))))]
    x = _normal(seed, (SEG_ROWS, IN_DIM))
    out = _segments(enc, params, x, jnp.asarray(ids), SEG_REAL + 1)
    assert out.shape == (SEG_REAL + 1, 5)
    for s, length in enumerate(lengths):
        if length:
            _close(out[s], _call(enc, params, x[ids == s], None))
        else:  # an empty segment encodes like an all-masked set
            _close(out[s], _call(enc, params, x[:1], jnp.zeros((1,), bool)))


def test_segments_sum_pool():
    enc, params = _setup("deep_sets", "sum")
    x = _normal(15, (6, IN_DIM))
    ids = np.array([1, 0, 1, 2, 0, 1])
    out = enc.segments(params, x, jnp.asarray(ids), 3)
    _close(out, jnp.stack([_call(enc, params, x[ids == s], None) for s in range(3)]))


@pytest.mark.parametrize("kind", KINDS)
def test_segments_have_no_quadratic_intermediates(kind):
    enc, params = _setup(kind)
    n, num_segments = 256, 4
    x = jnp.zeros((n, IN_DIM))
    ids = jnp.arange(n) % num_segments
    # Tracing only: no intermediate may scale like n * n or num_segments * max_len * hidden.
    jaxpr = jax.make_jaxpr(enc.segments, static_argnums=3)(params, x, ids, num_segments)
    sizes = [math.prod(v.aval.shape) for eqn in jaxpr.jaxpr.eqns for v in eqn.outvars if hasattr(v.aval, "shape")]
    assert max(sizes) <= n * DIM * 3, max(sizes)  # O(n * hidden * num_inducing)


# ----------------------------------------------------------------------------------------
# Batch dims, gradients, misc
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_batch_dims_match_per_batch_calls(kind):
    enc, params = _setup(kind)
    x = _normal(17, (2, 3, MAX_N, IN_DIM))
    mask = jax.random.bernoulli(jax.random.key(18), 0.6, (2, 3, MAX_N)).at[..., 0].set(True)
    out = _call(enc, params, x, mask)
    assert out.shape == (2, 3, 5)
    unmasked = _call(enc, params, x, None)
    assert unmasked.shape == (2, 3, 5)
    for i in range(2):
        for j in range(3):
            _close(out[i, j], _call(enc, params, x[i, j], mask[i, j]))
            _close(unmasked[i, j], _call(enc, params, x[i, j], None))
    m = np.asarray(mask[1, 2])
    _close(out[1, 2], _call(enc, params, x[1, 2][m], None))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kind": "transformer"}, r"Unknown SetEncoder kind 'transformer'.*deep_sets.*set_transformer"),
        ({"pool": "max"}, r"Unknown SetEncoder pool 'max'.*mean.*sum"),
        ({"kind": "set_transformer", "hidden_dim": 7, "num_heads": 2}, r"divisible by num_heads"),
        ({"num_blocks": 0}, r"num_blocks must be a positive int"),
    ],
)
def test_invalid_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SetEncoder(**kwargs)


def test_init_mlp_rejects_single_size():
    with pytest.raises(ValueError, match="at least"):
        init_mlp(jax.random.key(0), (3,))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_finite(kind):
    enc, params = _setup(kind)
    x = _normal(19, (2, MAX_N, IN_DIM))
    mask = jnp.array([[True, True, False, True, False, True], [False] * MAX_N])
    x = jnp.where(mask[..., None], x, 1e30)

    def loss(p, x):
        rows = x[0, jnp.array([0, 1, 3])]  # valid rows only: segments() has no mask
        flat = enc.segments(p, rows, jnp.array([0, 1, 1]), 3)  # segment 2 is empty
        return jnp.sum(enc(p, x, mask) ** 2) + jnp.sum(flat**2)

    gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    leaves = jax.tree_util.tree_leaves(gp)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    assert np.all(np.isfinite(np.asarray(gx)))
    assert np.all(np.asarray(gx)[~np.asarray(mask)] == 0.0)
    assert float(jnp.sum(jnp.abs(gx[0, 0]))) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_init_small_outputs_pickle_and_num_params(kind):
    enc = SetEncoder(kind=kind, out_dim=5, hidden_dim=DIM, num_heads=2, num_inducing=3, num_blocks=2)
    assert enc == _setup(kind)[0]  # same static config: reuses the compiled _call
    params = enc.init(jax.random.key(20), IN_DIM)
    assert float(jnp.max(jnp.abs(_call(enc, params, 3.0 * _normal(21, (MAX_N, IN_DIM)), None)))) < 0.5
    assert enc.num_params(IN_DIM) == sum(p.size for p in jax.tree_util.tree_leaves(params))
    clone = pickle.loads(pickle.dumps(enc))
    assert clone == enc and hash(clone) == hash(enc)


def test_layer_norm_variant_invariant_and_masked():
    enc = SetEncoder(kind="set_transformer", out_dim=3, hidden_dim=DIM, num_inducing=2, num_blocks=1, layer_norm=True)
    params = _perturb(enc.init(jax.random.key(23), IN_DIM), jax.random.key(24), 0.1)
    assert "ln0" in params["blocks"]["0"]["mab0"]
    x = _normal(25, (5, IN_DIM))
    mask = jnp.array([True, True, False, True, True])
    ids = jnp.array([0, 0, 1, 0, 0])
    expected = _call(enc, params, x[np.asarray(mask)], None)
    _close(_call(enc, params, jnp.where(mask[:, None], x, 1e30), mask), expected)
    _close(_segments(enc, params, x[::-1], ids, 2)[0], expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_dim", [2, 10])
def test_moment_readout_is_linear_in_pooled_moments(kind, in_dim):
    """With the network's read-out zeroed, the encoding is exactly the linear read-out of
    the set's mean of x and of x_i x_j (squares only above 8 features), masked or ragged."""
    enc = SetEncoder(kind=kind, out_dim=3)
    params = enc.init(jax.random.PRNGKey(0), in_dim)
    last = "rho" if kind == "deep_sets" else "out"
    params[last] = jax.tree.map(jnp.zeros_like, params[last])
    params["moments"] = {
        "w": jax.random.normal(jax.random.PRNGKey(1), params["moments"]["w"].shape),
        "b": jnp.arange(3.0),
    }
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (5, in_dim)), np.float64)
    pairs = [(i, j) for i in range(in_dim) for j in range(i, in_dim)] if in_dim <= 8 else [(i, i) for i in range(in_dim)]
    feats = np.concatenate([x.mean(0), [np.mean(x[:, i] * x[:, j]) for i, j in pairs]])
    want = feats @ np.asarray(params["moments"]["w"]) / feats.size + np.arange(3.0)  # a readout
    padded = np.concatenate([x, np.full((2, in_dim), np.nan)])
    mask = np.arange(7) < 5
    np.testing.assert_allclose(enc(params, jnp.asarray(padded, jnp.float32), mask), want, rtol=1e-4, atol=1e-4)
    seg = enc.segments(params, jnp.asarray(x, jnp.float32), jnp.zeros(5, int), 1)[0]
    np.testing.assert_allclose(seg, want, rtol=1e-4, atol=1e-4)
    assert "moments" not in SetEncoder(kind=kind, moments=False).init(jax.random.PRNGKey(0), in_dim)


def test_set_transformer_takes_zero_size_inputs():
    """No sets at all (a zero batch) and no rows (every segment empty): shapes, no error."""
    enc = SetEncoder(kind="set_transformer", out_dim=4, hidden_dim=8, num_inducing=3, num_blocks=1)
    params = enc.init(jax.random.PRNGKey(0), 3)
    assert enc(params, jnp.zeros((0, 5, 3))).shape == (0, 4)
    out = enc.segments(params, jnp.zeros((0, 3)), jnp.zeros((0,), int), 2)
    assert out.shape == (2, 4) and np.all(np.isfinite(out))


def test_a_groups_set_encoding_does_not_move_with_its_masked_padding():
    """PAVI-E on masked data (``dist.mask``): the same groups padded with 3 more masked
    columns get the same encodings (the padding entered the pooling and the count)."""
    import numpyro
    import numpyro.distributions as dist
    from numpyro.infer import SVI, Trace_ELBO

    from numpyro_pavi import AutoPAVI
    from numpyro_pavi.sampling import encodings

    def model(y, m):
        mu = numpyro.sample("mu", dist.Normal(0, 5))
        with numpyro.plate("g", y.shape[0], dim=-2):
            a = numpyro.sample("a", dist.Normal(mu, 1))
            with numpyro.plate("n", y.shape[1], dim=-1):
                numpyro.sample("y", dist.Normal(a, 1).mask(m), obs=y)

    rng = np.random.default_rng(0)
    m = np.ones((4, 5), bool)
    m[0, 3:] = False
    y = np.where(m, rng.normal(size=(4, 5)), 0.0).astype(np.float32)
    guide = AutoPAVI(model, encoding="set", laplace=False)
    svi = SVI(model, guide, numpyro.optim.Adam(1e-2), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.PRNGKey(0), y, m))
    # away from the initial values, where an encoder's output may not depend on its input
    params = jax.tree.map(lambda v: v + 0.5 * jax.random.normal(jax.random.PRNGKey(v.size), v.shape), params)

    def encoding(y, m):
        inputs = guide.plate_inputs(y, m)
        return encodings(guide.plan, guide.plan.unpack(params), inputs.indices, inputs.trace, inputs.sizes, inputs.bound)[("g",)]

    pad = np.zeros((4, 3))
    padded = encoding(np.concatenate([y, pad.astype(np.float32)], 1), np.concatenate([m, pad.astype(bool)], 1))
    np.testing.assert_allclose(padded, encoding(y, m), atol=1e-5)
