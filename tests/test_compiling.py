"""One-shot programs compiled cheaply: same values as ``jax.jit``, on every path."""

import jax
import jax.numpy as jnp
import numpy as np
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
    got = compiling.run_once(_newton_sqrt, a, data=np.zeros(3))
    want = jax.jit(_newton_sqrt)(a)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-6)
    np.testing.assert_allclose(got[0], np.sqrt(np.asarray(a)), rtol=1e-6)


def test_run_once_under_an_outer_trace():
    out = jax.eval_shape(lambda a: compiling.run_once(_newton_sqrt, a)[1], jax.ShapeDtypeStruct((4,), jnp.float32))
    assert out.shape == (4, 4)
    np.testing.assert_allclose(jax.jit(lambda a: compiling.run_once(_newton_sqrt, a)[0])(jnp.full(3, 9.0)), 3.0, rtol=1e-6)
