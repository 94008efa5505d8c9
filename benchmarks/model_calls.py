"""How often each guide runs the user's model: in ``svi.init``, per traced training step and
in ``sample_posterior``, plus the compile time of the first ``jit(svi.update)`` call.

A model that counts its own calls (Python executions: traces under ``jit``, runs when eager)
is fitted with NumPyro's ``AutoNormal`` and three AutoPAVI configurations, on the Gaussian
random-effects model with subsampling (``G`` groups, ``M`` observations each, ``B`` groups per
step). Each guide gets a fresh model, so compiled programs are not shared between rows.

Examples::

    python benchmarks/model_calls.py --quick
    python benchmarks/model_calls.py --G 2000 --B 64
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common
import jax
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI

GUIDES = {
    "AutoNormal": lambda m: AutoNormal(m),
    "AutoPAVI(laplace=False)": lambda m: AutoPAVI(m, laplace=False),
    "AutoPAVI(encoding='free', laplace=False)": lambda m: AutoPAVI(m, encoding="free", laplace=False),
    "AutoPAVI()": lambda m: AutoPAVI(m),
}


def counting_model(B: int):
    calls = {"n": 0}

    def model(y):
        calls["n"] += 1
        mu = numpyro.sample("mu", dist.Normal(0.0, 3.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("groups", y.shape[0], subsample_size=B) as idx:
            b = numpyro.sample("b", dist.Normal(mu, tau))
            with numpyro.plate("obs", y.shape[1]):
                numpyro.sample("y", dist.Normal(b, 1.0), obs=y[idx].T)

    return model, calls


def measure(make, y, B: int) -> dict:
    model, calls = counting_model(B)
    guide = make(model)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(0), y)
    init_s, init_calls = time.perf_counter() - t0, calls["n"]
    calls["n"] = 0
    update = jax.jit(svi.update)
    t0 = time.perf_counter()
    state, loss = update(state, y)
    jax.block_until_ready(loss)
    compile_s, step_calls = time.perf_counter() - t0, calls["n"]
    calls["n"] = 0
    t0 = time.perf_counter()
    for _ in range(20):
        state, loss = update(state, y)
    jax.block_until_ready(loss)
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    retraced = calls["n"]
    calls["n"] = 0
    if isinstance(guide, AutoPAVI):
        guide.sample_posterior(jax.random.PRNGKey(1), svi.get_params(state), y, sample_shape=(2,))
    return {
        "svi_init_model_calls": init_calls,
        "step_traces": step_calls,
        "retraces_in_20_steps": retraced,
        "sample_posterior_model_calls": calls["n"] if isinstance(guide, AutoPAVI) else None,
        "svi_init_s": init_s,
        "first_step_with_compile_s": compile_s,
        "step_ms": step_ms,
    }


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser(__doc__)
    p.add_argument("--G", type=int, default=200, help="groups")
    p.add_argument("--M", type=int, default=5, help="observations per group")
    p.add_argument("--B", type=int, default=32, help="groups per step")
    p.add_argument("--quick", action="store_true", help="G=16, M=3, B=4")
    p.add_argument("--out", default="benchmarks/results/model_calls.json")
    args = p.parse_args(argv)
    if args.quick:
        args.G, args.M, args.B = 16, 3, 4
    t_start = time.perf_counter()
    info = _common.machine_info()
    y = jax.random.normal(jax.random.PRNGKey(1), (args.G, args.M))
    rows = {}
    for name, make in GUIDES.items():
        rows[name] = measure(make, y, args.B)
        r = rows[name]
        print(
            f"{name:42s} init={r['svi_init_model_calls']} step={r['step_traces']} "
            f"sample_posterior={r['sample_posterior_model_calls']} compile={r['first_step_with_compile_s']:.2f}s "
            f"step={r['step_ms']:.2f}ms",
            flush=True,
        )
    out = _common.record("model_calls", __file__, argv, args, info, t_start, guides=rows)
    _common.write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
