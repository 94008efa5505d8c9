"""Pure sampling from the guide: :func:`sample_latents`, shared by training, full-plate
posteriors, streamed summaries, PSIS and the ArviZ export.

Given a :class:`~numpyro_pavi.plan.GuidePlan`, the parameters, a key, the current plate
elements and a trace of the model on them (its observed data), :func:`sample_latents` draws
every latent site top-down in the plan's order (the model's, its leading globals scales
first): each plate set's encodings (free, from set encoders, or none), then each site's
flow on the grid of its plates' elements, conditioned on the element's encoding and its
parents' sampled values, placed on the element's Laplace base where it has one, and
constrained to the site's support. It reads nothing else and changes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from . import base_state as _state
from . import data as _data
from .encoders import readout
from .laplace import (
    NEWTON_STEPS,
    canonical_values,
    constrain_group,
    draw_start,
    finite_cotangent,
    grad_and_blocks,
    group_log_joint,
    in_pieces,
    newton_base,
    precision,
    reference_trace,
    solve_lower,
)
from .plan import GuidePlan, encoder_key, encoder_levels
from .structure import LatentSite

__all__ = ["PlateInputs", "draw_starts", "element_noise", "encodings", "sample_latents"]


class PlateInputs(NamedTuple):
    """What a posterior call samples on, resolved once by
    :meth:`~numpyro_pavi.AutoPAVI.plate_inputs` and read by the sampler, the summaries, the
    diagnostics and the ArviZ export.

    :ivar sizes: ``{plate: full size}`` (new data may change them).
    :ivar indices: ``{plate: element indices}`` (every element of every plate).
    :ivar trace: a model trace over those elements (the encoders' data), or None when the
        guide reads no data.
    :ivar bound: the model's arguments by name (ragged plates), else ``{}``.
    :ivar model_args: ``(args, kwargs)`` of the model (the training ones when a posterior
        method got none and the guide reads data).
    """

    sizes: dict
    indices: dict
    trace: dict | None
    bound: dict
    model_args: tuple


def element_noise(key: jax.Array, indices: list, dim: int) -> jax.Array:
    """Standard normal noise ``(*map(len, indices), dim)`` where element ``(i, j, ...)`` is
    drawn from ``fold_in(fold_in(key, i), j)...``: independent of the other elements."""
    if not indices:
        return jax.random.normal(key, (dim,))
    return jax.vmap(lambda i: element_noise(jax.random.fold_in(key, i), indices[1:], dim))(indices[0])


def masked_density(site: LatentSite, logq: jax.Array, trace_site: dict | None, grid: tuple) -> jax.Array:
    """Per-element ``logq (*grid)`` with the cells the model masks out removed.

    Where the model does not score a latent cell (``handlers.mask``, ``fn.mask``, or the
    imputed ``{name}_unobserved`` site of ``obs_mask`` at its observed cells), the guide must
    not score it either: its entropy alone would reward an ever wider guide there, and the
    loss would fall without bound. An element's density is spread evenly over its intrinsic
    cells (as in :meth:`LatentSite.spread_density`), so it keeps the share of its cells in.
    """
    mask = _data.site_mask(trace_site)
    if mask is None:
        return logq
    share = site.element_share(mask, grid)
    if share is None:
        return logq  # a mask that does not line up with the site: the model will complain
    return jnp.where(share > 0, logq * share, 0.0)


# ---------------------------------------------------------------------------------------
# encodings
# ---------------------------------------------------------------------------------------
def _set_encoding(plan: GuidePlan, params, plate_set: tuple, trace, indices, sizes, bound) -> jax.Array:
    """Encodings ``(*grid, D)`` of the current elements of plate set ``plate_set`` from data."""
    structure, enc = plan.structure, plan.encoder
    dims = {n: p.dim for n, p in structure.plates.items()}
    outs = []
    for kind, name in plan.sources[plate_set]:
        if kind == "ragged":
            outs.append(_ragged_encoding(plan, params, name, trace, indices, sizes, bound))
            continue
        x, oplates, mask = _data.observed_canonical(trace[name], dims, with_mask=True)
        width = plan.features[name] // (2 if name in plan.masked else 1)
        if x.shape[-1] != width:
            raise ValueError(
                f"Observed site '{name}' gives its set encoder {x.shape[-1]} features per "
                f"observation here but {width} in training: its event dims (and "
                "any batch dims that are not plates) are features, of fixed size. To encode "
                "sets of other sizes, put the varying dimension in a numpyro.plate instead of "
                "to_event()/expand()."
            )
        mean, std = plan.stats[name]
        x = (x - mean) / std
        if mask is not None:
            # masked cells may hold anything (NaN for missing data): they enter as the
            # feature's mean, and an indicator says which they are
            x = jnp.where(mask, x, 0.0)
        if name in plan.masked:
            observed = jnp.ones(x.shape, bool) if mask is None else mask
            x = jnp.concatenate([x, observed.astype(x.dtype)], -1)
        pooled = [p for p in oplates if p not in plate_set]
        perm = [oplates.index(p) for p in plate_set] + [oplates.index(p) for p in pooled] + [len(oplates)]
        h = jnp.transpose(x, perm)
        # a member of a set is a cell with any feature scored (a sub-set: any member): masked
        # padding neither enters the pooling nor the count, so a group's encoding does not
        # move with how far its data are padded
        member = None if mask is None else jnp.transpose(jnp.any(mask, -1), perm[:-1])
        encoders = params[plan.param_name(name, "encoder")]
        for level, p in enumerate(encoder_levels(structure, plate_set, name)):
            n = h.shape[-2]
            out = enc(encoders[encoder_key(p, level)], h, mask=member)
            count = n if member is None else jnp.sum(member, -1)
            h = jnp.concatenate([out, jnp.broadcast_to(_data.log_count(count, sizes[p], n), out.shape[:-1] + (1,))], -1)
            member = None if member is None else jnp.any(member, -1)
        outs.append(h)
    return readout(params[plan.param_name(plan.plate_set_name(plate_set), "encoder_out")], jnp.concatenate(outs, -1))


def _ragged_encoding(plan: GuidePlan, params, plate, trace, indices, sizes, bound) -> jax.Array:
    feats, ids, obs_plate = _data.ragged_parts(plan.structure, plate, plan.options.ragged[plate], trace, bound)
    mean, std = plan.stats[("ragged", plate)]
    feats = (feats - mean) / std
    B = int(indices[plate].shape[0])
    # position of each observation's element in the current subsample; B = not in it
    where = jnp.full((sizes[plate],), B).at[indices[plate]].set(jnp.arange(B))
    seg = where[ids]
    out = plan.encoder.segments(params[plan.param_name(plate, "ragged_encoder")], feats, seg, B + 1)[:B]
    counts = jax.ops.segment_sum(jnp.ones(seg.shape[0]), seg, B + 1)[:B]
    n_obs = int(trace[obs_plate]["value"].shape[0])
    return jnp.concatenate([out, _data.log_count(counts, sizes[obs_plate], n_obs)], -1)


def encodings(plan: GuidePlan, params: dict, indices: dict, trace, sizes: dict, bound: dict) -> dict:
    """Encodings ``(*grid, D)`` of the current elements of every plate set.

    :param indices: ``{plate: current element indices}``.
    :param trace: a model trace on those indices (the encoders' data).
    :param sizes: ``{plate: full size}``; ``bound``: the model's arguments by name.
    """
    params = plan.unpack(params)
    out = {}
    for plate_set, sources in plan.sources.items():
        if plate_set in plan.no_encoding:
            out[plate_set] = jnp.zeros(
                tuple(int(indices[p].shape[0]) for p in plate_set) + (plan.encoding_width(plate_set),)
            )
            continue
        enc = _set_encoding(plan, params, plate_set, trace, indices, sizes, bound) if sources else None
        for what in ("encoding", "residual"):
            free = params.get(plan.param_name(plan.plate_set_name(plate_set), what))
            if free is not None:
                free = free[jnp.ix_(*(indices[p] for p in plate_set))]
                enc = free if enc is None else enc + free
        out[plate_set] = enc
    return out


# ---------------------------------------------------------------------------------------
# one site
# ---------------------------------------------------------------------------------------
def _sample_site(plan: GuidePlan, site, params, enc, unc, centers, noise, chunk_size, path_gradient, base):
    """Sample one site on the grid of its plates' current elements.

    Parents enter the context as ``value - center``, where a parent's center is its
    flow's output at zero noise with zero parent input (held constant by
    ``stop_gradient``). This is a fixed per-element shift, so no information is lost,
    but the weights acting on parents no longer duplicate the bias: with raw values, a
    parent far from zero makes the coupling weights absorb bias noise, which slows
    SGD badly on the globals' scales.

    With ``path_gradient``, ``log q`` is evaluated with the variational parameters held
    constant (the path-derivative estimator, see ``AutoPAVI(estimator=...)``): same value,
    other gradient.

    With a Laplace ``base = (m, L)`` (``(*grid, d)``, ``(*grid, d, d)``), the flow's
    output ``u`` is placed as ``x = m + L^{-T} u``; children then see ``u`` as this
    site's context (its standardized deviation), which depends on the sample only. A site
    of ``plan.base_context`` also reads ``m`` and ``log diag L`` where others read their
    encoding.

    :return: canonical ``x (*grid, d)``, ``log q (*grid)`` and, when the site has
        children, its center ``(*grid, d)`` (else None).
    """
    grid = enc[site.plates].shape[:-1] if site.plates else ()
    n = math.prod(grid)
    flow = plan.flows[site.name]
    fparams = params[plan.param_name(site.name, "flow")]
    parents = [(plan.structure.latent[p], unc[p], centers[p]) for p in site.conditions_on]

    def rows(r, z, with_parents=True, m=None, chol=None):
        multi = jnp.unravel_index(r, grid) if grid else ()
        pos = dict(zip(site.plates, multi))
        own = enc[site.plates][tuple(pos[p] for p in site.plates)] if site.plates else jnp.zeros(jnp.shape(r) + (0,))
        # the base's inputs follow the encoding: functions of the sampled parents, not
        # variational parameters, so the path-derivative score below keeps their gradient
        base_in = []
        if m is not None and site.name in plan.base_context:
            base_in = [m, jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1))]
        # a context that is the same for every element (no encoding, no base inputs, global
        # parents only: the stored bases of a long table's crossed factors) stays one row:
        # the flow's conditioner then runs once, not once per element (it was most of a
        # posterior draw's time there), and its outputs broadcast against the noise
        shared = own.shape[-1] == 0 and not base_in and all(not par.plates for par, _, _ in parents)
        lead = (1,) if shared else jnp.shape(r)
        own = jnp.zeros(lead + (0,), own.dtype) if shared else own
        deltas = []
        for par, value, center in parents:
            at = tuple(pos[p] for p in par.plates)
            delta = value[at] - center[at] if with_parents else jnp.zeros_like(center[at])
            deltas.append(jnp.broadcast_to(delta, lead + (par.dim,)))
        x, logq = flow.sample_and_log_prob(fparams, z, jnp.concatenate([own, *base_in, *deltas], -1))
        if path_gradient and with_parents:
            # Sticking the landing: score the sample with the variational parameters held
            # constant (flow weights and the encoding, free or set-encoded); the sample, the
            # base's inputs and the parents' samples in the context keep their path gradients.
            frozen = jax.lax.stop_gradient
            logq = flow.log_prob(frozen(fparams), x, jnp.concatenate([frozen(own), *base_in, *deltas], -1))
        if m is None:
            return x, logq
        # x = m + L^{-T} u, so log q(x) = log q(u) + log|det L|; m and L are functions of
        # the sampled parents only (no variational parameter), so they keep their gradients
        u = x
        x = m + solve_lower(chol, u, transpose=True)
        logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
        return jnp.concatenate([x, u], -1), logq + logdet

    def run(fn, *xs):
        if chunk_size is None or n <= chunk_size:
            return fn(*xs)
        # whole chunks through ``fn``, one after the other: not ``lax.map(batch_size=...)``,
        # which vmaps ``fn`` over each chunk's elements and so would hand a chunk's LAPACK
        # calls (the base's triangular solve) to jaxlib as one batch, past the pieces of
        # laplace.in_pieces (a 2-core machine deadlocked there: RESULTS section 18)
        full = n // chunk_size * chunk_size
        head = [jnp.reshape(x[:full], (n // chunk_size, chunk_size, *x.shape[1:])) for x in xs]
        out = jax.tree.map(lambda y: jnp.reshape(y, (full, *y.shape[2:])), jax.lax.map(lambda a: fn(*a), head))
        if full == n:
            return out
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, fn(*(x[full:] for x in xs)))

    r = jnp.arange(n)
    out_shape = grid + (site.dim,)
    if base is not None:
        m, chol = base
        m, chol = jnp.reshape(m, (n, site.dim)), jnp.reshape(chol, (n, site.dim, site.dim))
        xu, logq = run(lambda r_, z_, m_, c_: rows(r_, z_, True, m_, c_), r, jnp.reshape(noise, (n, site.dim)), m, chol)
        x, u = xu[..., : site.dim], xu[..., site.dim :]
        center = jnp.reshape(x - u, out_shape) if site.name in plan.has_children else None
        return jnp.reshape(x, out_shape), jnp.reshape(logq, grid), center
    x, logq = run(rows, r, jnp.reshape(noise, (n, site.dim)))
    center = None
    if site.name in plan.has_children:
        zeros = jnp.zeros((n, site.dim))
        center, _ = run(lambda r_, z_: rows(r_, z_, with_parents=False), r, zeros)
        center = jax.lax.stop_gradient(jnp.reshape(center, out_shape))
    return jnp.reshape(x, out_shape), jnp.reshape(logq, grid), center


def laplace_base(
    plan: GuidePlan,
    site: LatentSite,
    values: dict,
    indices: dict,
    model_args,
    differentiate: bool = True,
    probe_modes: bool = False,
    start: jax.Array | None = None,
):
    """``(m, L, report)`` of ``site`` on the current elements, given the sampled ``values``
    of the sites before it (see :mod:`numpyro_pavi.laplace`); ``report`` is the
    :class:`~numpyro_pavi.laplace.NewtonReport` of its Newton problem, with its ``mode``.

    ``start`` (posterior draws only: ``differentiate`` and ``probe_modes`` False): where the
    Newton iterations start, canonical ``(*grid, sum of d)`` for the site and its later
    siblings (:func:`draw_starts`); None: the prior location given the parents, as in
    training.

    The later sites of the same plates (siblings such as a group's slope after its
    intercept) are part of the element's Newton problem and marginalized out of ``P``
    (a Schur complement): fixing them at a reference instead would bias this site by
    their deviation from it. Other later sites sit at their prior means.
    """
    if model_args is None:
        raise ValueError(
            f"Site '{site.name}' has a Laplace base (laplace=True), which needs the model's "
            "arguments: pass them (e.g. guide.sample_posterior(key, params, *args, **kwargs))."
        )
    args, kwargs = model_args
    latent = plan.structure.latent
    plates = {p: indices[p] for p in plan.structure.plates if p in indices}
    names = list(latent)
    group = [site] + [s for s in (latent[n] for n in names[names.index(site.name) + 1 :]) if s.plates == site.plates]

    values = {k: finite_cotangent(v) for k, v in values.items()}
    frozen = jax.lax.stop_gradient(values)
    # the group's prior means given the values before it, in canonical layout: the start of
    # training's Newton problem (of draws' too, except plan.reference_start's: below), kept
    # differentiable as the base of elements whose iterations do not converge
    trace = reference_trace(plan.model, {**plates, **values}, args, kwargs)
    prior = canonical_values(trace, group)
    joint = group_log_joint(plan.model, group, args, kwargs, trace, flat=plan.flat_unscored)

    def log_prior(z):
        # the group's own prior given its parents (no likelihood). A later sibling's prior
        # may read the site (an imputed observation's is the site's likelihood): it is
        # traced at z, so the floor holds their coupling (XLA drops the trace's unused
        # likelihood terms from a compiled step; an eager call runs the whole model)
        vals, lp = constrain_group(group, z)
        fns = trace if len(group) == 1 else reference_trace(plan.model, {**plates, **values, **vals}, args, kwargs)
        return lp + sum(jnp.sum(fns[g.name]["fn"].log_prob(vals[g.name])) for g in group)

    quadratic = site.name in plan.quadratic
    # draws of a quadratic site step from a start that does not depend on the draw (see
    # laplace.draw_start) where the setup probe found it lands on the mode too; an element
    # without a mode still falls back to its prior location
    if start is not None and (differentiate or probe_modes):
        raise ValueError("a Newton start is for posterior draws only (differentiate=False, probe_modes=False)")
    fixed_start = site.name in plan.reference_start and not (differentiate or probe_modes)
    if start is None:
        start = draw_start(plan.model, group, plates, args, kwargs) if fixed_start else prior
    m, chol, report = newton_base(
        lambda z: joint(z, {**plates, **values}),
        lambda z: joint(z, {**plates, **frozen}),
        start,
        NEWTON_STEPS,
        fallback=prior,
        # never wider than the prior (see laplace.at_least): where the likelihood is convex
        # at the base (a mixture's shoulder, an unconverged element) its curvature alone is not
        floor=lambda m: precision(grad_and_blocks(log_prior, m)[1]),
        report=True,
        differentiate=differentiate,
        probe_modes=probe_modes,
        quadratic=quadratic,
    )
    report = report._replace(mode=jax.lax.stop_gradient(m))
    if len(group) == 1:
        return m, chol, report
    d, total = site.dim, m.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(total), chol.shape)
    cov = in_pieces(lambda c, e: jax.scipy.linalg.cho_solve((c, True), e), chol, eye)[..., :d, :d]
    # the inverse of a marginal covariance: precision() of its negative symmetrizes it
    marginal = in_pieces(lambda c: jnp.linalg.cholesky(precision(-jnp.linalg.inv(c))), cov)
    return m[..., :d], marginal, report


# ---------------------------------------------------------------------------------------
# every site
# ---------------------------------------------------------------------------------------
def sample_latents(
    plan: GuidePlan,
    params: dict,
    rng_key: jax.Array,
    indices: dict,
    trace: dict | None,
    sizes: dict,
    bound: dict,
    *,
    model_args: tuple | None = None,
    chunk_size: int | None = None,
    path_gradient: bool = False,
    element_keys: bool = False,
    with_reports: bool = False,
    laplace_state: _state.LaplaceState | None = None,
    with_state: bool = False,
    fixed: dict | None = None,
    differentiate: bool = True,
    probe_modes: bool = False,
    starts: Mapping[str, jax.Array] | None = None,
    at_center: bool = False,
    enc: dict | None = None,
):
    """Top-down sample of every latent site on the given plate elements.

    :param plan: the guide's plan.
    :param params: the guide's params (``svi.get_params(state)``: flows and encoders packed,
        :meth:`GuidePlan.unpack`, or unpacked).
    :param indices: ``{plate: current element indices}``.
    :param trace: a model trace on those indices (observed data for the encoders), or None
        when the guide reads no data.
    :param sizes: ``{plate: full size}``; ``bound``: model arguments by name (ragged plates).
    :param model_args: ``(args, kwargs)`` of the model, for the Laplace bases.
    :param chunk_size: plate elements per chunk of each flow (None: all at once).
    :param path_gradient: score samples with the variational parameters held constant.
    :param element_keys: draw each element's noise from its own key (the site's key
        folded with the element's indices), so an element's draw does not depend on which
        other elements are sampled with it: chunked full-plate summaries then equal
        unchunked ones, up to the Newton iterations' stop (see :mod:`numpyro_pavi.summaries`).
    :param with_reports: also return ``{site: NewtonReport}`` of the Laplace bases.
    :param laplace_state: the stored bases (:mod:`numpyro_pavi.base_state`) of a plan with
        ``plan.stored``; None: computed from scratch at this call's globals.
    :param with_state: training: advance the state (refresh it every ``plan.stored.period``
        calls, with the mode's derivative with respect to the globals) and return it last.
        Without, a given state is used as it is and a missing one is computed without
        derivatives (posteriors).
    :param fixed: ``{site: canonical unconstrained value (*grid, d)}``: sites held at these
        values instead of sampled (their ``log q`` is 0), so the later sites are drawn from
        the guide's conditional given them (local calibration holds the globals this way).
    :param differentiate: False where no gradient is taken (posterior draws): the per-step
        Laplace bases skip the passes that only serve their derivative.
    :param probe_modes: the reports also say which elements have a higher mode next to
        their base's (:func:`~numpyro_pavi.laplace.higher_modes`; diagnostics only).
    :param starts: ``{site: canonical (*grid, sum of d)}``, where the Newton iterations of
        those sites' per-step bases start (posterior draws only, see :func:`draw_starts`).
    :param at_center: draw every site at zero noise (the guide's center), not from the key.
    :param enc: the :func:`encodings` of these elements, computed once by a caller that
        draws many times from the same params and data (None: computed here).
    :return: constrained site-layout values, canonical unconstrained values ``(*grid, d)``
        and per-element ``log q (*grid)`` (support log-det included), then the reports
        with ``with_reports``, then the new state with ``with_state``.
    """
    params = plan.unpack(params)
    if enc is None:
        enc = encodings(plan, params, indices, trace, sizes, bound)
    values, unc, centers, logqs, reports = {}, {}, {}, {}, {}
    theta = None  # the globals' vector, once the first site with a stored base is reached
    keys = jax.random.split(rng_key, len(plan.structure.latent))
    for site_key, (name, site) in zip(keys, plan.structure.latent.items()):
        grid = tuple(int(indices[p].shape[0]) for p in site.plates)
        if at_center:
            noise = jnp.zeros(grid + (site.dim,))
        elif element_keys:
            noise = element_noise(site_key, [indices[p] for p in site.plates], site.dim)
        else:
            noise = jax.random.normal(site_key, grid + (site.dim,))
        base = None
        if plan.stored is not None and name in plan.stored.sites:
            if theta is None:
                theta = _state.global_vector(plan.structure, plan.stored, unc)
                # training refreshes at the globals' center (their flows at zero noise), not
                # at this step's draw: the first-order expansion is then taken where the
                # draws are, not up to a few sds to one side of them (a global no flow reads
                # has no center computed: its draw stands in)
                center = {g: unc[g] if centers.get(g) is None else centers[g] for g in plan.stored.globals}
                anchor = _state.global_vector(plan.structure, plan.stored, center)
                laplace_state = _advance(plan, laplace_state, theta, anchor, model_args, with_state)
            block = plan.stored.block_of(name)
            earlier = {n: unc[n] for n in block[: block.index(name)]}
            # a nested block's base follows its ancestors' draws (a school's, its region's)
            ancestors = [
                ([plan.structure.latent[n] for n in outer], jnp.concatenate([unc[n] for n in outer], -1))
                for outer in plan.stored.ancestors_of(name)
            ]
            base = _state.stored_base(
                laplace_state, site, indices, theta, [plan.structure.latent[n] for n in block], earlier, ancestors
            )
            reports[name] = laplace_state.report(block[0], tuple(indices[p] for p in site.plates))
        elif plan.on_laplace(site):
            start = None if starts is None else starts.get(name)
            *base, reports[name] = laplace_base(
                plan, site, values, indices, model_args, differentiate, probe_modes, start
            )
        x, logq, centers[name] = _sample_site(
            plan, site, params, enc, unc, centers, noise, chunk_size, path_gradient, base
        )
        if fixed is not None and name in fixed:
            x, logq, centers[name] = _held(fixed[name], base, centers[name], grid)
        value, logdet = site.constrain(x)
        unc[name], values[name] = x, value
        logqs[name] = masked_density(site, logq - logdet, None if trace is None else trace.get(name), grid)
    out = (values, unc, logqs) + ((reports,) if with_reports else ())
    return out + (laplace_state,) if with_state else out


def draw_starts(
    plan: GuidePlan,
    params: dict,
    indices: dict,
    trace: dict | None,
    sizes: dict,
    bound: dict,
    *,
    model_args: tuple,
    chunk_size: int | None = None,
    laplace_state: _state.LaplaceState | None = None,
) -> dict:
    """Where the posterior draws' Newton iterations start, ``{site: canonical (*grid, sum of
    d)}`` for the sites of ``plan.warm_start``: each one's mode in the guide's center draw
    (every site at zero noise, :func:`sample_latents` with ``at_center``).

    A draw's parents differ from the center's by about their posterior sd, so its mode lies
    a fraction of an sd from this start, where training's start (the prior location given
    the parents) may lie several sds away: the iterations that follow stop after fewer
    steps, to the same tolerance. The start does not depend on the draw, so it is computed
    once for all of them. Only where the setup probe found the log joint concave around
    the mode (``plan.warm_start``): with a single mode, where the iterations start does not
    change where they end.
    """
    if not plan.warm_start:
        return {}
    reports = sample_latents(
        plan, params, jax.random.PRNGKey(0), indices, trace, sizes, bound, model_args=model_args,
        chunk_size=chunk_size, with_reports=True, laplace_state=laplace_state, differentiate=False,
        at_center=True,
    )[3]  # fmt: skip
    return {name: reports[name].mode for name in plan.warm_start if name in reports}


def _held(x: jax.Array, base, center, grid: tuple):
    """A site held at ``x`` (see ``fixed`` in :func:`sample_latents`): its value, a zero
    ``log q`` and the center its children read its deviation from. On a Laplace base a
    child reads ``u = L^T (x - m)``, so the center is ``x - u``; otherwise the center does
    not depend on the sample."""
    if base is not None and center is not None:
        m, chol = base
        u = jnp.einsum("...ji,...j->...i", chol, x - m)
        center = x - u
    return x, jnp.zeros(grid), center


def _advance(plan: GuidePlan, state, theta: jax.Array, anchor: jax.Array, model_args, training: bool):
    """The stored bases this call samples from (see :func:`sample_latents`): in training,
    the state refreshed at ``anchor`` every ``plan.stored.period`` calls; for a posterior
    without a state, the exact conditional mode at this draw's globals ``theta``."""
    if model_args is None:
        raise ValueError(
            "Stored Laplace bases need the model's arguments: pass them "
            "(e.g. guide.sample_posterior(key, params, *args, **kwargs))."
        )
    spec, structure = plan.stored, plan.structure
    if not training and state is not None:
        return state
    if state is None:
        state = _state.init_state(structure, spec)
    if training and state.score is None:
        # a state stored before the control variate's score: refresh it at this step, so
        # the score comes from the same refresh as the modes it is taken at
        state = state._replace(score=_state.init_state(structure, spec).score, count=jnp.zeros_like(state.count))
    if not training:
        cold = _state.COLD_SWEEPS
        return _state.refresh(
            plan.model, structure, spec, state, theta, model_args, sweeps=cold, tangents=False,
            flat=plan.flat_unscored, score=False,
        )  # fmt: skip
    sweeps = jnp.where(state.count == 0, _state.COLD_SWEEPS, _state.WARM_SWEEPS)

    def refreshed(s):
        new = _state.refresh(plan.model, structure, spec, s, anchor, model_args, sweeps=sweeps, flat=plan.flat_unscored)
        # a refresh at non-finite globals (a step that stable_update then rejects) would
        # otherwise stay in the state, and every later refresh warm-starts from it
        floats = [x for x in jax.tree.leaves(new) if jnp.issubdtype(x.dtype, jnp.floating)]
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
        return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, s)

    state = jax.lax.cond(state.count % spec.period == 0, refreshed, lambda s: s, state)
    return state._replace(count=state.count + 1)
