"""Data-parallel training over every device, with JAX's own sharding machinery.

A plate's subsample is split over the devices of a one-axis :class:`jax.sharding.Mesh`; the
shared parameters (flows, encoders, globals) stay replicated. The recipe::

    mesh = data_mesh()                                    # all devices, axis "data"
    model = shard_plates(model, mesh, ["groups"])         # split the groups subsample
    x = shard_data(x, mesh)                               # the data's group axis, split alike
    guide = AutoPAVI(model)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), x)
    update = jax.jit(svi.update, compiler_options=compiler_options())  # numpyro_pavi.compiling
    for _ in range(num_steps):
        state, loss = update(state, x)

Why it works: :func:`shard_plates` constrains the plate's indices (``B`` per step) to be split
over the mesh axis. JAX's partitioner propagates that split to everything computed per
element from them: the gathered data ``x[idx]``, the guide's encodings, Laplace bases and
flows, the log-likelihood terms. The gradients of the replicated parameters are sums over
elements, which it turns into per-device sums plus an all-reduce. The result equals the
single-device run up to float summation order (``benchmarks/multidevice.py`` measures both).

Multi-host: call ``jax.distributed.initialize()`` in every process before anything else;
``jax.devices()`` then lists the devices of all processes, so :func:`data_mesh` spans them,
and :func:`shard_data` builds the global array from each process's own rows (pass each
process its slice of the plate's elements, ``x.shape[axis] = N / jax.process_count()``).
Every process runs the same script with the same keys; ``svi.init`` runs eagerly on host
data (the guide's setup reads it: every process passes the same full data, or a
representative subset with the same plate sizes) and :func:`replicate` turns its state into
global arrays::

    state = replicate(svi.init(key, x_host, B), mesh)
    state, loss = update(state, shard_data(x_rows_of_this_process, mesh), B)

Start every process with the same ``PYTHONHASHSEED``: NumPyro's ``Trace_ELBO`` orders
its terms by a ``set`` of site names, so with different hash seeds the processes compile
different programs (each one then reports the loss of its own rows: 2 of 6 two-process
runs with distinct seeds, 2 of 4 with the seed unset); :func:`replicate` checks it
(:func:`check_hash_seeds`) and raises naming the fix. ``tests/test_sharding.py`` runs two
processes of two CPU devices each (gloo collectives, ``PYTHONHASHSEED=0``) and gets the
losses of one process with one device, and with distinct seeds gets the error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from numpyro.primitives import Messenger

__all__ = ["check_hash_seeds", "data_mesh", "replicate", "shard_data", "shard_plates", "string_hash_probe"]


def data_mesh(devices: Sequence | None = None, axis: str = "data") -> Mesh:
    """A one-axis mesh over ``devices`` (default: ``jax.devices()``, every process's devices)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device.")
    return Mesh(np.asarray(devices), (axis,))


def _axis_name(mesh: Mesh) -> str:
    if not isinstance(mesh, Mesh) or len(mesh.axis_names) != 1:
        raise ValueError(f"expected a one-axis jax.sharding.Mesh (see data_mesh()), got {mesh!r}.")
    return mesh.axis_names[0]


def shard_data(x, mesh: Mesh, axis: int = 0) -> jax.Array:
    """``x`` split along ``axis`` (the plate's axis in the data) over the mesh's devices.

    With several processes (``jax.distributed``), ``x`` holds this process's rows and the
    result is the global array of every process's rows, in process order.

    :param x: array ``(..., N, ...)`` with ``N`` (at ``axis``) divisible by the device count.
    :return: a ``jax.Array`` with a ``NamedSharding`` over ``mesh``.
    """
    name = _axis_name(mesh)
    x = np.asarray(x)
    axis = axis % x.ndim
    spec = PartitionSpec(*([None] * axis), name)
    sharding = NamedSharding(mesh, spec)
    n = mesh.devices.size // jax.process_count()  # this process's devices
    if x.shape[axis] % n:
        raise ValueError(
            f"Axis {axis} of the data has {x.shape[axis]} elements, not a multiple of the {n} devices: "
            "pad the plate's elements (and mask them out of the model) or use fewer devices."
        )
    # one code path for one and many processes: with one, the local rows are all rows
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))


