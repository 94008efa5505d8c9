"""Each plate element's observed data, for the set encoders of PAVI-E.

Two ways a plate element owns data:

* **nested** (found automatically): an observed site inside the plate. Sliced at the
  element, the site's remaining plate axes form the element's set (pooled one plate at a
  time, innermost first), and its non-plate dims are the features of each set member;
* **ragged** (declared with :class:`Ragged`): a flat observation plate plus an index array
  mapping each observation to an element, e.g. ``y ~ Normal(a[group] + b[group] * x)``.

The values always come from a trace of the model taken on the *current* call, with the
guide's plate indices, never from the setup trace, so they are right under subsampling.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Ragged", "bind_arguments", "observed_canonical"]


@dataclass(frozen=True)
class Ragged:
    """Declares a ragged plate: which observations belong to which plate element.

    Example: in ``y ~ Normal(a[group] + b[group] * x, s)`` with ``a, b`` in plate
    ``"groups"`` and ``y`` in a flat plate ``"obs"``::

        guide = AutoPAVI(model, ragged={"groups": Ragged(index="group", covariates=("x",))})

    :param index: name of the model argument holding the ``(num_obs,)`` int array that maps
        each observation to its plate element.
    :param covariates: names of model arguments with one row per observation (shape
        ``(num_obs,)`` or ``(num_obs, k)``) that join the observed values as encoder input.
    :param observed: names of the observed sites that form the data (default: every
        observed site in the index's plate).
    """

    index: str
    covariates: tuple[str, ...] = ()
    observed: tuple[str, ...] | None = None

    def __post_init__(self):
        if isinstance(self.covariates, str):
            object.__setattr__(self, "covariates", (self.covariates,))
        if isinstance(self.observed, str):
            object.__setattr__(self, "observed", (self.observed,))


def bind_arguments(model: Callable, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The model's arguments by name (defaults applied), to look up ragged declarations."""
    sig = inspect.signature(model)
    bound = sig.bind_partial(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def observed_canonical(site: dict, plate_dims: Mapping[str, int], with_mask: bool = False):
    """An observed site's value as ``(*plate_axes, F)``, plates outermost first.

    :param site: the site from a model trace.
    :param plate_dims: ``{plate name: dim}``.
    :param with_mask: also return the cells the model scores (see :func:`site_mask`) in the
        same layout, or None when it scores them all.
    :return: the array (non-plate batch dims and event dims flattened into ``F`` features),
        the plate names of its leading axes (and the mask).
    """
    value = jnp.asarray(site["value"])
    event_dim = len(site["fn"].event_shape)
    n_batch = value.ndim - event_dim
    frames = sorted((f for f in site["cond_indep_stack"]), key=lambda f: plate_dims[f.name])
    plate_pos = [n_batch + f.dim for f in frames]
    order = plate_pos + [p for p in range(value.ndim) if p not in plate_pos]
    lead = tuple(value.shape[p] for p in plate_pos)
    names = tuple(f.name for f in frames)
    out = jnp.reshape(jnp.transpose(value, order), lead + (-1,)).astype(jnp.float32)
    if not with_mask:
        return out, names
    mask = site_mask(site)
    if mask is not None:
        mask = jnp.broadcast_to(jnp.reshape(mask, mask.shape + (1,) * event_dim), value.shape)
        mask = jnp.reshape(jnp.transpose(mask, order), lead + (-1,))
    return out, names, mask


def feature_stats(values: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over all leading axes (std 1 where constant), over the cells
    where ``mask`` is True when given (mean 0, std 1 for a feature never observed)."""
    flat = np.reshape(np.asarray(values, np.float64), (-1, np.shape(values)[-1]))
    if mask is not None:
        m = np.reshape(np.asarray(mask, bool), flat.shape)
        flat = np.where(m, flat, np.nan)
        seen = m.any(0)
        with np.errstate(invalid="ignore"):
            mean = np.where(seen, np.nanmean(np.where(seen, flat, 0.0), 0), 0.0)
            std = np.where(seen, np.nanstd(np.where(seen, flat, 0.0), 0), 1.0)
    else:
        mean, std = flat.mean(0), flat.std(0)
    std = np.where(std > 0, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def site_mask(site: dict | None):
    """The batch-shaped mask under which the model scores a sample site, or None (all in).

    Combines ``handlers.mask`` (and ``obs_mask``, which uses it) with ``fn.mask(...)``.
    """
    import numpyro.distributions as dist

    if site is None or site["type"] != "sample":
        return None
    fn, mask = site["fn"], site.get("mask")
    while True:
        if isinstance(fn, dist.MaskedDistribution):
            if isinstance(fn._mask, bool):
                mask = (mask if mask is not None else True) if fn._mask else False
            else:
                mask = fn._mask if mask is None or mask is True else mask & fn._mask
        if not hasattr(fn, "base_dist"):
            break
        fn = fn.base_dist
    if mask is None or mask is True:
        return None
    return jnp.asarray(mask, bool)


def scored_mean(site, values: jax.Array, trace_site: dict | None, if_none: float = 1.0) -> jax.Array:
    """Mean of per-element ``values (*grid)`` of latent ``site`` over the elements the model
    scores: cells that ``handlers.mask``/``obs_mask`` leave out (an imputation site's
    observed cells) have a flat log joint, so their Newton problems never converge and must
    not count against the site's. ``if_none`` where the model scores none of them (an
    imputation site where nothing is missing): 1 for a share of successes, 0 for a share
    of failures."""
    mask = site_mask(trace_site)
    share = None if mask is None else site.element_share(mask, values.shape)
    if share is None:
        return jnp.mean(values)
    scored = share > 0
    count = jnp.sum(scored)
    return jnp.where(count > 0, jnp.sum(jnp.where(scored, values, 0.0)) / jnp.maximum(count, 1), if_none)


def check_observed_finite(trace) -> None:
    """Raise a clear error when an observed site holds NaN or inf where the likelihood sees it
    (cells masked out with ``obs_mask`` or ``handlers.mask`` are allowed to hold anything)."""

    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"] or site["value"] is None:
            continue
        try:
            value = np.asarray(site["value"])
        except Exception:  # noqa: BLE001, S112 - abstract values (jax.eval_shape) cannot be checked
            continue
        if not np.issubdtype(value.dtype, np.floating):
            continue
        bad = ~np.isfinite(value)
        mask = site_mask(site)
        if mask is not None:
            try:
                m = np.asarray(mask, bool)
            except Exception:  # noqa: BLE001, S112 - an abstract mask: nothing to check
                continue
            ev = len(site["fn"].event_shape)
            try:
                bad = bad & np.broadcast_to(np.reshape(m, m.shape + (1,) * ev), bad.shape)
            except ValueError:
                pass  # a mask that does not line up with the value: leave the check to the fit
        count = int(bad.sum())
        if count:
            raise ValueError(
                f"Observed site '{name}' holds {count} NaN/inf value(s) (of {value.size}) where the "
                "likelihood is evaluated, so the loss is NaN and no fit can start. Drop those "
                f"observations, or mark them missing: numpyro.sample({name!r}, ..., obs=..., "
                "obs_mask=mask) with mask False at the missing cells."
            )


def check_finite(name: str, values, plate: str) -> None:
    """Raise a clear error when an encoder's input holds NaN or inf."""
    arr = np.asarray(values)
    if not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise ValueError(
            f"'{name}' holds {bad} NaN/inf value(s); it is the data of plate '{plate}' for the "
            "set encoder, which cannot encode missing values. Drop those observations (or "
            f"mask them in the model with obs_mask), or use encoding='free' for plate '{plate}'."
        )


def log_count(n: jnp.ndarray, full: int, batch: int) -> jnp.ndarray:
    """``log(1 + n * full / batch)``: the set size scaled up to the full plate, as a feature.

    Mean pooling forgets how many members a set has, but the posterior's width depends on
    it; under subsampling of the pooled plate the batch count is scaled to estimate the
    full count.
    """
    return jnp.log1p(n * (full / max(batch, 1)))[..., None]


def as_rows(x, num: int, name: str) -> jnp.ndarray:
    """A covariate as ``(num, k)`` float rows."""
    x = jnp.asarray(x, jnp.float32)
    if x.shape[:1] != (num,):
        raise ValueError(f"Covariate '{name}' has shape {x.shape}; expected {num} rows, one per observation.")
    return jnp.reshape(x, (num, math.prod(x.shape[1:])))


def ragged_parts(structure: Any, plate: str, decl: Ragged, trace: Mapping[str, dict], bound: Mapping[str, Any]):
    """Features ``(B_obs, F)``, element ids ``(B_obs,)`` and the observation plate's name of a
    ragged plate's data, on the observations of ``trace`` (the current call's).

    :param structure: the model's :class:`~numpyro_pavi.structure.ModelStructure`.
    :param bound: the model's arguments by name (:func:`bind_arguments`).
    """
    if decl.index not in bound:
        raise ValueError(
            f"Ragged plate '{plate}': the model has no argument named '{decl.index}' (its arguments: "
            f"{sorted(bound)}). Ragged(index=...) names the model argument holding the index array."
        )
    dims = {n: p.dim for n, p in structure.plates.items()}
    names = decl.observed or tuple(
        o for o, obs in structure.observed.items() if len(obs.plates) == 1 and obs.plates[0] != plate
    )
    if not names:
        raise ValueError(f"Ragged plate '{plate}': no observed site in a flat plate holds its data.")
    feats, obs_plate = [], None
    for o in names:
        if o not in trace:
            raise ValueError(f"Ragged plate '{plate}': observed site '{o}' is not in the model.")
        x, oplates = observed_canonical(trace[o], dims)
        if len(oplates) != 1:
            raise ValueError(f"Ragged plate '{plate}': observed site '{o}' must sit in exactly one (flat) plate.")
        obs_plate = oplates[0]
        feats.append(x)
    idx = trace[obs_plate]["value"]
    full_index = jnp.asarray(bound[decl.index])
    ids = full_index[idx]
    for c in decl.covariates:
        if c not in bound:
            raise ValueError(f"Ragged plate '{plate}': the model has no argument named '{c}' (covariate).")
        # one row per observation of *this* call's data (new data may have other sizes)
        feats.append(as_rows(bound[c], full_index.shape[0], c)[idx])
    return jnp.concatenate(feats, -1), ids, obs_plate
