"""Posterior summaries streamed over plate elements, optionally with every draw sent to Zarr.

:func:`posterior_summary` gives the per-element mean, sd and quantiles of every latent site
over the full plates without holding all draws in memory. It takes the elements of one plate
(the *chunked plate*) ``chunk_size`` at a time and, for each chunk, makes all ``num_samples``
draws of those elements (one compiled program, reused for every chunk), reduces them to
summaries and, with a ``store``, writes the draws to a Zarr store that xarray and ArviZ open
lazily. Memory holds one chunk's draws (``num_samples x chunk_size x`` latents per
chunked-plate element), the summaries and the data; never ``num_samples`` x all latents.
When one plate holds every local site, one pass over it does; otherwise (crossed factors,
users x items) one pass per plate of a cover of the local sites, the other plates at full
size within each draw, each site summarized in the pass over one of its plates.

:func:`posterior_moments` streams over draws instead: the mean and sd of every site over the
full plates, folded batch by batch into running moments.

Why chunk elements and not draws (as :func:`posterior_moments` does): quantiles need
every draw of an element at once, and a draw of a huge plate may not fit either.

The result does not depend on ``chunk_size``: each element's noise comes from its own key
(the site's per-draw key folded with the element's indices), global sites from per-draw keys
that every chunk shares, and an element's encoding, Laplace base and flow read only its own
data and its parents (where a per-step Laplace base's observations are not nested in its
plates, a ragged or long table, each chunk's draws are full draws cut down to the chunk).
So a chunked summary equals the unchunked one up to float error,
and, for Laplace bases whose Newton iterations run at draws (a likelihood not Gaussian in
the site), up to where those stop: they stop when every element of the call has
converged, so an element's last iterate moves with its chunk by about ``DRAW_TOL**2``
(0.0025) of its sds.

Zarr layout (``store``): group ``posterior`` holds one array per latent site, shape
``(1, num_samples, *site_shape)``, dims ``("chain", "draw", ...)`` named as in
:func:`numpyro_pavi.arviz.to_inference_data` (plates by name, unsqueezed); group ``summary``
holds ``{site}_mean``, ``{site}_sd`` and ``{site}_quantiles`` (leading dim ``quantile``, with
the levels as coordinate). ``az.InferenceData(posterior=xr.open_zarr(store, group="posterior"))``
reads it back lazily.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import data as _data
from .arviz import site_dims
from .compiling import HOST_VALUE_ERRORS, as_inputs, jit
from .sampling import draw_starts, sample_latents
from .structure import LatentSite, full_indices

__all__ = ["posterior_moments", "posterior_summary"]


def _passes(structure, plate: str | None) -> list[tuple[str | None, tuple[str, ...]]]:
    """``[(chunked plate, sites it records), ...]``: one pass per plate of a cover of the
    local sites. One plate holding every local site gives one pass (the given plate, or the
    largest such); a crossed design (users x items) gives one pass per factor's plate, the
    other plates at full size, each site recorded in the first pass over one of its plates.
    Global sites are recorded in the first pass."""
    chunked = _chunked_plate(structure, plate, cover_ok=plate is None)
    glob = tuple(n for n, s in structure.latent.items() if not s.plates)
    if chunked is not None or not any(s.plates for s in structure.latent.values()):
        return [(chunked, tuple(structure.latent))]
    left = [s for s in structure.latent.values() if s.plates]
    passes = []
    while left:
        # the plate holding most of the sites not yet recorded (then the largest)
        counts = {}
        for s in left:
            for p in s.plates:
                counts[p] = counts.get(p, 0) + 1
        best = max(sorted(counts), key=lambda p: (counts[p], structure.plates[p].size))
        sites = tuple(s.name for s in left if best in s.plates)
        passes.append((best, (glob if not passes else ()) + sites))
        left = [s for s in left if best not in s.plates]
    return passes


def _chunked_plate(structure, plate: str | None, cover_ok: bool = False) -> str | None:
    """The plate to stream over: the given one, or the largest plate every local site is in
    (None with ``cover_ok`` when no plate holds them all)."""
    local = [s for s in structure.latent.values() if s.plates]
    if plate is not None:
        if plate not in structure.plates:
            raise ValueError(f"plate={plate!r} is not a plate of the model; its plates: {sorted(structure.plates)}.")
        outside = [s.name for s in local if plate not in s.plates]
        if outside:
            raise ValueError(
                f"Latent site '{outside[0]}' does not sit in plate '{plate}': a streamed summary chunks "
                f"one plate, and every local site must be in it (its elements' draws then need only "
                f"their chunk). Choose a plate shared by all local sites, or use "
                f"guide.posterior_moments (it streams over draws instead)."
            )
        return plate
    if not local:
        return None
    shared = set.intersection(*(set(s.plates) for s in local))
    if not shared and cover_ok:
        return None
    if not shared:
        names = {s.name: s.plates for s in local}
        raise ValueError(
            f"No plate holds every local latent site ({names}): a streamed summary chunks one plate "
            "that all of them sit in. Use guide.posterior_moments (it streams over draws instead)."
        )
    return max(sorted(shared), key=lambda p: structure.plates[p].size)


def _plate_axis(site: LatentSite, structure, plate: str) -> int:
    """Axis of ``plate`` in a value of ``site`` (site layout, no sample dims)."""
    return len(site.batch_shape) + structure.plates[plate].dim


def _check_levels(quantiles) -> np.ndarray:
    levels = np.atleast_1d(np.asarray(quantiles, dtype=float))
    if levels.ndim != 1 or np.any(np.isnan(levels)) or np.any((levels < 0) | (levels > 1)):
        raise ValueError(f"quantiles must be a list of levels in [0, 1], got {quantiles!r}.")
    return levels


def posterior_summary(
    guide: Any,
    rng_key: jax.Array,
    params: dict,
    *args: Any,
    num_samples: int = 1000,
    quantiles: Sequence[float] = (0.05, 0.5, 0.95),
    plate: str | None = None,
    chunk_size: int = 1024,
    store: Any = None,
    progress_bar: bool = False,
    **kwargs: Any,
) -> dict[str, dict[str, np.ndarray]]:
    """Per-element posterior mean, sd and quantiles of every latent site, streamed over the
    elements of one plate (see the module docstring).

    :param guide: a fitted :class:`~numpyro_pavi.AutoPAVI` (set up by SVI).
    :param rng_key: PRNG key.
    :param params: ``svi.get_params(state)``.
    :param args, kwargs: the model's arguments (default: the training ones, for guides that
        read data); the model must index its data with the chunked plate's indices, as it
        does for subsampled training (``with numpyro.plate(..., subsample_size=B) as idx``).
    :param num_samples: posterior draws per element (at least 2).
    :param quantiles: quantile levels in ``[0, 1]`` (may be empty).
    :param plate: the chunked plate (default: the largest plate every local site is in;
        where none holds them all, as in a crossed design, one pass per plate of a cover,
        each with the other plates at full size).
    :param chunk_size: elements of the chunked plate per program run (the memory knob).
    :param store: a Zarr store or path: the draws and summaries are also written there
        (needs the ``zarr`` package, ``pip install numpyro-pavi[zarr]``).
    :param progress_bar: a ``tqdm`` bar over the chunks.
    :return: ``{site: {"mean": (*shape), "sd": (*shape), "quantiles": (len(quantiles),
        *shape)}}``, host (NumPy) arrays in each site's full shape; ``sd`` uses ``ddof=1``.
        Deterministic sites are not summarized (they may mix elements of several chunks).
    """
    if getattr(guide, "structure", None) is None:
        raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
    guide.check_call(rng_key, params)
    for name, n, low in (("num_samples", num_samples, 2), ("chunk_size", chunk_size, 1)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < low:
            raise ValueError(f"{name} must be an int >= {low}, got {n!r}.")
    levels = _check_levels(quantiles)
    structure = guide.structure
    passes = _passes(structure, plate)
    guide.check_params(params)
    sizes, _, full_trace, _, (args, kwargs) = guide.plate_inputs(*args, **kwargs)
    with_trace = full_trace is not None
    # stored Laplace bases passed with the params (of other data than these: a clear error)
    with_state = guide.stored_state(params, sizes, full_trace) is not None
    del full_trace  # only the chunks' traces are needed from here on
    data, rebuild = as_inputs((args, kwargs))  # large data: inputs (checked by the first trace below)
    keys = jax.random.split(rng_key, num_samples)
    qs = jnp.asarray(levels, jnp.float32)

    # Several passes: a site's draw may read other plates' sampled values through a per-step
    # Laplace base (a column's base given every row's effect, and a row's given every
    # column's data); then each chunk's draws are full draws cut down to the chunk (exact,
    # memory still one chunk of draws, time one full draw per chunk). Stored bases and
    # flows alone read only the element's own plates, and chunk directly.
    stored_sites = () if guide.plan.stored is None else guide.plan.stored.sites
    per_step = [s for s in structure.latent.values() if guide.plan.on_laplace(s) and s.name not in stored_sites]
    # A per-step base reads its site's likelihood: cut to a chunk, the model sees only that
    # chunk's elements, which is exact where every observation sits inside their plates
    # (nested data, indexed with the plate's indices). An observation that reaches them
    # through an index array (ragged groups, a long table) would be read against the wrong
    # elements: then each chunk's draws are full draws cut down to it, as for crossed sites.
    nested = all(set(s.plates) <= set(o.plates) for s in per_step for o in structure.observed.values())
    separable = nested and (len(passes) == 1 or not per_step)

    # draws vectorized together where they pass through no model (AutoPAVI.draw_batch, given
    # no sampler: Gaussian bases stay one at a time here; full plate sizes: a chunk holds fewer
    # values); no deterministic site is computed here
    together = guide.draw_batch(sizes, num_samples, with_state=with_state, deterministic=False)
    together = together if together > 1 else None

    def program(chunked, names):
        """The compiled summary of sites ``names`` on a chunk of ``chunked``'s elements,
        every other plate at full size; draws of the other sites are dropped as made."""

        def cut(name, value, idx):
            site = structure.latent[name]
            if separable or chunked not in site.plates:
                return value
            return jnp.take(value, idx, axis=_plate_axis(site, structure, chunked))

        def summarize(params, idx, data):
            # params and large data are arguments, not constants of the program (see
            # as_inputs); so are what is built from them: the bound arguments, indices, bases
            args, kwargs = rebuild(data)
            margs = (args, kwargs)
            bound = _data.bind_arguments(guide.model, args, kwargs) if guide.ragged else {}
            every = full_indices(sizes)
            stored = guide.stored_state(params, sizes)  # stored Laplace bases passed with the params
            indices = {**every, chunked: idx} if chunked and separable else every
            trace = guide.trace_model(indices, *args, **kwargs) if with_trace else None
            # once per chunk, for all its draws (see draw_starts)
            starts = draw_starts(
                guide.plan, params, indices, trace, sizes, bound, model_args=margs,
                chunk_size=guide.chunk_size, laplace_state=stored,
            )  # fmt: skip

            def one(key):
                values, _, _ = sample_latents(
                    guide.plan, params, key, indices, trace, sizes, bound,
                    model_args=margs, chunk_size=guide.chunk_size, element_keys=True, laplace_state=stored,
                    differentiate=False, starts=starts,
                )  # fmt: skip
                return {k: cut(k, values[k], idx) for k in names}

            v = jax.lax.map(one, keys, batch_size=together)
            stats = {
                k: {"mean": jnp.mean(x, 0), "sd": jnp.std(x, 0, ddof=1), "quantiles": jnp.quantile(x, qs, axis=0)}
                for k, x in v.items()
            }
            return stats, (v if store is not None else None)

        return jit(summarize)

    plan = []  # (chunked, names, size, length, compiled program)
    full_shape, where = {}, {}
    for chunked, names in passes:
        size = sizes[chunked] if chunked else 1
        # two elements at least: a plate of one element would broadcast against any data
        length = min(max(int(chunk_size), 2), size) if chunked else 1
        run = program(chunked, names)
        try:
            try:
                shapes = jax.eval_shape(run, params, jnp.arange(length), data)[0]
            except HOST_VALUE_ERRORS:
                if not data:
                    raise
                # a model that reads its data's values on the host: closed over (as_inputs);
                # the programs look ``rebuild`` up when they are traced
                data, rebuild = [], lambda _: (args, kwargs)
                shapes = jax.eval_shape(run, params, jnp.arange(length), data)[0]
        except (TypeError, ValueError, IndexError) as err:
            raise ValueError(
                f"Sampling {length} of the {size} elements of plate '{chunked}' at a time failed: the model "
                f"must index its data with the plate's indices (with numpyro.plate('{chunked}', N, "
                f"subsample_size=...) as idx: ... data[idx]), as for subsampled training. Original error: {err}"
            ) from err
        for name in names:
            site = structure.latent[name]
            shape = list(shapes[name]["mean"].shape)
            if chunked and chunked in site.plates:
                shape[_plate_axis(site, structure, chunked)] = size
                where[name] = (chunked, length)
            full_shape[name] = tuple(shape)
        plan.append((chunked, names, size, length, run))
    out = {
        name: {
            "mean": np.empty(shape, np.float32),
            "sd": np.empty(shape, np.float32),
            "quantiles": np.empty((len(levels),) + shape, np.float32),
        }
        for name, shape in full_shape.items()
    }
    arrays = None
    if store is not None:
        arrays = _open_store(store, structure, sizes, full_shape, num_samples, levels, where)

    for chunked, names, size, length, run in plan:
        starts = range(0, size, length)
        if progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"posterior summary ({chunked or 'globals'})", unit="chunk")
        for start in starts:
            stop = min(start + length, size)
            idx = jnp.minimum(jnp.arange(start, start + length), size - 1)  # the last chunk repeats its last element
            stats, draws = run(params, idx, data)
            stats, draws = jax.device_get((stats, draws))
            for name in names:
                site = structure.latent[name]
                local = chunked is not None and chunked in site.plates
                if not local and start > 0:
                    continue  # global sites: identical in every chunk (shared per-draw keys)
                axis = _plate_axis(site, structure, chunked) if local else None
                for what, value in stats[name].items():
                    lead = 1 if what == "quantiles" else 0
                    out[name][what][_at(axis, lead, start, stop)] = _take(value, axis, lead, stop - start)
                if arrays is not None:
                    arrays[name][_at(axis, 2, start, stop)] = _take(draws[name], axis, 1, stop - start)[None]
    if arrays is not None:
        summary = arrays["__summary__"]
        for name, stats in out.items():
            for what, value in stats.items():
                summary[f"{name}_{what}"][...] = value
        import zarr

        with warnings.catch_warnings():
            # zarr 3 calls consolidated metadata an extension; xarray reads it (and opens faster)
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(arrays["__root__"].store)
    return out


def _at(axis: int | None, lead: int, start: int, stop: int) -> tuple:
    """Index of elements ``start:stop`` along ``axis`` (shifted by ``lead`` leading dims)."""
    if axis is None:
        return (Ellipsis,)
    return (slice(None),) * (axis + lead) + (slice(start, stop),)


def _take(value: np.ndarray, axis: int | None, lead: int, n: int) -> np.ndarray:
    """The first ``n`` elements along ``axis`` (the chunk without its padding)."""
    if axis is None:
        return value
    return np.take(value, np.arange(n), axis=axis + lead)


def _open_store(store, structure, sizes: dict, full_shape: dict, num_samples: int, levels: np.ndarray, where) -> dict:
    """Create the Zarr arrays (see the module docstring), chunked like the stream."""
    try:
        import zarr
    except ImportError as err:
        raise ImportError(
            "Writing draws to a store needs the zarr package: pip install 'numpyro-pavi[zarr]' (or pip install zarr)."
        ) from err
    root = zarr.open_group(store, mode="w")
    posterior, summary = root.require_group("posterior"), root.require_group("summary")
    arrays = {}
    for name, shape in full_shape.items():
        site = structure.latent[name]
        plate_dims = {p: structure.plates[p].dim for p in site.plates}
        dims, _ = site_dims(name, shape, len(site.event_shape), plate_dims, sizes, squeeze=False)
        chunks = list(shape)
        if name in where:  # local: chunked like its pass's stream
            chunked, length = where[name]
            chunks[_plate_axis(site, structure, chunked)] = length
        arrays[name] = posterior.create_array(
            name,
            shape=(1, num_samples) + shape,
            chunks=(1, num_samples, *chunks),
            dtype="float32",
            dimension_names=["chain", "draw", *dims],
        )
        for what in ("mean", "sd"):
            summary.create_array(f"{name}_{what}", shape=shape, dtype="float32", dimension_names=dims)
        summary.create_array(
            f"{name}_quantiles", shape=(len(levels),) + shape, dtype="float32", dimension_names=["quantile", *dims]
        )
    for dim, n in (("chain", 1), ("draw", num_samples)):
        posterior.create_array(dim, shape=(n,), dtype="int64", dimension_names=[dim])[...] = np.arange(n)
    summary.create_array("quantile", shape=(len(levels),), dtype="float64", dimension_names=["quantile"])[...] = levels
    arrays["__summary__"], arrays["__root__"] = summary, root
    return arrays


def posterior_moments(
    guide: Any,
    rng_key: jax.Array,
    params: dict,
    *args: Any,
    num_samples: int = 1000,
    batch_size: int = 100,
    progress_bar: bool = False,
    **kwargs: Any,
) -> dict:
    """Posterior mean and sd of every site over the full plates, streamed: draws are made
    ``batch_size`` at a time and folded into running moments (Chan et al.'s pairwise
    update), so memory holds one batch of draws, not ``num_samples`` of them. The draws are
    those of ``guide.sample_posterior(rng_key, params, *args, sample_shape=(num_samples,))``.

    :param guide: a fitted :class:`~numpyro_pavi.AutoPAVI`.
    :param num_samples: number of posterior draws.
    :param batch_size: draws held in memory at once (one compiled program, reused).
    :param progress_bar: show a ``tqdm`` bar over the batches.
    :return: ``{site: {"mean": array, "sd": array}}`` with each site's full shape (``sd``
        with ``ddof=1``, as ArviZ's summaries), for latent and deterministic sites.
    """
    for name, n, low in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
        if not isinstance(n, (int, np.integer)) or n < low:
            raise ValueError(f"{name} must be an int >= {low}, got {n!r}.")
    batch_size = min(batch_size, num_samples)  # no padded draws beyond the ones asked for
    inputs = guide.plate_inputs(*args, **kwargs)
    args, kwargs = inputs.model_args  # the training ones where none are given
    keys = jax.random.split(rng_key, num_samples)

    def draw(key, params, data, rebuild):
        a, kw = rebuild(data)
        return guide.full_plate_sampler(params, *a, **kw)(key)

    # params are the program's inputs, and so are large data (see as_inputs)
    def check(rb, d):  # a trace with the data as tracers (a host read raises here)
        jax.eval_shape(lambda k, p, dd: draw(k, p, dd, rb), keys[0], params, d)

    data, rebuild = as_inputs((args, kwargs), check)

    # draws vectorized together within a batch where they pass through no model
    # (AutoPAVI.draw_batch, given no sampler: Gaussian bases and deterministic sites stay
    # one at a time here)
    with_state = guide.stored_state(params, inputs.sizes, inputs.trace) is not None
    together = guide.draw_batch(inputs.sizes, batch_size, with_state=with_state)
    together = together if together > 1 else None

    @jit
    def fold(state, batch_keys, valid, params, data):
        # a short last batch is padded with repeated keys, weighted out by ``valid``
        # one sampler for the batch: its draws' Newton starts (draw_starts) computed once
        a, kw = rebuild(data)
        values = jax.lax.map(guide.full_plate_sampler(params, *a, **kw), batch_keys, batch_size=together)
        count, mean, m2 = state
        b = jnp.sum(valid.astype(jnp.float32))
        total = count + b
        new_mean, new_m2 = {}, {}
        for k, v in values.items():
            w = jnp.reshape(valid, (-1,) + (1,) * (v.ndim - 1))
            mb = jnp.sum(jnp.where(w, v, 0.0), 0) / b
            m2b = jnp.sum(jnp.where(w, (v - mb) ** 2, 0.0), 0)
            delta = mb - mean[k]
            new_mean[k] = mean[k] + delta * (b / total)
            new_m2[k] = m2[k] + m2b + delta**2 * (count * b / total)
        return total, new_mean, new_m2

    shapes = jax.eval_shape(lambda k, p, d: draw(k, p, d, rebuild), keys[0], params, data)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.promote_types(a.dtype, jnp.float32)), shapes)
    state = (jnp.zeros((), jnp.float32), zeros, zeros)
    starts = range(0, num_samples, batch_size)
    if progress_bar:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="posterior moments", unit="batch")
    for start in starts:
        batch = keys[start : start + batch_size]
        n = batch.shape[0]
        valid = jnp.arange(batch_size) < n
        if n < batch_size:
            batch = jnp.concatenate([batch, jnp.broadcast_to(batch[:1], (batch_size - n,) + batch.shape[1:])])
        state = fold(state, batch, valid, params, data)
    count, mean, m2 = state
    return {k: {"mean": mean[k], "sd": jnp.sqrt(m2[k] / (count - 1))} for k in mean}
