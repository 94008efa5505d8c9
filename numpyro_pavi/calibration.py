"""Calibration of the local posteriors with no refit: amortized simulation-based calibration.

Simulation-based calibration (SBC, Talts et al. 2018) draws a truth from the prior,
simulates data from it, computes the posterior and ranks the truth among posterior draws;
over many simulations the ranks are uniform exactly when the posterior is right. NumPyro's
``vsbc_diagnostic`` (Yao et al. 2018) applies it to a variational fit by refitting the guide
once per simulated data set. PAVI's guide needs no refit for the *local* posteriors: it has
no per-element parameters when its encodings come from the data (or when it has none), so
a simulated element gets its posterior from its data in a few forward passes.

:func:`local_calibration` checks, for each plate ``P`` holding latent sites:

1. draw the sites outside ``P`` (the globals, and the effects of crossed plates) from the
   guide's posterior on the training data;
2. with those held, simulate ``P``'s latent sites from the model's prior and every
   observation from the model (the data's shapes, covariates and rows per element stay
   those of training: the simulation is the model run on the training arguments);
3. draw the guide's posterior of ``P``'s sites for the simulated data, with the sites
   outside ``P`` held at the same values (:func:`~numpyro_pavi.sampling.sample_latents`'s
   ``fixed``), and rank each true coordinate among ``num_draws`` draws.

Repeated over independent draws of the held sites until ``num_groups`` elements of ``P``
are ranked. Ranks are taken in the guide's canonical unconstrained coordinates, a
monotone map of each scalar site, so they equal the ranks of the constrained values there.

What it checks: the guide's conditional ``q(P's sites | the rest, data)`` against the
model's, averaged over the guide's posterior of the rest: the amortization (flows,
encoders, Laplace bases) of the local posteriors. What it cannot check: the posterior of
the held sites themselves (a global posterior that is off is held, not tested; NumPyro's
``vsbc_diagnostic`` and the PSIS diagnostics of :mod:`numpyro_pavi.diagnostics` speak to
it), nor data unlike the model's own simulations (misspecification).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.primitives import Messenger

from .compiling import jit
from .sampling import sample_latents
from .structure import _is_factor, seeded_model

__all__ = ["LocalCalibration", "SiteCalibration", "local_calibration"]

#: Significance of the verdicts: a site is flagged when its ranks' uniformity test has a
#: p-value below it, or an interval's coverage is further from its level than the
#: binomial sd times ``COVERAGE_SDS``.
ALPHA: float = 0.01
COVERAGE_SDS: float = 3.0


class _Unobserve(Messenger):
    """Observed sample sites become sampled ones (factors stay), so running the model
    simulates its data; the model's code then sees the simulated values."""

    def process_message(self, msg):
        if msg["type"] == "sample" and msg["is_observed"] and not _is_factor(msg):
            msg["value"] = None
            msg["is_observed"] = False


def _chi2_sf(x: np.ndarray, dof: int) -> np.ndarray:
    """Survival function of the chi-square distribution (regularized upper gamma)."""
    return np.asarray(jax.scipy.special.gammaincc(dof / 2.0, np.asarray(x, np.float64) / 2.0))


