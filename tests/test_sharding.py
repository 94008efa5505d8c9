"""Data-parallel training (:mod:`numpyro_pavi.sharding`): the recipe on simulated CPU devices
equals the single-device run, and bad layouts get clear errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest

from numpyro_pavi.examples.models import random_effects
from numpyro_pavi.sharding import data_mesh, shard_data, shard_plates

# slow tier: several simulated devices and two processes
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_four_simulated_devices_match_one_device(tmp_path):
    """``benchmarks/multidevice.py --quick`` on 4 simulated CPU devices (a fresh process: the
    device count is fixed when JAX starts): same losses and parameters as on 1 device, and the
    compiled program holds a quarter of the batch per device (the work is split)."""
    out = tmp_path / "md.json"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "multidevice.py"), "--quick", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
        check=False,  # the assertion below shows the output
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {r["devices"]: r for r in data["rows"]}
    assert set(rows) == {1, 4} and data["agree"]
    assert rows[4]["per_device_batch_in_program"] == 64 // 4
    assert rows[4]["loss_max_rel_diff_vs_first"] < 1e-4
    assert rows[4]["grad_max_diff_vs_first"] < 1e-3  # a Newton trust step may flip on float noise
    assert rows[4]["params_max_diff_vs_first"] < 1e-2  # 11 Adam steps amplify float error
    assert np.isfinite(rows[4]["s_per_step"]) and rows[4]["s_per_step"] > 0


def test_shard_plates_leaves_one_device_results_unchanged():
    """On a one-device mesh the handler only annotates: the same trace values."""
    x = jax.random.normal(jax.random.PRNGKey(0), (8, 3, 2))
    mesh = data_mesh(jax.devices()[:1])
    tr = numpyro.handlers.trace(numpyro.handlers.seed(shard_plates(random_effects, mesh, "groups"), 1))
    got = tr.get_trace(shard_data(x, mesh), subsample_size=4)
    ref = numpyro.handlers.trace(numpyro.handlers.seed(random_effects, 1)).get_trace(x, subsample_size=4)
    for name in ("groups", "mu_g", "x"):
        np.testing.assert_array_equal(np.asarray(got[name]["value"]), np.asarray(ref[name]["value"]))


def test_sharding_errors_name_the_plate_and_the_fix():
    mesh = data_mesh(jax.devices()[:1])

    class Fake:  # a three-device mesh is needed to see the divisibility error on one device
        devices = np.empty(3)
        axis_names = ("data",)

    handler = shard_plates(random_effects, mesh, ["groups"])
    handler.mesh = Fake()
    traced = jax.jit(lambda x: numpyro.handlers.seed(handler, 0)(x, subsample_size=4))
    with pytest.raises(ValueError, match="Plate 'groups' has 4 elements per call, not a multiple of the 3"):
        traced(jnp.zeros((8, 3, 2)))
    # eager calls (the guide's setup) are not partitioned, so they do not check either
    numpyro.handlers.seed(handler, 0)(jnp.zeros((8, 3, 2)), subsample_size=4)
    with pytest.raises(ValueError, match="needs a mesh"):
        shard_plates(random_effects, None, ["groups"])
    with pytest.raises(ValueError, match="needs the names of the plates"):
        shard_plates(random_effects, mesh, [])
    with pytest.raises(ValueError, match="one-axis jax.sharding.Mesh"):
        shard_data(np.zeros((4, 2)), "not a mesh")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_device(tmp_path):
    """The multi-host path on one machine: two processes (``jax.distributed``, gloo
    collectives) of two CPU devices each, every process holding half of the groups, give the
    losses of one process on one device."""
    worker = os.path.join(REPO, "tests", "multihost_worker.py")

    def start(pid, nproc, devices, port, seed="0"):
        env = {
            **os.environ,
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu",
            "PYTHONHASHSEED": seed,
        }
        out = tmp_path / f"out_{nproc}_{pid}_{seed}.json"
        cmd = [sys.executable, worker, str(pid), str(nproc), str(port), str(out)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out

    port = _free_port()
    runs = [start(0, 2, 2, port), start(1, 2, 2, port), start(0, 1, 1, 0)]
    for proc, _ in runs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log[-3000:]
    (p0, p1, single) = (json.loads(out.read_text()) for _, out in runs)
    assert p0["processes"] == 2 and p0["devices"] == 4 and single["devices"] == 1
    # one global program; each process reads its own replica of the loss
    np.testing.assert_allclose(p0["losses"], p1["losses"], rtol=1e-6)
    np.testing.assert_allclose(p0["losses"], single["losses"], rtol=1e-5)

    # distinct hash seeds would trace different programs: replicate() refuses, naming the fix
    port = _free_port()
    runs = [start(0, 2, 2, port, seed="1"), start(1, 2, 2, port, seed="2")]
    for proc, _ in runs:
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode != 0 and "PYTHONHASHSEED=0 python" in log, log[-3000:]


def test_replicate_carries_typed_keys():
    """A state holding a typed key (``jax.random.key``) replicates: its raw data travels."""
    from numpyro_pavi.sharding import data_mesh, replicate

    out = replicate({"key": jax.random.key(3), "x": np.arange(3.0)}, data_mesh())
    assert jax.random.key_impl(out["key"]) == jax.random.key_impl(jax.random.key(3))
    np.testing.assert_array_equal(jax.random.key_data(out["key"]), jax.random.key_data(jax.random.key(3)))
    np.testing.assert_array_equal(out["x"], np.arange(3.0))
