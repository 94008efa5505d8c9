"""Tests for numpyro_pavi.checkpoint: round trips, crash safety, exact resume, clear errors."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi.checkpoint import (
    FORMAT_VERSION,
    Checkpoint,
    fit,
    load_checkpoint,
    save_checkpoint,
)

X = jnp.array([0.3, -1.2, 2.0, 0.7])


def model(x: jax.Array | None = None) -> None:
    """Two-level model: global mu, one theta per group of a plate of 4, one obs per group."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", 4):
        theta = numpyro.sample("theta", dist.Normal(mu, 1.0))
        numpyro.sample("x", dist.Normal(theta, 1.0), obs=x)


def other_model(x: jax.Array | None = None) -> None:
    """Same data, different latents: its checkpoints must not resume `model`."""
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 4):
        numpyro.sample("x", dist.Normal(0.0, tau), obs=x)


OPTIMS: dict[str, Callable[[], numpyro.optim._NumPyroOptim]] = {
    "adam": lambda: numpyro.optim.Adam(0.05),
    "optax_adam": lambda: numpyro.optim.optax_to_numpyro(optax.adam(0.05)),
}
KEYS: dict[str, Callable[[], jax.Array]] = {
    "legacy": lambda: jax.random.PRNGKey(3),
    "typed": lambda: jax.random.key(3),
}


def make_svi(optim: str, m: Callable = model) -> SVI:
    return SVI(m, AutoNormal(m), OPTIMS[optim](), Trace_ELBO())


