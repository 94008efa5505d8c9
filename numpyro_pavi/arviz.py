"""ArviZ export of an :class:`~numpyro_pavi.AutoPAVI` posterior, with plate-named dims.

:func:`to_inference_data` builds an :class:`arviz.InferenceData` from full-plate draws of a
fitted guide. Dimension naming (for every group):

* a batch dim owned by a plate is named after the plate, with coords ``range(size)``;
* other dims (a site's intrinsic batch dims and its event dims) are named
  ``{site}_dim_{i}``, ``i`` counting those dims of the site from the left, from 0;
* intrinsic batch dims of size 1 are broadcasting leftovers (``mu_g`` of
  :func:`numpyro_pavi.examples.models.random_effects` has shape ``(G, 1, K)`` only because the
  ``obs`` plate sits at ``dim=-1``) and are dropped when ``squeeze=True`` (the default).

So ``mu_g`` becomes ``posterior["mu_g"]`` with dims ``("chain", "draw", "groups",
"mu_g_dim_0")`` and the observed ``x`` has dims ``("groups", "obs", "x_dim_0")`` in
``observed_data`` and ``("chain", "draw", "groups", "obs")`` in ``log_likelihood`` (one
log-likelihood value per event, i.e. per plate element).

Groups: ``posterior`` (one chain of ``num_samples`` draws, deterministic sites included),
``observed_data``, ``log_likelihood`` (when requested) and ``svi`` (when ``losses`` are
given). ``az.from_dict`` only knows ArviZ's fixed group names, and the loss history is not
indexed by ``(chain, draw)``, so it goes in a custom group added with
``InferenceData.add_groups``: ``idata.svi["loss"]`` with dim ``"step"``; the posterior's
attrs also record ``final_loss``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers

from .data import site_mask
from .diagnostics import _SUBSAMPLE_WARNING, full_plate_sizes
from .structure import full_indices

if TYPE_CHECKING:  # arviz is imported lazily: it is slow to import
    import arviz as az

__all__ = ["deterministic_event_ndim", "site_dims", "to_inference_data"]


def site_dims(
    name: str,
    shape: tuple[int, ...],
    event_ndim: int,
    plate_dims: dict[str, int],
    sizes: dict[str, int],
    *,
    squeeze: bool = True,
) -> tuple[list[str], tuple[int, ...]]:
    """Dim names of a site's value and the axes to squeeze away.

    :param name: site name (used for the ``{name}_dim_{i}`` names).
    :param shape: the value's shape (site layout, no sample dims): ``batch + event``.
    :param event_ndim: number of trailing event dims (never named after plates).
    :param plate_dims: ``{plate: dim}`` of the site's plates (negative dims, counted from
        the right of the batch shape).
    :param sizes: full plate sizes; a plate's position is only named after it when the value
        has exactly the plate's size there (guards deterministic sites, whose event dims
        :func:`deterministic_event_ndim` infers).
    :param squeeze: drop size-1 batch dims not owned by a plate.
    :return: ``(dims, squeeze_axes)``: names of the kept axes, left to right, and the axes of
        ``shape`` to drop (``np.squeeze(value, squeeze_axes)`` matches ``dims``).
    """
    n_batch = len(shape) - event_ndim
    by_pos = {n_batch + d: p for p, d in plate_dims.items() if 0 <= n_batch + d < n_batch}
    dims, drop, i = [], [], 0
    for pos, size in enumerate(shape):
        plate = by_pos.get(pos)
        if plate is not None and size == sizes.get(plate):
            dims.append(plate)
        elif squeeze and pos < n_batch and size == 1:
            drop.append(pos)
        else:
            dims.append(f"{name}_dim_{i}")
            i += 1
    return dims, tuple(drop)


def _frames(site: dict) -> dict[str, int]:
    return {f.name: f.dim for f in site["cond_indep_stack"]}


def deterministic_event_ndim(shape: tuple, plate_dims: dict[str, int], sizes: dict[str, int]) -> int:
    """Event dims of a deterministic site's value, which NumPyro does not record: the most
    trailing dims that leave every plate of the site at its full size where its ``dim`` puts
    it (``exp(beta)`` of a ``(G, K)`` ``beta`` in a plate of ``G`` at ``dim=-1``: 1, even when
    ``K == G``); 0 when no count does."""
    depth = max((-d for d in plate_dims.values()), default=0)
    for e in range(len(shape) - depth, 0, -1):
        n_batch = len(shape) - e
        if all(shape[n_batch + d] == sizes.get(p) for p, d in plate_dims.items()):
            return e
    return 0


def to_inference_data(
    guide: Any,
    params: dict,
    *args: Any,
    num_samples: int = 500,
    rng_key: jax.Array | None = None,
    log_likelihood: bool = False,
    losses: Any = None,
    squeeze: bool = True,
    **kwargs: Any,
) -> az.InferenceData:
    """An :class:`arviz.InferenceData` of the guide's posterior over the full plates.

    :param guide: a fitted :class:`~numpyro_pavi.AutoPAVI` (set up by SVI).
    :param params: ``svi.get_params(state)``.
    :param args, kwargs: the model's arguments (the data): they give the observed values,
        the deterministic sites and, with set encodings, the plate elements.
    :param num_samples: draws of the single chain.
    :param rng_key: PRNG key (default ``PRNGKey(0)``).
    :param log_likelihood: add a ``log_likelihood`` group: for every observed site, the
        pointwise log-likelihood per draw, shape ``(1, num_samples, *batch)`` with the
        site's plates as dims (what ``az.loo`` / ``az.waic`` need). Computed one draw at a
        time (``lax.map``), with every plate at its full size.
    :param losses: SVI loss history, shape ``(steps,)``; stored as ``idata.svi["loss"]``.
    :param squeeze: drop size-1 batch dims not owned by a plate (see the module docstring).
    :return: ``InferenceData`` with groups ``posterior``, ``observed_data`` and, when asked,
        ``log_likelihood`` and ``svi``.
    """
    import arviz as az
    import xarray as xr

    if getattr(guide, "structure", None) is None:
        raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
    rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
    structure = guide.structure
    sizes = full_plate_sizes(guide.model, structure, args, kwargs)
    full = full_indices(sizes)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SUBSAMPLE_WARNING)
        samples = guide.sample_posterior(rng_key, params, *args, sample_shape=(num_samples,), **kwargs)
    latent_names = [k for k in samples if k in structure.latent]
    first = {k: samples[k][0] for k in latent_names}
    # Full indices switch off subsampling, so the trace holds every observation at scale 1.
    model = handlers.substitute(handlers.seed(guide.model, 0), data=full)
    with handlers.block(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SUBSAMPLE_WARNING)
        trace = handlers.trace(handlers.substitute(model, data=first)).get_trace(*args, **kwargs)

    dims: dict[str, list[str]] = {}
    posterior: dict[str, np.ndarray] = {}
    for name, value in samples.items():
        value = np.asarray(value)
        shape = value.shape[1:]
        if name in structure.latent:
            site = structure.latent[name]
            plate_dims = {p: structure.plates[p].dim for p in site.plates}
            names, drop = site_dims(name, shape, len(site.event_shape), plate_dims, sizes, squeeze=squeeze)
        elif name in trace:
            frames = _frames(trace[name])
            event = deterministic_event_ndim(shape, frames, sizes)
            names, drop = site_dims(name, shape, event, frames, sizes, squeeze=squeeze)
        else:  # pragma: no cover - sample_posterior only returns model sites
            names, drop = [f"{name}_dim_{i}" for i in range(len(shape))], ()
        posterior[name] = np.squeeze(value, tuple(1 + a for a in drop))[None]
        dims[name] = names

    observed: dict[str, np.ndarray] = {}
    obs_batch: dict[str, tuple[list[str], tuple[int, ...]]] = {}
    for name in structure.observed:
        site = trace.get(name)
        if site is None or site["type"] != "sample" or not site["is_observed"]:
            continue
        value = np.asarray(site["value"])
        event_ndim = len(site["fn"].event_shape)
        names, drop = site_dims(name, value.shape, event_ndim, _frames(site), sizes, squeeze=squeeze)
        observed[name] = np.squeeze(value, drop)
        dims[name] = names
        # log_prob's shape: the value's batch shape broadcast with the (plate-expanded) fn's
        batch_shape = np.broadcast_shapes(value.shape[: value.ndim - event_ndim], tuple(site["fn"].batch_shape))
        obs_batch[name] = site_dims(name, batch_shape, 0, _frames(site), sizes, squeeze=squeeze)

    log_lik: dict[str, np.ndarray] | None = None
    if log_likelihood:
        pointwise = _pointwise_log_likelihood(model, {k: samples[k] for k in latent_names}, list(observed), args, kwargs)
        log_lik = {}
        for k, (lp, mask) in pointwise.items():
            lp, mask = np.asarray(lp), np.asarray(mask[0])
            if mask.all():
                log_lik[k] = np.squeeze(lp, tuple(1 + a for a in obs_batch[k][1]))[None]
            else:
                # cells the model does not score (obs_mask, handlers.mask) are no data points
                # for LOO: keep the scored ones, flattened along one dim
                log_lik[k] = lp[:, mask][None]
                obs_batch[k] = ([f"{k}_scored_cell"], ())

    used = {d for names in dims.values() for d in names}
    coords = {p: np.arange(sizes[p]) for p in sizes if p in used}
    posterior_attrs = {"inference_library": "numpyro", "guide": type(guide).__name__}
    if losses is not None:
        losses = np.asarray(losses)
        posterior_attrs["final_loss"] = float(losses[-1]) if losses.size else float("nan")
    idata = az.from_dict(
        posterior=posterior,
        observed_data=observed or None,
        coords=coords,
        dims=dims,
        posterior_attrs=posterior_attrs,
    )
    if log_lik is not None:
        # from_dict keys dims by variable name across groups, and an observed site's
        # log-likelihood lacks its event dims: it needs a call of its own.
        ll_dims = {k: obs_batch[k][0] for k in log_lik}
        ll_coords = {p: c for p, c in coords.items() if any(p in d for d in ll_dims.values())}
        idata.extend(az.from_dict(log_likelihood=log_lik, coords=ll_coords, dims=ll_dims))
    if losses is not None:
        idata.add_groups({"svi": xr.Dataset({"loss": ("step", losses)}, coords={"step": np.arange(losses.size)})})
    return idata


def _pointwise_log_likelihood(
    model: Any, samples: dict[str, jax.Array], observed: list[str], args: tuple, kwargs: dict
) -> dict[str, jax.Array]:
    """``{site: (S, *batch)}`` log-likelihood of each observed site per draw (one draw at a time).

    ``model`` must already have its plates substituted with their full index ranges.
    """

    def one(value: dict[str, jax.Array]) -> dict[str, jax.Array]:
        with handlers.block(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SUBSAMPLE_WARNING)
            trace = handlers.trace(handlers.substitute(model, data=value)).get_trace(*args, **kwargs)
        out = {}
        for name in observed:
            site = trace[name]
            lp = site["fn"].log_prob(site["value"])
            if site["scale"] is not None:
                lp = site["scale"] * lp
            mask = site_mask(site)
            mask = jnp.ones(jnp.shape(lp), bool) if mask is None else jnp.broadcast_to(mask, jnp.shape(lp))
            out[name] = (jnp.where(mask, lp, 0.0), mask)
        return out

    return jax.lax.map(one, samples)