@dataclass(frozen=True)
class SiteCalibration:
    """Calibration of one latent site's local posteriors.

    :ivar site: site name; ``plate``: the plate whose elements were simulated.
    :ivar pit: ``(n, d)`` randomized probability integral transforms ``(rank + V) / (L + 1)``
        (``V ~ U(0, 1)``, ``L`` draws): uniform on ``(0, 1)`` exactly when the guide is
        calibrated, for each of the ``d`` coordinates of the ``n`` simulated elements (``d``
        counts the site's coordinates times its cells in its other plates).
    :ivar ranks: ``(n, d)`` number of posterior draws below the truth (``0..L``).
    :ivar z: ``(n, d)`` ``(truth - posterior mean) / posterior sd``.
    :ivar num_draws: ``L``.
    """

    site: str
    plate: str
    pit: np.ndarray
    ranks: np.ndarray
    z: np.ndarray
    num_draws: int
    stats: dict = field(default_factory=dict)

    @staticmethod
    def build(site: str, plate: str, pit, ranks, z, num_draws: int) -> SiteCalibration:
        n, d = pit.shape
        bins = int(min(20, max(2, n // 10)))
        # chi-square test of uniformity per coordinate, Bonferroni over the coordinates
        counts = np.stack([np.histogram(pit[:, j], bins=bins, range=(0.0, 1.0))[0] for j in range(d)])
        expected = n / bins
        chi2 = np.sum((counts - expected) ** 2 / expected, axis=1)
        p = float(min(1.0, d * np.min(_chi2_sf(chi2, bins - 1))))
        cover = {c: float(np.mean(np.abs(pit - 0.5) <= c / 2)) for c in (0.5, 0.9)}
        stats = {
            "n": n,
            "coords": d,
            "p_uniform": p,
            "coverage_50": cover[0.5],
            "coverage_90": cover[0.9],
            "z_mean": float(np.mean(z)),
            "z_sd": float(np.std(z)),
            # an element's coordinates are correlated (a posterior correlation): the bias
            # test counts elements, each by the mean of its z's
            "z_element_sd": float(np.std(np.mean(z, axis=1))),
        }
        return SiteCalibration(site, plate, pit, ranks, z, num_draws, stats)

    @property
    def flagged(self) -> bool:
        """Whether the ranks reject calibration (see :data:`ALPHA`, :data:`COVERAGE_SDS`)."""
        return bool(self.problems())

    def problems(self) -> list[str]:
        """What is off, in words (empty when nothing is)."""
        s, out = self.stats, []
        for level in (0.5, 0.9):
            got = s[f"coverage_{int(100 * level)}"]
            tol = COVERAGE_SDS * math.sqrt(level * (1 - level) / s["n"])
            if got < level - tol:
                out.append(f"{int(100 * level)}% intervals cover {got:.3f} (too narrow or misplaced)")
            elif got > level + tol:
                out.append(f"{int(100 * level)}% intervals cover {got:.3f} (too wide)")
        if abs(s["z_mean"]) > COVERAGE_SDS * max(s["z_element_sd"], 1e-12) / math.sqrt(s["n"]):
            out.append(f"biased: mean z {s['z_mean']:+.3f}")
        if s["p_uniform"] < ALPHA and not out:
            out.append(f"ranks not uniform (p = {s['p_uniform']:.2g})")
        return out

    def verdict(self) -> str:
        """One line: the site, its plate and either ``calibrated`` or what is off."""
        s = self.stats
        head = f"{self.site} (plate '{self.plate}', {s['n']} simulated elements, {self.num_draws} draws): "
        nums = (
            f"p = {s['p_uniform']:.3g}, 50%/90% coverage {s['coverage_50']:.3f}/{s['coverage_90']:.3f}, "
            f"z {s['z_mean']:+.3f} +- {s['z_sd']:.3f}"
        )
        problems = self.problems()
        return head + ("calibrated; " if not problems else "MISCALIBRATED: " + "; ".join(problems) + "; ") + nums


@dataclass(frozen=True)
class LocalCalibration:
    """What :func:`local_calibration` returns: ``sites`` maps each calibrated latent site to
    its :class:`SiteCalibration` (a site of nested plates, calibrated once per chosen plate
    holding it, appears as ``site`` for the first of those plates calibrated, in the order
    ``plates`` lists them, and ``site@plate`` for the others)."""

    sites: dict

    def __getitem__(self, site: str) -> SiteCalibration:
        return self.sites[site]

    @property
    def flagged(self) -> list[str]:
        """Sites whose ranks reject calibration."""
        return [name for name, s in self.sites.items() if s.flagged]

    def summary(self) -> str:
        """One verdict line per site."""
        return "\n".join(s.verdict() for s in self.sites.values())

    def __str__(self) -> str:
        return self.summary()

    def table(self) -> dict:
        """``{site: statistics}`` (``n``, ``p_uniform``, ``coverage_50``, ``coverage_90``,
        ``z_mean``, ``z_sd``), e.g. for ``pandas.DataFrame(...).T``."""
        return {name: dict(s.stats) for name, s in self.sites.items()}

    def to_dataset(self):
        """The ranks as an ``xarray.Dataset`` (ArviZ's container): one variable per site,
        dims ``({plate}_sim, {site}_dim)``, the number of draws in ``attrs``."""
        import xarray as xr

        return xr.Dataset(
            {
                name: xr.DataArray(s.ranks, dims=(f"{s.plate}_sim", f"{name}_dim"))
                for name, s in self.sites.items()
            },
            attrs={"num_draws": {name: s.num_draws for name, s in self.sites.items()}},
        )

    def plot(self, sites=None, axes=None):
        """Per site: a histogram of the PITs (uniform when calibrated) and ArviZ's ECDF
        difference plot against the uniform with its simultaneous 99% band. Needs
        matplotlib. :return: the ``(len(sites), 2)`` axes."""
        import arviz as az
        import matplotlib.pyplot as plt

        names = list(self.sites) if sites is None else list(sites)
        if axes is None:
            _, axes = plt.subplots(len(names), 2, figsize=(8, 2.6 * len(names)), squeeze=False)
        for row, name in zip(np.atleast_2d(axes), names):
            s = self.sites[name]
            u = s.pit.reshape(-1)
            row[0].hist(u, bins=20, range=(0, 1), density=True, color="C0", alpha=0.7)
            row[0].axhline(1.0, color="k", lw=1)
            row[0].set_title(f"{name}: PIT histogram")
            az.plot_ecdf(
                u,
                cdf=lambda x: np.clip(x, 0.0, 1.0),
                difference=True,
                confidence_bands=True,
                ci_prob=0.99,
                eval_points=np.linspace(0, 1, 101),
                ax=row[1],
            )
            row[1].set_title(f"{name}: ECDF - uniform ({'flagged' if s.flagged else 'ok'})")
        return axes


def _canonical(site, value) -> jax.Array:
    """Site-layout constrained value -> canonical unconstrained ``(*grid, d)``."""
    return site.to_canonical(biject_to(site.support).inv(value))


def local_calibration(
    guide,
    params: dict,
    *args: Any,
    num_groups: int = 1000,
    plates: str | list[str] | None = None,
    num_draws: int = 100,
    rng_key: jax.Array | None = None,
    **kwargs: Any,
) -> LocalCalibration:
    """Simulation-based calibration of the guide's local posteriors with zero refits (see
    the module docstring).

    :param guide: a fitted :class:`~numpyro_pavi.AutoPAVI` whose calibrated plates have
        data-derived encodings or none (free encodings exist only for the training
        elements, so a simulated element has none: ``ValueError``).
    :param params: the fitted parameters (``svi.get_params(state)``).
    :param args: the model's training arguments (the simulations keep their shapes).
    :param num_groups: simulated elements per plate to rank (several simulations when the
        plate has fewer elements).
    :param plates: the plates to calibrate (default: every plate holding latent sites).
    :param num_draws: posterior draws per simulated element (``L``; ranks are ``0..L``).
    :param rng_key: JAX key (default ``PRNGKey(0)``).
    :return: a :class:`LocalCalibration`; ``print`` it for one verdict per site.
    """
    guide.check_params(params)
    plan = guide.plan
    structure = plan.structure
    # the training arguments when none are given, the guide's checks of the data, and the
    # full-plate trace, sizes, indices and bound arguments every replicate samples on
    inputs = guide.plate_inputs(*args, **kwargs)
    args, kwargs = inputs.model_args
    holding = [p for p in structure.plates if any(p in s.plates for s in structure.latent.values())]
    if plates is None:
        plates = holding
    plates = [plates] if isinstance(plates, str) else list(plates)
    for p in plates:
        if p not in holding:
            raise ValueError(
                f"Plate '{p}' holds no latent site of the model (plates that do: {holding}): nothing "
                "to calibrate there."
            )
        free = [key for key in plan.sources if p in key and plan.has_free(key)]
        if free:
            raise ValueError(
                f"Plate '{p}' has free (learned, per-element) encodings: a simulated element has "
                "none, so its posterior cannot be computed without retraining. Calibrate a guide "
                "with encoding='set' (or one whose plate needs no encoding)."
            )
    if num_groups < 1 or num_draws < 2:
        raise ValueError(f"num_groups must be >= 1 and num_draws >= 2 (got {num_groups}, {num_draws}).")
    key = jax.random.PRNGKey(0) if rng_key is None else rng_key

    def full_trace(model, data, k):
        with handlers.block():
            return handlers.trace(seeded_model(model, k, data, full_plates=True)).get_trace(*args, **kwargs)

    sizes, indices, train, bound = inputs.sizes, inputs.indices, inputs.trace, inputs.bound
    if train is None:  # a model without arguments: its observed values are its defaults
        train = full_trace(plan.model, {}, 0)
    observed = [n for n, s in train.items() if s["type"] == "sample" and s["is_observed"] and not _is_factor(s)]
    model_args = (args, kwargs)

    def replicate(k, plate, local):
        k_rest, k_sim, k_draws, k_pit = jax.random.split(k, 4)
        # 1. the sites outside the plate, from the guide's posterior on the training data
        values, unc, _ = sample_latents(plan, params, k_rest, indices, train, sizes, bound, model_args=model_args)
        held = {n: values[n] for n in structure.latent if n not in local}
        # 2. the plate's sites from the prior given them, and new data
        sim = full_trace(_Unobserve(plan.model), held, k_sim)
        truth = {n: _canonical(structure.latent[n], sim[n]["value"]) for n in local}
        new_obs = {n: sim[n]["value"] for n in observed}
        sim_trace = {n: ({**s, "value": new_obs[n]} if n in new_obs else s) for n, s in train.items()}
        sim_plan = dataclasses.replace(plan, model=handlers.substitute(plan.model, data=new_obs))
        fixed = {n: unc[n] for n in held}

        # 3. the guide's posterior of the plate's sites given the rest, on the new data
        def one(kd):
            _, u, _ = sample_latents(
                sim_plan, params, kd, indices, sim_trace, sizes, bound, model_args=model_args,
                chunk_size=guide.chunk_size, fixed=fixed,
            )  # fmt: skip
            return {n: (u[n] < truth[n], u[n], u[n] ** 2) for n in local}

        def fold(acc, kd):
            new = one(kd)
            return jax.tree.map(jnp.add, acc, new), None

        zero = {n: (jnp.zeros(truth[n].shape, jnp.int32), jnp.zeros_like(truth[n]), jnp.zeros_like(truth[n])) for n in local}
        acc, _ = jax.lax.scan(fold, zero, jax.random.split(k_draws, num_draws))
        out = {}
        for i, n in enumerate(local):
            below, s1, s2 = acc[n]
            mean = s1 / num_draws
            sd = jnp.sqrt(jnp.maximum(s2 / num_draws - mean**2, 0.0) * num_draws / (num_draws - 1))
            v = jax.random.uniform(jax.random.fold_in(k_pit, i), below.shape)
            out[n] = (below, (below + v) / (num_draws + 1), (truth[n] - mean) / jnp.maximum(sd, 1e-30))
        return out

    result = {}
    for plate in plates:
        local = [n for n, s in structure.latent.items() if plate in s.plates]
        size = sizes[plate]
        reps = math.ceil(num_groups / size)
        run = jit(lambda k, plate=plate, local=local: replicate(k, plate, local))
        parts = []
        key, sub = jax.random.split(key)
        for r in range(reps):
            parts.append(jax.device_get(run(jax.random.fold_in(sub, r))))
        key, pick = jax.random.split(key)
        order = np.asarray(jax.random.permutation(pick, reps * size))[:num_groups]
        for n in local:
            site = structure.latent[n]
            axis = site.plates.index(plate)

            def gather(j, site=site, axis=axis):
                # (reps * size, other cells * d) along the calibrated plate, then the chosen ones
                arr = np.concatenate([np.moveaxis(np.asarray(p[n][j]), axis, 0) for p in parts], 0)
                return arr[order].reshape(len(order), -1)

            ranks, pit, z = gather(0), gather(1), gather(2)
            # a site of nested plates is calibrated once per chosen plate holding it
            result[n if n not in result else f"{n}@{plate}"] = SiteCalibration.build(n, plate, pit, ranks, z, num_draws)
    return LocalCalibration(result)