def replicate(tree, mesh: Mesh):
    """Every array of ``tree`` (e.g. the SVI state) replicated on all of ``mesh``'s devices.

    One process needs no call (``jax.jit`` replicates uncommitted inputs itself); with
    several (``jax.distributed``), jitted programs take global arrays only, and each process
    must hold the same values (the same ``svi.init`` key and data).
    """
    check_hash_seeds()
    sharding = NamedSharding(mesh, PartitionSpec())

    def one(a):
        if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            # a typed key (jax.random.key) has no NumPy form: its raw data travels
            return jax.random.wrap_key_data(one(jax.random.key_data(a)), impl=jax.random.key_impl(a))
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return jax.tree.map(one, tree)


def string_hash_probe() -> int:
    """This process's hash of a fixed string: equal between processes (and between a run and
    its resumption) exactly when they order a ``set`` of site names alike."""
    return hash("numpyro-pavi hash-seed probe") & 0x7FFFFFFF


def check_hash_seeds() -> None:
    """Raise unless every process of a ``jax.distributed`` run hashes strings alike.

    NumPyro's ``Trace_ELBO`` adds its per-site terms in the order of a ``set`` of site
    names, which follows Python's string hashes: processes started with different (or
    unset) ``PYTHONHASHSEED`` trace different programs, and the collectives then combine
    programs that do not match (two processes reported each its own loss in 2 of 6 runs
    with distinct seeds and 2 of 4 with the seed unset). One process: nothing to check.
    """
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    mine = np.int32(string_hash_probe())
    every = np.asarray(multihost_utils.process_allgather(mine)).ravel()
    if len(set(every.tolist())) > 1:
        seed = os.environ.get("PYTHONHASHSEED", "unset")
        raise RuntimeError(
            f"The {jax.process_count()} processes of this run hash strings differently (this one's "
            f"PYTHONHASHSEED is {seed}): NumPyro's Trace_ELBO sums its terms in the order of a set of "
            "site names, so each process would compile a different program and the collectives "
            "would mix them. Start every process with the same hash seed, e.g. "
            "PYTHONHASHSEED=0 python train.py."
        )


class shard_plates(Messenger):
    """Effect handler: split the subsample indices of ``plates`` over ``mesh``'s devices.

    Wrap the model once and give the wrapped model to both :class:`~numpyro_pavi.AutoPAVI`
    and ``SVI`` (the guide reads its plates from the model). Under ``jax.jit``, every
    per-element computation then runs on the device that holds the element.

    :param fn: the model.
    :param mesh: a one-axis mesh (:func:`data_mesh`).
    :param plates: names of the plates to split (usually the one subsampled plate).
    """

    def __init__(self, fn=None, mesh: Mesh | None = None, plates: Iterable[str] = ()):
        if mesh is None:
            raise ValueError("shard_plates needs a mesh: shard_plates(model, data_mesh(), ['groups']).")
        if isinstance(plates, str):
            plates = [plates]
        self.mesh, self.plates = mesh, frozenset(plates)
        self.sharding = NamedSharding(mesh, PartitionSpec(_axis_name(mesh)))
        if not self.plates:
            raise ValueError("shard_plates needs the names of the plates to split, e.g. ['groups'].")
        super().__init__(fn)

    def postprocess_message(self, msg: dict) -> None:
        if msg["type"] != "plate" or msg["name"] not in self.plates:
            return
        if not isinstance(msg["value"], jax.core.Tracer):
            # eager calls (the guide's setup in svi.init, which reads data on the host) stay
            # on one device; only traced (jitted) programs are partitioned
            return
        n, size = self.mesh.devices.size, msg["value"].shape[0]
        if size % n and size == msg["args"][0]:
            return  # the full plate (posterior sampling over all elements): left to the partitioner
        if size % n:
            raise ValueError(
                f"Plate '{msg['name']}' has {size} elements per call, not a multiple of the {n} devices "
                f"it is split over: choose a subsample_size divisible by {n}."
            )
        msg["value"] = jax.lax.with_sharding_constraint(msg["value"], self.sharding)