def assert_trees_identical(a, b) -> None:
    """Same structure, and leaf by leaf: same type, dtype, weak type and bits."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
        if not hasattr(x, "dtype"):  # plain Python leaf
            assert x == y
            continue
        assert x.dtype == y.dtype
        assert getattr(x, "weak_type", None) == getattr(y, "weak_type", None)
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert str(jax.random.key_impl(x)) == str(jax.random.key_impl(y))
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


_UPDATES: dict[str, tuple[SVI, Callable]] = {}


def trained_state(optim: str, key: jax.Array, steps: int = 3):
    """SVIState after `steps` updates; one jitted update per optimizer keeps compiles down."""
    if optim not in _UPDATES:
        svi = make_svi(optim)
        _UPDATES[optim] = (svi, jax.jit(svi.update))
    svi, update = _UPDATES[optim]
    state = svi.init(key, X)
    for _ in range(steps):
        state, _ = update(state, X)
    return state


# ---------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_kind", sorted(KEYS))
@pytest.mark.parametrize("optim", sorted(OPTIMS))
def test_round_trip(tmp_path, optim: str, key_kind: str) -> None:
    state = trained_state(optim, KEYS[key_kind]())
    losses = jnp.array([3.0, 2.5, 2.25], dtype=jnp.float32)
    meta = {"step": 3, "note": "hello", "nested": {"a": [1, 2]}}
    path = tmp_path / "ckpt.pkl"

    save_checkpoint(path, state, losses=losses, metadata=meta)
    ckpt = load_checkpoint(path)

    assert isinstance(ckpt, Checkpoint)
    assert isinstance(ckpt.svi_state, type(state))
    assert_trees_identical(ckpt.svi_state, state)
    # The step counter is a weak int32 in numpyro: checked explicitly as it decides jit reuse.
    assert ckpt.svi_state.optim_state[0].weak_type == state.optim_state[0].weak_type
    np.testing.assert_array_equal(ckpt.losses, np.asarray(losses))
    assert ckpt.losses.dtype == np.float32
    assert ckpt.metadata == meta and ckpt.metadata is not meta
    assert ckpt.step == 3
    if key_kind == "typed":
        assert jnp.issubdtype(ckpt.svi_state.rng_key.dtype, jax.dtypes.prng_key)
    else:
        assert ckpt.svi_state.rng_key.dtype == jnp.uint32
    # The restored key must drive randomness exactly like the original.
    np.testing.assert_array_equal(
        jax.random.normal(ckpt.svi_state.rng_key, (3,)), jax.random.normal(state.rng_key, (3,))
    )


def test_round_trip_other_key_impl_and_leaf_kinds(tmp_path) -> None:
    state = trained_state("adam", jax.random.PRNGKey(0), steps=1)
    state = state._replace(
        rng_key=jax.random.split(jax.random.key(7, impl="rbg"), 2),
        mutable_state={
            "np": np.arange(3, dtype=np.int16),
            "py": 2.5,
            "bf16": jnp.ones(2, jnp.bfloat16),
        },
    )
    path = tmp_path / "ckpt.pkl"
    save_checkpoint(path, state)
    ckpt = load_checkpoint(path)
    assert_trees_identical(ckpt.svi_state, state)
    assert str(jax.random.key_impl(ckpt.svi_state.rng_key)) == "rbg"
    assert ckpt.losses.shape == (0,) and ckpt.step == 0 and ckpt.metadata == {}


def test_step_defaults_to_number_of_losses(tmp_path) -> None:
    path = tmp_path / "ckpt.pkl"
    save_checkpoint(path, trained_state("adam", jax.random.PRNGKey(0), 1), losses=[1.0, 2.0])
    assert load_checkpoint(path).step == 2


# ---------------------------------------------------------------------------------------------
# Atomicity
# ---------------------------------------------------------------------------------------------


def _crash_in_pickle_dump(monkeypatch) -> None:
    def dump(obj, f, *a, **kw):
        # Write a real prefix of the payload first, so the temp file exists and is torn.
        data = pickle.dumps(obj, *a, **kw)
        f.write(data[: len(data) // 2])
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pickle, "dump", dump)


def _crash_in_replace(monkeypatch) -> None:
    def replace(src, dst):
        assert os.path.getsize(src) > 0  # the full temp file was written before the crash
        raise OSError("power cut (simulated)")

    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize(
    "crash", [_crash_in_pickle_dump, _crash_in_replace], ids=["dump", "replace"]
)
def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch, crash) -> None:
    path = tmp_path / "ckpt.pkl"
    old_state = trained_state("optax_adam", jax.random.key(0), steps=1)
    save_checkpoint(path, old_state, losses=[5.0], metadata={"step": 1})
    before = path.read_bytes()

    crash(monkeypatch)
    new_state = trained_state("optax_adam", jax.random.key(1), steps=2)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, new_state, losses=[5.0, 4.0], metadata={"step": 2})
    monkeypatch.undo()

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pkl"]  # no temp file left
    ckpt = load_checkpoint(path)
    assert ckpt.step == 1
    assert_trees_identical(ckpt.svi_state, old_state)


def test_overwrite_replaces_and_keeps_mode(tmp_path) -> None:
    path = tmp_path / "ckpt.pkl"
    save_checkpoint(path, trained_state("adam", jax.random.PRNGKey(0), 1), losses=[1.0])
    os.chmod(path, 0o640)
    save_checkpoint(path, trained_state("adam", jax.random.PRNGKey(0), 2), losses=[1.0, 0.5])
    assert load_checkpoint(path).step == 2
    assert os.stat(path).st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pkl"]


# ---------------------------------------------------------------------------------------------
# Exact resume
# ---------------------------------------------------------------------------------------------


# Both optimizers and both key kinds, without paying for all four combinations.
@pytest.mark.parametrize("optim, key_kind", [("adam", "legacy"), ("optax_adam", "typed")])
def test_exact_resume(tmp_path, optim: str, key_kind: str) -> None:
    key = KEYS[key_kind]()
    svi = make_svi(optim)
    ref = svi.run(key, 20, X, progress_bar=True)

    # Uninterrupted but segmented, with and without checkpoint files.
    full_path = tmp_path / "full.pkl" if key_kind == "legacy" else None
    full = fit(svi, key, 20, X, checkpoint_path=full_path, checkpoint_every=5, progress_bar=False)

    path = tmp_path / "resumed.pkl"
    first = fit(svi, key, 10, X, checkpoint_path=path, checkpoint_every=5, progress_bar=False)
    assert load_checkpoint(path).step == 10
    assert first.losses.shape == (10,)
    # A different rng_key on resume must not matter: the stored state carries its key.
    resumed = fit(
        svi,
        jax.random.PRNGKey(999),
        20,
        X,
        checkpoint_path=path,
        checkpoint_every=5,
        progress_bar=True,
    )

    for result in (full, resumed):
        assert result.losses.shape == (20,)
        np.testing.assert_array_equal(result.losses, ref.losses)
        assert set(result.params) == set(ref.params)
        for name in ref.params:
            np.testing.assert_array_equal(result.params[name], ref.params[name])
        assert_trees_identical(result.state, ref.state)

    ckpt = load_checkpoint(path)
    assert ckpt.step == 20 and ckpt.metadata["step"] == 20 and ckpt.metadata["num_steps"] == 20
    np.testing.assert_array_equal(ckpt.losses, ref.losses)

    # Already complete: returns the stored result without stepping.
    again = fit(svi, key, 20, X, checkpoint_path=path, progress_bar=False)
    np.testing.assert_array_equal(again.losses, ref.losses)
    assert_trees_identical(again.state, ref.state)


def test_resume_at_odd_boundary_and_stable_update(tmp_path) -> None:
    key = jax.random.key(5)
    svi = make_svi("adam")
    ref = svi.run(key, 17, X, progress_bar=True, stable_update=True)
    path = tmp_path / "ckpt.pkl"
    fit(
        svi,
        key,
        7,
        X,
        checkpoint_path=path,
        checkpoint_every=5,
        progress_bar=False,
        stable_update=True,
    )
    # Segments are now 7-12, 12-17: boundaries differ from an uninterrupted run's.
    res = fit(
        svi,
        key,
        17,
        X,
        checkpoint_path=path,
        checkpoint_every=5,
        progress_bar=False,
        stable_update=True,
    )
    np.testing.assert_array_equal(res.losses, ref.losses)
    assert_trees_identical(res.state, ref.state)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path) -> None:
    path = tmp_path / "nope.pkl"
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        load_checkpoint(path)


def test_corrupt_files(tmp_path) -> None:
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x00\x01 definitely not a pickle")
    with pytest.raises(ValueError, match=r"garbage\.pkl.*corrupt"):
        load_checkpoint(garbage)

    good = tmp_path / "good.pkl"
    save_checkpoint(good, trained_state("adam", jax.random.PRNGKey(0), 1), losses=[1.0])
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(good.read_bytes()[:-40])
    with pytest.raises(ValueError, match=r"truncated\.pkl.*corrupt"):
        load_checkpoint(truncated)

    empty = tmp_path / "empty.pkl"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.pkl.*corrupt"):
        load_checkpoint(empty)

    foreign = tmp_path / "foreign.pkl"
    foreign.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ValueError, match=r"foreign\.pkl.*not a numpyro-pavi checkpoint"):
        load_checkpoint(foreign)


def test_wrong_format_version(tmp_path) -> None:
    path = tmp_path / "old.pkl"
    save_checkpoint(path, trained_state("adam", jax.random.PRNGKey(0), 1), losses=[1.0])
    payload = pickle.loads(path.read_bytes())
    assert payload["format_version"] == FORMAT_VERSION
    payload["format_version"] = FORMAT_VERSION + 998
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=rf"old\.pkl.*format version {FORMAT_VERSION + 998}"):
        load_checkpoint(path)


def test_fit_rejects_bad_resume(tmp_path) -> None:
    key = jax.random.PRNGKey(0)
    path = tmp_path / "ckpt.pkl"
    fit(make_svi("adam"), key, 6, X, checkpoint_path=path, checkpoint_every=3, progress_bar=False)
    with pytest.raises(ValueError, match="past num_steps=4"):
        fit(make_svi("adam"), key, 4, X, checkpoint_path=path, progress_bar=False)
    with pytest.raises(ValueError, match="does not match"):
        fit(make_svi("adam", other_model), key, 8, X, checkpoint_path=path, progress_bar=False)
    with pytest.raises(ValueError, match="num_steps"):
        fit(make_svi("adam"), key, 0, X)
    with pytest.raises(ValueError, match="checkpoint_every"):
        fit(make_svi("adam"), key, 5, X, checkpoint_every=0)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive integer, got 2.5"):
        fit(make_svi("adam"), key, 5, X, checkpoint_every=2.5)
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got 7.5"):
        fit(make_svi("adam"), key, 7.5, X, checkpoint_path=path)
    missing = tmp_path / "no" / "such" / "ckpt.pkl"
    with pytest.raises(ValueError, match="its directory .*no/such' does not exist"):
        fit(make_svi("adam"), key, 5, X, checkpoint_path=missing, progress_bar=False)


def test_mismatch_names_the_first_difference(tmp_path) -> None:
    key = jax.random.PRNGKey(0)
    path = tmp_path / "ckpt.pkl"
    fit(make_svi("adam"), key, 3, X, checkpoint_path=path, progress_bar=False)
    with pytest.raises(ValueError, match="does not match") as err:
        fit(make_svi("adam", other_model), key, 6, X, checkpoint_path=path, progress_bar=False)
    assert "in the checkpoint" in str(err.value) and len(str(err.value)) < 600, str(err.value)


def test_keep_best_false_drops_a_stored_record(tmp_path) -> None:
    key = jax.random.PRNGKey(0)
    path = tmp_path / "ckpt.pkl"
    fit(make_svi("adam"), key, 40, X, checkpoint_path=path, checkpoint_every=20, window=10, progress_bar=False)
    assert load_checkpoint(path).metadata["best"]["window"] == 10
    svi = make_svi("adam")
    out = fit(svi, key, 60, X, checkpoint_path=path, checkpoint_every=20, window=10, keep_best=False, progress_bar=False)
    assert "best" not in load_checkpoint(path).metadata
    assert_trees_identical(out.params, svi.get_params(out.state))


def counting_model(x: jax.Array | None = None) -> None:
    """``model`` with a mutable site: NumPyro drops mutable state from the steps of a
    ``Trace_ELBO(num_particles > 1)``, keeping the one ``svi.init`` made."""
    numpyro.primitives.mutable("calls", {"n": jnp.zeros(())})
    model(x)


def test_resume_with_several_particles_and_a_mutable_site(tmp_path) -> None:
    key = jax.random.PRNGKey(0)
    path = tmp_path / "ckpt.pkl"

    def svi():
        return SVI(counting_model, AutoNormal(counting_model), numpyro.optim.Adam(0.05), Trace_ELBO(num_particles=2))

    ref = fit(svi(), key, 6, X, progress_bar=False)
    fit(svi(), key, 3, X, checkpoint_path=path, checkpoint_every=3, progress_bar=False)
    resumed = fit(svi(), key, 6, X, checkpoint_path=path, checkpoint_every=3, progress_bar=False)
    np.testing.assert_array_equal(resumed.losses, ref.losses)


def test_resume_in_a_process_that_hashes_otherwise_warns(tmp_path) -> None:
    key = jax.random.PRNGKey(0)
    path = tmp_path / "ckpt.pkl"
    fit(make_svi("adam"), key, 3, X, checkpoint_path=path, progress_bar=False)
    ckpt = load_checkpoint(path)
    assert "hash_probe" in ckpt.metadata
    save_checkpoint(path, ckpt.svi_state, losses=ckpt.losses, metadata={**ckpt.metadata, "hash_probe": -1})
    with pytest.warns(UserWarning, match="PYTHONHASHSEED"):
        fit(make_svi("adam"), key, 4, X, checkpoint_path=path, progress_bar=False)
