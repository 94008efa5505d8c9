"""Did the variational fit work? Pareto-smoothed importance sampling (PSIS) diagnostics.

:func:`psis_khat` implements the check of Yao, Vehtari, Simpson and Gelman (2018),
"Yes, but did it work?: Evaluating variational inference": draw ``S`` samples
``z_s ~ q`` over the **full** plates, form the importance log weights
``log w_s = log p(x, z_s) - log q(z_s)`` and fit a generalized Pareto distribution to the
largest weights. Its shape estimate ``k-hat`` says how heavy the right tail of the weights
is, i.e. how much posterior mass ``q`` misses:

==================  =========================================================================
``k-hat < 0.5``     good: the importance weights have finite variance, ``q`` is close to the
                    posterior and importance sampling (PSIS) estimates from it are reliable.
``0.5 <= k < 0.7``  ok-ish: finite mean but infinite variance; PSIS still works but converges
                    slowly; ``q`` is a usable but rough approximation.
``k-hat >= 0.7``    unreliable: the tail is too heavy for PSIS to correct; ``q`` misses
                    posterior mass (too narrow, wrong location or wrong dependence) and
                    posterior summaries from it should not be trusted.
==================  =========================================================================

k-hat is only a one-sided check: it detects a ``q`` that is too narrow or misplaced, but a
``q`` that is too wide gives small k-hat with a low effective sample size (see
:attr:`PSISResult.ess`).

Per-element (local) k-hat
-------------------------
In a model with ``N`` plate elements the global weight is a sum of ``N`` local terms and its
k-hat grows with ``N`` even when every local factor is fine, so the global number alone does
not say *where* the guide fails. For each plate ``P`` holding latent sites,
:func:`psis_khat` therefore also reports one k-hat per element ``n`` of ``P``, computed
from the local log weight of "everything indexed by ``n`` in ``P``":

    ``log w_s[n] = sum of log p(site at n | its sampled parents)``
    ``           - sum of log q(latent site at n | its sampled parents)``

where the first sum runs over the sample sites (latent and observed) that sit in ``P``,
summed over their other plates and event dims, and the second over the latent sites in
``P``. Notes:

* For nested plates (``sessions`` inside ``subjects``) element ``n`` of the inner plate
  aggregates that element over all elements of the outer plates.
* Observations that reach a plate's elements only through an index array (as in
  :func:`numpyro_pavi.examples.models.ragged_groups`, where ``y`` sits in an ``obs`` plate and picks
  its group with ``a[group]``) are not in the group plate, so they do not enter that plate's
  local weights: the groups' k-hat then compares ``q`` with the prior only. Such a model's
  ``obs`` plate holds no latent sites and gets no local k-hat either.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import compute_log_probs

from .calibration import LocalCalibration, SiteCalibration, local_calibration
from .structure import full_indices, plate_sizes, seeded_model

__all__ = [
    "LocalCalibration",
    "PSISResult",
    "SiteCalibration",
    "full_plate_sizes",
    "khat_category",
    "local_calibration",
    "psis_diagnostic",
    "psis_khat",
]

#: Thresholds of :func:`khat_category`.
KHAT_GOOD: float = 0.5
KHAT_BAD: float = 0.7

#: NumPyro's warning when a plate's substituted indices disagree with its subsample_size:
#: expected (and harmless) whenever a subsampled model is evaluated over its full plates.
_SUBSAMPLE_WARNING = "subsample_size does not match"


def khat_category(khat: float) -> str:
    """``"good"`` (k < 0.5), ``"ok"`` (0.5 <= k < 0.7) or ``"bad"`` (k >= 0.7 or not finite)."""
    if not np.isfinite(khat) or khat >= KHAT_BAD:
        return "bad"
    return "good" if khat < KHAT_GOOD else "ok"


_VERDICT = {
    "good": "good: q is close to the posterior, importance sampling is reliable",
    "ok": "ok-ish: usable, but importance sampling converges slowly",
    "bad": "unreliable: q misses posterior mass",
}


@dataclass(frozen=True)
class PSISResult:
    """Result of :func:`psis_khat`.

    :param khat: Pareto k-hat of the global log weights (see the module docstring).
    :param khat_per_element: ``{plate: (size,)}`` k-hat of each element's local weights,
        for every plate that holds latent sites (empty when not computed).
    :param log_weights: raw log weights ``log p(x, z_s) - log q(z_s)``, shape ``(S,)``.
    :param local_log_weights: ``{plate: (S, size)}`` the per-element local log weights the
        per-element k-hat is computed from.
    :param smoothed_log_weights: Pareto-smoothed, normalized log weights, shape ``(S,)``
        (``logsumexp == 0``).
    :param ess: PSIS effective sample size ``1 / sum(w_s^2)`` of the normalized smoothed
        weights, in ``[1, S]``.
    :param log_evidence: importance sampling estimate ``log mean_s exp(log w_s)`` of
        ``log p(x)`` (a stochastic lower bound in expectation).
    :param elbo: ``mean_s log w_s``, the Monte Carlo ELBO over the full plates.
    """

    khat: float
    khat_per_element: dict[str, np.ndarray] = field(default_factory=dict)
    log_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    local_log_weights: dict[str, np.ndarray] = field(default_factory=dict)
    smoothed_log_weights: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ess: float = float("nan")
    log_evidence: float = float("nan")
    elbo: float = float("nan")

    @property
    def num_samples(self) -> int:
        """Number of importance samples ``S``."""
        return int(np.size(self.log_weights))

    def summary(self) -> str:
        """A short human-readable report: global k-hat, ESS, and the worst local elements."""
        lines = [
            f"PSIS diagnostic ({self.num_samples} samples from q, full plates)",
            f"  k-hat  = {self.khat:.3f}  ({_VERDICT[khat_category(self.khat)]})",
            f"  ESS    = {self.ess:.1f} / {self.num_samples}",
            f"  ELBO   = {self.elbo:.3f}",
            f"  log p(x) (IS estimate) = {self.log_evidence:.3f}",
        ]
        for plate, k in self.khat_per_element.items():
            cats = [khat_category(float(v)) for v in k]
            worst = int(np.nanargmax(np.where(np.isfinite(k), k, np.inf))) if k.size else -1
            lines.append(
                f"  plate '{plate}' ({k.size} elements): max k-hat {k[worst]:.3f} (element {worst}); "
                f"good {cats.count('good')}, ok {cats.count('ok')}, bad {cats.count('bad')}"
            )
        lines.append("  thresholds: k < 0.5 good, 0.5-0.7 ok-ish, >= 0.7 unreliable (Yao et al. 2018)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _psislw(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``arviz.psislw`` on ``(..., S)`` float64 log weights: smoothed log weights and k-hat ``(...)``.

    arviz 0.23 returns ``(smoothed normalized log weights (..., S), k-hat (...))``; it warns
    on very few samples, which the caller reports through k-hat itself.
    """
    import arviz as az  # deferred: arviz is slow to import and only needed here

    lw = np.asarray(log_weights, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        smoothed, khat = az.psislw(lw)
    return np.asarray(smoothed), np.asarray(khat, dtype=np.float64)


def _plate_axis(site: dict, plate: str, log_prob: jax.Array) -> int | None:
    """Axis of ``plate`` in a site's batch-shaped ``log_prob``, or None when not in it."""
    for frame in site["cond_indep_stack"]:
        if frame.name == plate:
            return jnp.ndim(log_prob) + frame.dim
    return None


def _per_element(x: jax.Array, axis: int, size: int, what: str) -> jax.Array:
    """Sum ``x`` over every axis but ``axis``: shape ``(size,)``."""
    if axis < 0 or x.shape[axis] != size:
        raise ValueError(
            f"{what}: expected {size} plate elements on axis {axis} of shape {x.shape}; "
            "psis_khat needs every site in a plate broadcast to the plate's full size."
        )
    return jnp.sum(jnp.moveaxis(x, axis, 0).reshape(size, -1), -1)


def full_plate_sizes(model: Any, structure: Any, args: tuple, kwargs: dict) -> dict[str, int]:
    """Full size of every plate of ``structure`` for this call's arguments.

    Read from a blocked trace of the model rather than from ``structure``: a guide with set
    encodings may be evaluated on new data whose plates have other sizes than in training.
    """
    with handlers.block():
        trace = handlers.trace(seeded_model(model, 0)).get_trace(*args, **kwargs)
    sizes = {name: info.size for name, info in structure.plates.items()}
    now = plate_sizes(trace)
    sizes.update({name: now[name] for name in sizes if name in now})
    return sizes


def psis_khat(
    guide: Any,
    params: dict,
    *args: Any,
    num_samples: int = 1000,
    rng_key: jax.Array | None = None,
    per_element: bool = True,
    **kwargs: Any,
) -> PSISResult:
    """PSIS k-hat of a fitted :class:`~numpyro_pavi.AutoPAVI` over the full plates.

    Samples ``(S = num_samples)`` latents over the full plates with
    ``guide.sample_with_log_prob``, evaluates ``log p(x, z_s)`` of the model with every plate
    forced to its full index range (which switches off any subsampling, so no
    ``size / subsample_size`` scaling enters), and fits PSIS to ``log p - log q``. The model
    is evaluated one sample at a time (``lax.map``), so beyond the ``S`` samples themselves
    memory holds one full-plate trace of the model.

    Interpretation (Yao et al. 2018): ``k-hat < 0.5`` good (q close to the posterior,
    importance sampling reliable); ``0.5-0.7`` ok-ish (slow convergence); ``> 0.7``
    unreliable: the guide misses posterior mass. See the module docstring, also for the
    per-element k-hat.

    The log weights are sums over every plate element, computed in JAX's default precision:
    for plates of ~10^5 elements and more, float32 round-off in ``log p`` reaches ~0.1,
    enough to blur k-hat; enable ``jax_enable_x64`` there.

    :param guide: a set-up ``AutoPAVI`` (run SVI, or call it once, first); any guide with
        ``sample_with_log_prob(rng_key, params, *args, sample_shape=..., **kwargs)``,
        ``structure`` and ``model`` works.
    :param params: ``svi.get_params(state)``.
    :param args, kwargs: the model's arguments (the data).
    :param num_samples: ``S``; PSIS needs a few hundred for a stable k-hat.
    :param rng_key: PRNG key (default ``PRNGKey(0)``).
    :param per_element: also compute the per-element k-hat of every plate holding latent
        sites (one PSIS fit per element, a Python loop in arviz: turn off for huge plates).
    :return: a :class:`PSISResult`.
    """
    if getattr(guide, "structure", None) is None:
        raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
    if num_samples < 2:
        raise ValueError(f"num_samples must be at least 2, got {num_samples}.")
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    structure = guide.structure
    sizes = full_plate_sizes(guide.model, structure, args, kwargs)
    full = full_indices(sizes)
    # Substituting the plates' full index ranges overrides any subsample_size in the model.
    model = handlers.substitute(handlers.seed(guide.model, 0), data=full)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SUBSAMPLE_WARNING)
        values, log_q = guide.sample_with_log_prob(rng_key, params, *args, sample_shape=(num_samples,), **kwargs)

    local = [p for p in structure.plates if any(p in s.plates for s in structure.latent.values())]
    local = local if per_element else []

    def one(inputs: tuple[dict, dict]) -> tuple[jax.Array, dict[str, jax.Array]]:
        value, logq = inputs
        with warnings.catch_warnings():
            # the model's subsample_size disagrees with the full indices on purpose
            warnings.filterwarnings("ignore", message=_SUBSAMPLE_WARNING)
            log_probs, trace = compute_log_probs(model, args, kwargs, value, sum_log_prob=False)
        log_p = sum((jnp.sum(lp) for lp in log_probs.values()), start=jnp.zeros(()))
        log_q_total = sum((jnp.sum(lq) for lq in logq.values()), start=jnp.zeros(()))
        per_plate = {}
        for plate in local:
            acc = jnp.zeros(sizes[plate])
            for name, lp in log_probs.items():
                axis = _plate_axis(trace[name], plate, lp)
                if axis is not None:
                    acc = acc + _per_element(lp, axis, sizes[plate], f"log p of site '{name}'")
            for name, site in structure.latent.items():
                if plate in site.plates:
                    axis = site.plates.index(plate)
                    acc = acc - _per_element(logq[name], axis, sizes[plate], f"log q of site '{name}'")
            per_plate[plate] = acc
        return log_p - log_q_total, per_plate

    log_w, local_w = jax.lax.map(one, (values, log_q))
    log_w = np.asarray(log_w, dtype=np.float64)
    if not np.all(np.isfinite(log_w)):
        bad = int(np.sum(~np.isfinite(log_w)))
        warnings.warn(
            f"{bad} of {num_samples} log weights are not finite (q puts mass where p has none, "
            "or the model's log density overflowed); k-hat is then meaningless.",
            stacklevel=2,
        )
    smoothed, khat = _psislw(log_w)
    local_w = {p: np.asarray(local_w[p], dtype=np.float64) for p in local}
    khat_local = {p: _psislw(local_w[p].T)[1].reshape(sizes[p]) for p in local}
    return PSISResult(
        khat=float(khat),
        khat_per_element=khat_local,
        log_weights=log_w,
        local_log_weights=local_w,
        smoothed_log_weights=smoothed,
        ess=float(1.0 / np.sum(np.exp(2.0 * smoothed))),
        log_evidence=float(np.logaddexp.reduce(log_w) - math.log(num_samples)),
        elbo=float(np.mean(log_w)),
    )


def psis_diagnostic(guide: Any, params: dict, *args: Any, **kwargs: Any) -> PSISResult:
    """Deprecated name of :func:`psis_khat` (removed in 0.4).

    NumPyro has its own ``numpyro.infer.importance.psis_diagnostic(model, guide, *args)``,
    which returns a single k-hat; this package's check takes fitted params, works over the
    full plates and returns a :class:`PSISResult`, so it has a name of its own.
    """
    warnings.warn(
        "numpyro_pavi.diagnostics.psis_diagnostic is deprecated and will be removed in 0.4: use "
        "psis_khat (same arguments; NumPyro's numpyro.infer.importance.psis_diagnostic is another function).",
        FutureWarning,
        stacklevel=2,
    )
    return psis_khat(guide, params, *args, **kwargs)
