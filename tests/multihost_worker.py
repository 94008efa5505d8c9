"""One process of a data-parallel run (``tests/test_sharding.py`` starts it): ``argv`` is
``process_id num_processes port out.json``; with one process there is no coordinator."""

import json
import sys

import jax

pid, nproc, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.models import random_effects, simulate_random_effects
from numpyro_pavi.sharding import data_mesh, replicate, shard_data, shard_plates

BATCH = 16


def model(x, subsample_size):
    random_effects(x, subsample_size=subsample_size)


x = np.asarray(simulate_random_effects(jax.random.PRNGKey(0), 64, 5))
mesh = data_mesh()
rows = len(x) // jax.process_count()
x_dev = shard_data(x[pid * rows : (pid + 1) * rows], mesh)  # this process's groups only
sharded = shard_plates(model, mesh, ["groups"])
guide = AutoPAVI(sharded)
svi = SVI(sharded, guide, optax.adam(1e-3), Trace_ELBO())
state = replicate(svi.init(jax.random.PRNGKey(1), x, BATCH), mesh)  # setup on the host data
update = jax.jit(svi.update, static_argnums=2)
losses = []
for _ in range(5):
    state, loss = update(state, x_dev, BATCH)
    losses.append(float(loss))
with open(out, "w") as f:
    json.dump({"devices": len(jax.devices()), "processes": jax.process_count(), "losses": losses}, f)
