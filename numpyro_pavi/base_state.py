"""Laplace bases kept across steps, for long-format data whose rows are subsampled.

A long table (one row per rating, with crossed factors such as users x items) is trained
with its *rows* subsampled, ``numpyro.plate("ratings", N, subsample_size=B)``, while the
local sites live on full plates of their own. A step's rows then say almost nothing about
most elements: most users have no row in a batch of 1,024 out of 70,000, and the rest are
seen through an ``N / B`` magnifying glass. An element's Laplace base computed from the
batch (:func:`numpyro_pavi.sampling.laplace_base`) changes with the batch, and with the
other factor's effects at their prior means it is shifted by the effects of the items each
user rated.

Here the bases of those sites are a state, threaded explicitly (optax style) and kept by
the guide between SVI steps:

* :func:`refresh` computes, from **all** rows, the joint mode of the local sites given the
  global ones (block Gauss-Seidel: one block's Newton problem at a time, the other blocks
  at their current modes, as backfitting does for crossed factors), each element's
  precision there, and the mode's derivative with respect to the globals (implicit
  function theorem, solved by the same Gauss-Seidel sweeps on the tangents). A *block* is
  the sites on the same plates (a user's intercept and slope written as two sites): one
  Newton problem per element over their coordinates together. Sweeps start from the
  stored state, so a warm refresh costs a few passes over the data.
* :func:`stored_base` gives a step's base without touching the model: the mode expanded to
  first order in the sampled globals, ``m = mode + J (theta - anchor)``, and the stored
  precision. The value and its gradient with respect to the globals are those of the
  full-data conditional mode (exact for a Gaussian likelihood that is linear in them). A
  later site of a block gets the Gaussian conditional given its earlier siblings' sampled
  values (and marginal over the later ones), as the joint Laplace approximation has it.
* A *nested* block (students in schools: its plates strictly contain its parent block's;
  or in schools in regions, a chain of them) moves its mode to first order in its
  ancestors' sampled values, and an ancestor's precision is its marginal over its
  descendants, conditional on its own ancestors (:func:`_nested_precisions`, a block
  elimination from the innermost plates out): given the globals, the Laplace approximation
  of a region, its schools and their students jointly.

* :func:`control_variate` uses the state against the rows' noise: the batch's log joint,
  scaled by ``N / B``, has the same first-order expansion at the stored modes on average
  as the log joint of all rows, whose gradient a refresh stores. The difference of the
  two is a zero-mean term that the guide adds to its log density, so a step's gradient
  keeps of the rows' noise only the part that the draw's distance from the mode makes.

The guide refreshes every ``refresh_every`` steps (default: once per pass over the rows),
so the amortized cost is about one extra pass over the data per epoch; a step itself reads
only its batch. Which sites qualify is decided once, at setup (:func:`stored_spec`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .laplace import (
    NEWTON_STEPS,
    NewtonReport,
    _cholesky,
    constrain_group,
    grad_and_blocks,
    in_pieces,
    lift_chol,
    log_joint,
    newton_iterate,
    precision_chol,
    reference_trace,
    solve_lower,
    unscored_group_coordinates,
)
from .structure import LatentSite, ModelStructure

__all__ = [
    "LaplaceState",
    "StoredSpec",
    "control_variate",
    "global_vector",
    "init_state",
    "refresh",
    "stored_base",
    "stored_obstacle",
    "stored_spec",
    "subsampled_rows",
]

#: Most unconstrained coordinates of the global sites the stored modes are expanded in
#: (the derivative ``J`` holds this many columns per element).
MAX_GLOBAL_DIM = 64
#: Most Gauss-Seidel sweeps of a refresh from the stored state, and of the first one (from
#: the prior means); warm refreshes carry the convergence over from one to the next.
WARM_SWEEPS = 2
COLD_SWEEPS = 200
#: Largest change of a stored base's log width between refreshes (the first-order
#: expansion in the globals is clipped there).
MAX_LOG_WIDTH_CHANGE = 3.0
#: A refresh stops sweeping once no element's mode (or derivative) moved by more than this
#: many of its sds in a sweep.
SETTLED = 1e-4


@dataclass(frozen=True)
class StoredSpec:
    """Which sites have stored bases (decided at setup by :func:`stored_spec`).

    :param sites: the local sites, in model order.
    :param globals: the global sites the modes depend on (all before the first local one).
    :param period: steps between refreshes.
    :param blocks: the local sites grouped by their plates (sites on the same plates form
        one block, in model order); the state is keyed by each block's first site.
    :param parents: ``(child, ancestor)`` pairs of blocks (by first site): the child's
        plates strictly contain the ancestor's (students nested in schools, schools in
        regions), so its base follows the ancestor's sampled value and the ancestor's is its
        marginal over its descendants; a child's ancestors in order, outermost first.
    """

    sites: tuple[str, ...]
    globals: tuple[str, ...]
    period: int
    blocks: tuple[tuple[str, ...], ...] = ()
    parents: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.blocks:  # a spec built without blocks (one pickled before them): one per site
            object.__setattr__(self, "blocks", tuple((n,) for n in self.sites))

    def block_of(self, name: str) -> tuple[str, ...]:
        """The block holding site ``name`` (its first site keys the state)."""
        return next((b for b in self.blocks if name in b), (name,))

    def ancestors_of(self, name: str) -> list[tuple[str, ...]]:
        """The blocks whose plates the block of site ``name`` is nested in, outermost first
        (regions, then schools, for a student)."""
        first = self.block_of(name)[0]
        return [self.block_of(outer) for child, outer in self.parents if child == first]



class LaplaceState(NamedTuple):
    """Stored Laplace bases of the sites of a :class:`StoredSpec`, over their full plates,
    keyed by the first site of each block (:attr:`StoredSpec.blocks`); ``d`` is the block's
    coordinates, its sites' canonical values concatenated in model order.

    :ivar mode: ``{block: (*sizes, d)}`` the joint mode (canonical unconstrained values).
    :ivar chol: ``{block: (*sizes, d, d)}`` Cholesky factors of each element's precision there
        (a parent block's: its marginal precision over its nested children).
    :ivar jac: ``{block: (*sizes, d, k)}`` derivative of the mode with respect to ``anchor``.
    :ivar dchol: ``{block: (*sizes, d, d, k)}`` derivative of ``chol`` with respect to
        ``anchor`` (the mode moving along ``jac``).
    :ivar decrement: ``{block: (*sizes)}`` Newton decrement at the last refresh.
    :ivar concave: ``{block: (*sizes)}`` whether the curvature there was negative definite.
    :ivar anchor: ``(k,)`` the globals' unconstrained values at the last refresh.
    :ivar count: ``()`` guide calls so far; a refresh happens when ``count % period == 0``.
    :ivar pjac: ``{child block: (*sizes, d, d_ancestors)}`` derivative of a nested block's
        conditional mode with respect to its ancestor blocks' values, concatenated outermost
        first (:attr:`StoredSpec.parents`); None where no block is nested.
    :ivar dpjac: ``{child block: (*sizes, d, d_ancestors, k)}`` its derivative with respect
        to ``anchor``.
    :ivar score: ``{block: (*sizes, d)}`` the gradient of the model's log joint over all rows
        at ``mode`` and ``anchor`` with respect to each block's canonical values, and
        ``{"": (k,)}`` with respect to the globals: the full-data half of the steps'
        control variate (:func:`control_variate`); None in a state stored before it (a
        training step then refreshes it).
    """

    mode: dict
    chol: dict
    jac: dict
    dchol: dict
    decrement: dict
    concave: dict
    anchor: jax.Array
    count: jax.Array
    pjac: dict | None = None
    dpjac: dict | None = None
    score: dict | None = None

    def report(self, name: str, at: tuple | None = None) -> NewtonReport:
        """The :class:`NewtonReport` of block ``name``'s elements (at index arrays ``at``)."""
        dec, conc = self.decrement[name], self.concave[name]
        if at is not None:
            dec, conc = dec[jnp.ix_(*at)], conc[jnp.ix_(*at)]
        return NewtonReport(dec, conc)


def _global_dim(sites) -> int:
    return int(sum(s.dim for s in sites))


def subsampled_rows(structure: ModelStructure) -> list[str]:
    """The plates subsampled while they hold no latent site: a long table's rows."""
    held = {p for s in structure.latent.values() for p in s.plates}
    return [p for p, info in structure.plates.items() if info.subsample_size < info.size and p not in held]


def stored_obstacle(structure: ModelStructure, laplace_sites) -> str | None:
    """Why a model gets no stored bases, in words naming the sites (None where it gets them).

    Stored bases apply when observations are subsampled along a plate that holds no latent
    site (the rows of a long table, :func:`subsampled_rows`), every local site is on a
    Laplace base, none of their plates is subsampled, the local sites nest at most one
    chain (the plate sets that a site's plates strictly contain are nested in one another,
    and their sites are sampled before it: students in schools in regions, not an
    interaction of two crossed factors; sites on the same plates, a user's intercept and
    slope as separate sites, form one block), and
    the global sites all come before the local ones, with at most ``MAX_GLOBAL_DIM``
    unconstrained coordinates in all.
    """
    latent = list(structure.latent.values())
    local = [s for s in latent if s.plates]
    if not local:
        return "the model has no local site"
    if not subsampled_rows(structure):
        return "no observations are subsampled along a plate of their own"
    for s in local:
        if s.name not in laplace_sites:
            return f"site '{s.name}' has no Laplace base"
        for p in s.plates:
            if structure.plates[p].subsample_size < structure.plates[p].size:
                return f"site '{s.name}' is on a subsampled plate ('{p}')"
    for b in local:
        inner = [a for a in local if set(a.plates) < set(b.plates)]
        sets = sorted({frozenset(a.plates) for a in inner}, key=len)
        if any(not outer < deeper for outer, deeper in zip(sets, sets[1:])):
            names = "', '".join(a.name for a in inner)
            return (
                f"site '{b.name}' sits on plates containing those of sites on crossed plates ('{names}'): "
                "stored bases follow nested plates (students in schools in regions), not an interaction "
                "of two crossed factors"
            )
        late = [a for a in inner if latent.index(a) > latent.index(b)]
        if late:
            return f"site '{b.name}' comes before site '{late[0].name}', whose plates it is nested in (sample the outer site first)"
    first = latent.index(local[0])
    glob = [s for s in latent if not s.plates]
    for g in glob:
        if latent.index(g) > first:
            return f"global site '{g.name}' comes after local site '{local[0].name}' (sample the global sites first)"
    if _global_dim(glob) > MAX_GLOBAL_DIM:
        return f"the global sites have {_global_dim(glob)} unconstrained coordinates (at most {MAX_GLOBAL_DIM})"
    return None


def stored_spec(structure: ModelStructure, laplace_sites, refresh_every: int | None = None) -> StoredSpec | None:
    """The stored-bases spec of a model, or None where the per-step bases apply (see
    :func:`stored_obstacle` for when it applies)."""
    if stored_obstacle(structure, laplace_sites) is not None:
        return None
    latent = list(structure.latent.values())
    local = [s for s in latent if s.plates]
    glob = [s for s in latent if not s.plates]
    if refresh_every is None:
        refresh_every = max(
            math.ceil(structure.plates[p].size / structure.plates[p].subsample_size) for p in subsampled_rows(structure)
        )
    blocks = {}
    for s in local:  # sites on the same plates (in any order of their names): one block
        blocks.setdefault(frozenset(s.plates), []).append(s.name)
    parents = tuple(  # each child's ancestors outermost first (a chain: stored_obstacle)
        (names[0], blocks[outer][0])
        for plates, names in blocks.items()
        for outer in sorted((o for o in blocks if o < plates), key=len)
    )
    return StoredSpec(
        tuple(s.name for s in local),
        tuple(g.name for g in glob),
        int(refresh_every),
        tuple(map(tuple, blocks.values())),
        parents,
    )


def _sizes(structure: ModelStructure, site: LatentSite) -> tuple[int, ...]:
    return tuple(structure.plates[p].size for p in site.plates)


def init_state(structure: ModelStructure, spec: StoredSpec) -> LaplaceState:
    """The state before the first refresh: modes at zero, unit precisions, count 0 (so the
    first call refreshes from scratch)."""
    latent = structure.latent
    k = _global_dim([latent[g] for g in spec.globals])
    mode, chol, jac, dchol, dec, conc = {}, {}, {}, {}, {}, {}
    for block in spec.blocks:
        name, sites = block[0], [latent[n] for n in block]
        shape, d = _sizes(structure, sites[0]), _global_dim(sites)
        mode[name] = jnp.zeros(shape + (d,))
        chol[name] = jnp.broadcast_to(jnp.eye(d), shape + (d, d))
        jac[name] = jnp.zeros(shape + (d, k))
        dchol[name] = jnp.zeros(shape + (d, d, k))
        dec[name] = jnp.full(shape, jnp.inf)
        conc[name] = jnp.zeros(shape, bool)
    pjac = dpjac = None
    if spec.parents:
        pjac, dpjac = {}, {}
        for child in dict(spec.parents):
            dp = sum(_global_dim([latent[n] for n in outer]) for outer in spec.ancestors_of(child))
            pjac[child] = jnp.zeros(mode[child].shape + (dp,))
            dpjac[child] = jnp.zeros(mode[child].shape + (dp, k))
    score = {"": jnp.zeros((k,)), **{name: jnp.zeros_like(m) for name, m in mode.items()}}
    zero = jnp.zeros((), jnp.int32)
    return LaplaceState(mode, chol, jac, dchol, dec, conc, jnp.zeros((k,)), zero, pjac, dpjac, score)


def _to_child(x: jax.Array, outer: Sequence[str], inner: Sequence[str]) -> jax.Array:
    """``x (*outer sizes, ...)`` on the grid of plates ``inner`` (which contain ``outer``):
    its axes in ``inner``'s order, size 1 on the plates ``outer`` lacks."""
    order = [p for p in inner if p in outer]
    x = jnp.transpose(x, [list(outer).index(p) for p in order] + list(range(len(outer), x.ndim)))
    sizes = dict(zip(order, x.shape))
    return jnp.reshape(x, tuple(sizes.get(p, 1) for p in inner) + x.shape[len(order) :])


def _to_parent(x: jax.Array, inner: Sequence[str], outer: Sequence[str]) -> jax.Array:
    """``x (*inner sizes, ...)`` summed over the plates of ``inner`` that ``outer`` lacks,
    its axes in ``outer``'s order."""
    x = jnp.sum(x, axis=tuple(i for i, p in enumerate(inner) if p not in outer))
    order = [p for p in inner if p in outer]
    return jnp.transpose(x, [order.index(p) for p in outer] + list(range(len(order), x.ndim)))


def global_vector(structure: ModelStructure, spec: StoredSpec, unc: Mapping) -> jax.Array:
    """``(k,)``: the globals' canonical unconstrained values, concatenated in model order."""
    parts = [jnp.reshape(unc[g], (structure.latent[g].dim,)) for g in spec.globals]
    return jnp.concatenate(parts) if parts else jnp.zeros((0,))


def _global_values(structure: ModelStructure, spec: StoredSpec, theta: jax.Array) -> dict:
    sites = [structure.latent[g] for g in spec.globals]
    cuts = np.cumsum([s.dim for s in sites])[:-1].tolist()
    return {s.name: s.constrain(part)[0] for s, part in zip(sites, jnp.split(theta, cuts))} if sites else {}


def refresh(
    model,
    structure: ModelStructure,
    spec: StoredSpec,
    state: LaplaceState,
    theta: jax.Array,
    model_args: tuple,
    *,
    sweeps: int | jax.Array = WARM_SWEEPS,
    tangents: bool = True,
    flat: Collection[str] | None = None,
    score: bool = True,
) -> LaplaceState:
    """The state at globals ``theta (k,)``, from all of the data (see the module docstring).

    :param model: the user's model; ``model_args``: its ``(args, kwargs)``, with the data of
        every row (the observation plates are opened at all of their elements).
    :param sweeps: most Gauss-Seidel sweeps over the blocks, each one Newton problem per block
        (iterated until its elements converge, at most ``NEWTON_STEPS`` iterations); they
        stop once no element moved by more than ``SETTLED`` of its sd.
    :param tangents: also update ``jac`` (at most as many sweeps, on the tangents).
    :param flat: the later sites of a block whose cells the model does not score are flat
        directions of its Newton problem (``GuidePlan.flat_unscored``, as for the per-step
        bases' :func:`~numpyro_pavi.laplace.group_log_joint`; None: every such site).
    :param score: also update :attr:`LaplaceState.score` (training's control variate; one
        more backward pass over all rows).
    :return: the new state (every array held constant for gradients), ``count`` unchanged.
    """
    args, kwargs = model_args
    latent = structure.latent
    theta = jax.lax.stop_gradient(theta)
    plates = {p: jnp.arange(info.size) for p, info in structure.plates.items()}
    blocks = {b[0]: [latent[n] for n in b] for b in spec.blocks}
    # a later site of a block that the model does not score at some cells (obs_mask's
    # imputed cells): a unit quadratic on them, as the per-step bases have it, so the
    # block's first site keeps its curvature and its elements converge
    unscored = dict.fromkeys(blocks)
    if any(len(group) > 1 for group in blocks.values()):
        trace = reference_trace(model, {**plates, **_global_values(structure, spec, theta)}, args, kwargs)
        unscored = {name: unscored_group_coordinates(group, trace, flat) for name, group in blocks.items()}

    def logp(name, z, modes, th):
        vals = {}
        for other, group in blocks.items():
            if other != name:
                vals.update(constrain_group(group, modes[other])[0])
        own, logdet = constrain_group(blocks[name], z)
        joint = {**plates, **_global_values(structure, spec, th), **vals, **own}
        out = unscored[name]
        extra = 0.0 if out is None else -0.5 * jnp.sum(jnp.where(out, z, 0.0) ** 2)
        return log_joint(model, joint, args, kwargs) + logdet + extra

    ancestors = {child: [outer[0] for outer in spec.ancestors_of(child)] for child in dict(spec.parents)}
    site_plates = {name: group[0].plates for name, group in blocks.items()}

    def at(modes, th):
        return _nested_precisions(logp, blocks, ancestors, site_plates, modes, th)

    def sweep(_, carry):
        modes, chols, decs, concs = (dict(c) for c in carry)
        for name in blocks:
            z, chol, rep = newton_iterate(
                lambda z, name=name, m=dict(modes): logp(name, z, m, theta), modes[name], NEWTON_STEPS
            )
            modes[name], chols[name], decs[name], concs[name] = z, chol, rep.decrement, rep.concave
        return modes, chols, decs, concs

    # start from the stored modes moved to these globals along their derivative: the
    # sweeps then only remove what the first-order expansion misses
    start = {n: state.mode[n] + state.jac[n] @ (theta - state.anchor) for n in blocks}
    carry = (start, state.chol, state.decrement, state.concave)
    modes, chols, decs, concs = _until_settled(sweep, carry, sweeps, lambda c: (c[0], c[1]))
    jac = state.jac
    if tangents:
        k = theta.shape[0]

        def tangent_sweep(_, jac):
            jac = dict(jac)
            for name in blocks:
                # d(grad_s) along (modes' tangents, e_c) for each global coordinate c; at the
                # fixed point, J_s <- J_s + P_s^{-1} d(grad_s) is a Gauss-Seidel step on
                # H J = -dg/dtheta (H_ss = -P_s)
                def column(dmodes, dtheta, name=name):
                    grad = lambda m, th: jax.grad(lambda z: logp(name, z, m, th))(m[name])  # noqa: E731
                    return jax.jvp(grad, (modes, theta), (dmodes, dtheta))[1]

                dmodes = {n: jnp.moveaxis(jac[n], -1, 0) for n in jac}
                out = jnp.moveaxis(jax.vmap(column)(dmodes, jnp.eye(k)), 0, -1)  # (*sizes, d, k)
                step = in_pieces(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b), chols[name], out)
                jac[name] = jac[name] + step
            return jac

        if k:
            jac = _until_settled(tangent_sweep, dict(jac), sweeps, lambda j: (j, chols))
        (chols, pjac), (dchol, dpjac) = _precisions(at, modes, theta, jac)
    elif spec.parents:
        chols, pjac = at(modes, theta)
        dchol, dpjac = state.dchol, state.dpjac
    else:
        # the sweeps' factors are the Newton steps' (a wide element's own curvature): the
        # base's width is lifted, as _precisions' is
        chols = {n: lift_chol(c) for n, c in chols.items()}
        dchol, pjac, dpjac = state.dchol, state.pjac, state.dpjac
    if not spec.parents:  # as init_state has it: one tree structure across refreshes
        pjac = dpjac = None
    score = _full_score(model, structure, spec, theta, modes, model_args) if score else state.score
    new = LaplaceState(modes, chols, jac, dchol, decs, concs, theta, state.count, pjac, dpjac, score)
    return jax.lax.stop_gradient(new)


def _rows_log_joint(model, structure: ModelStructure, spec: StoredSpec, plates: Mapping, model_args: tuple):
    """``(theta (k,), {block: canonical (*sizes, d)}) -> ()``: the model's log joint (scaled as
    in training) on the rows of ``plates`` (``{plate: indices}``), no Jacobian of the
    supports (the control variate's two halves differ by the rows only)."""
    args, kwargs = model_args
    latent = structure.latent
    blocks = {b[0]: [latent[n] for n in b] for b in spec.blocks}

    def logp(theta, modes):
        vals = {}
        for name, group in blocks.items():
            vals.update(constrain_group(group, modes[name])[0])
        return log_joint(model, {**plates, **_global_values(structure, spec, theta), **vals}, args, kwargs)

    return logp


def _full_score(model, structure: ModelStructure, spec: StoredSpec, theta, modes: dict, model_args: tuple) -> dict:
    """:attr:`LaplaceState.score` at ``theta`` and ``modes``: one backward pass over all rows."""
    plates = {p: jnp.arange(info.size) for p, info in structure.plates.items()}
    g_theta, g_modes = jax.grad(_rows_log_joint(model, structure, spec, plates, model_args), (0, 1))(theta, modes)
    return {"": g_theta, **g_modes}


def control_variate(
    model,
    structure: ModelStructure,
    spec: StoredSpec,
    state: LaplaceState,
    theta: jax.Array,
    values: Mapping[str, jax.Array],
    indices: Mapping,
    model_args: tuple,
) -> jax.Array:
    """``()``: a zero-mean term that cancels most of the row subsampling's noise in a step's
    ELBO (a control variate; the guide adds it to its log density).

    A step sees the model's log joint ``l_B(x)`` on a batch of rows, scaled by ``N / B``.
    The linear term of its expansion at the stored modes and globals ``x0`` is known for
    all rows as well (:attr:`LaplaceState.score`), so ``c(x) = grad l_B(x0) . (x - x0) -
    grad l(x0) . (x - x0)`` has mean zero over the batches for every draw ``x`` that does
    not depend on the batch (stored bases, no encoder reading the batch's rows): the ELBO
    ``l_B(x) - c(x) - log q(x)`` stays unbiased, and its gradient keeps of the rows' noise
    only ``grad l_B(x) - grad l_B(x0)``, which is the rows' curvature times the draw's
    distance from the mode (a fraction of a posterior sd) where it was each row's residual.
    With constant-rate Adam this noise is what narrowed the posteriors of row-subsampled
    fits (RESULTS section 34).

    :param theta: ``(k,)`` the sampled globals (canonical unconstrained, model order).
    :param values: ``{block's first site: its sampled canonical values (*sizes, d)}`` over
        the full plates, the block's sites concatenated.
    :param indices: ``{plate: this step's indices}`` (the rows' batch).
    :return: ``c(x)``, which carries the draw's gradient (0 where ``state`` holds no
        refresh yet). Its cost: a forward-mode pass through the model on the batch, and
        its transpose in the step's gradient.
    """
    if state.score is None:
        return jnp.zeros(())
    # only a state from a refresh has its score at its modes: the initial state (a first
    # refresh rolled back as non-finite) has neither, and would bias the step
    refreshed = jnp.all(jnp.stack([jnp.all(jnp.isfinite(d)) for d in state.decrement.values()]))
    x0 = {name: state.mode[name] for name in values}
    delta = {name: values[name] - x0[name] for name in values}
    logp = _rows_log_joint(model, structure, spec, dict(indices), model_args)
    anchor = state.anchor
    _, batch = jax.jvp(logp, (anchor, x0), (theta - anchor, delta))
    full = jnp.dot(state.score[""], theta - anchor)
    for name in values:
        full = full + jnp.sum(state.score[name] * delta[name])
    return jnp.where(refreshed, batch - full, 0.0)


def _nested_precisions(logp, blocks: dict, ancestors: dict, plates: dict, modes: dict, th: jax.Array):
    """``(chols, pjacs)`` at the joint mode: each block's precision factor ``{block: (*sizes,
    d, d)}`` (an ancestor block's is its marginal over its descendants, conditional on its
    own ancestors) and each nested block's ``pjac``, the derivative of its conditional mode
    in its ancestors' values ``{child: (*sizes, d, d_ancestors)}`` (``ancestors``: ``{child:
    [ancestor blocks, outermost first]}``).

    With ``H`` the log joint's Hessian and ``G = H_ca`` (child rows, ancestors' columns, one
    element of each), the child's conditional mode moves by ``pjac = P_c^{-1} G`` per unit
    of its ancestors, and eliminating the child adds ``G^T P_c^{-1} G`` to the ancestors'
    Hessian (a Schur complement: the Laplace approximation of the ancestors with the child
    integrated out, rather than held at its mode), its diagonal blocks to each ancestor's
    own curvature and its off-diagonal ones to the coupling between a school and its
    region. Blocks are eliminated from the innermost plates out, so a school's precision
    and coupling to its region hold its students' terms when it is eliminated in turn.

    ``G`` is one forward-mode pass per ancestor coordinate, all ancestor elements at once:
    each child element is taken to read the ancestor element at its own indices of the
    shared plates, as a nested prior does (a likelihood reaching another school's effect
    from a student's row would be attributed to the student's own school). Two child blocks
    of one parent on plates neither of which contains the other (students and classes of
    a school) add their terms independently: their coupling given the parent is left out,
    as between crossed blocks."""
    hs = {}
    for name in blocks:
        _, hs[name] = grad_and_blocks(lambda z, name=name: logp(name, z, modes, th), modes[name])
    chols, pjacs, cross = {}, {}, {}
    for child in sorted(ancestors, key=lambda n: -len(plates[n])):
        chols[child] = precision_chol(hs[child])
        outer = ancestors[child]
        g = [_coupling(logp, child, a, modes, th) + cross.get((child, a), 0.0) for a in outer]
        g = jnp.concatenate(g, -1)  # (*child sizes, d, d_ancestors)
        pjacs[child] = in_pieces(lambda c, b: jax.scipy.linalg.cho_solve((c, True), b), chols[child], g)
        schur = jnp.einsum("...ji,...jk->...ik", g, pjacs[child])  # (*child sizes, D, D)
        cuts = np.cumsum([0] + [modes[a].shape[-1] for a in outer]).tolist()
        for i, a in enumerate(outer):
            for j in range(i, len(outer)):  # rows of ancestor outer[j], as deep as a or deeper
                rows, cols = slice(cuts[j], cuts[j + 1]), slice(cuts[i], cuts[i + 1])
                piece = _to_parent(schur[..., rows, cols], plates[child], plates[outer[j]])
                if j == i:
                    hs[a] = hs[a] + piece
                else:
                    cross[(outer[j], a)] = cross.get((outer[j], a), 0.0) + piece
    for name in blocks:
        if name not in chols:
            chols[name] = precision_chol(hs[name])
    return chols, pjacs


def _coupling(logp, child: str, parent: str, modes: dict, th: jax.Array) -> jax.Array:
    """``(*child sizes, d, d_parent)``: how each child element's gradient moves with its
    parent element's value (one forward-mode pass per parent coordinate)."""
    zp = modes[parent]

    def child_grad(value):
        return jax.grad(lambda z: logp(child, z, {**modes, parent: value}, th))(modes[child])

    eye = jnp.eye(zp.shape[-1], dtype=zp.dtype)
    cols = jax.vmap(lambda e: jax.jvp(child_grad, (zp,), (jnp.broadcast_to(e, zp.shape),))[1])(eye)
    return jnp.moveaxis(cols, 0, -1)


def _precisions(at, modes: dict, theta: jax.Array, jac: dict):
    """``at(modes, theta)`` (:func:`_nested_precisions`: the precision factors and nested
    blocks' ``pjac``) and its derivative with respect to the globals, the modes moving along
    ``jac``, with a last axis of ``k`` (one forward-mode pass per global coordinate).

    Without it a stored base's width is frozen at the anchor's globals, and the gradient
    misses how the width follows them: on epil, whose observation-level effects are as wide
    as their prior scale allows, the fit ended 10 nats worse than with per-step bases."""
    k = theta.shape[0]
    if not k:
        out = at(modes, theta)
        # no global to follow: an empty last axis, as init_state makes it
        return out, jax.tree.map(lambda c: jnp.zeros(c.shape + (0,), c.dtype), out)
    dmodes = {n: jnp.moveaxis(jac[n], -1, 0) for n in jac}
    eye = jnp.eye(k, dtype=theta.dtype)
    if max(m.shape[-1] for m in modes.values()) > 2 and jax.default_backend() == "cpu":
        # one column at a time: vmapped, each LAPACK call of the jvp would get k times the
        # elements that laplace.in_pieces gave it (a thread-pool deadlock on small CPUs)
        out = at(modes, theta)
        douts = jax.lax.map(lambda t: jax.jvp(at, (modes, theta), t)[1], (dmodes, eye))
    else:
        out, douts = jax.vmap(lambda dm, dt: jax.jvp(at, (modes, theta), (dm, dt)), out_axes=(None, 0))(dmodes, eye)
    return out, jax.tree.map(lambda d: jnp.moveaxis(d, 0, -1), douts)


def _until_settled(sweep, carry, max_sweeps, scaled):
    """Apply ``sweep(i, carry)`` until no element moves by more than ``SETTLED`` of its sd
    (``scaled(carry) = (values, chols)``, the values ``(*sizes, d, ...)``), at most
    ``max_sweeps`` times. Gauss-Seidel on crossed factors converges geometrically but slowly
    along the direction that moves one factor's effects up and the other's down (only the
    priors pin it: 0.89 per sweep on the tests' design), so a fixed count is either wasted
    or short."""

    def moved(old, new):
        vals_old, chols = scaled(old)
        vals_new, _ = scaled(new)
        out = 0.0
        for n in vals_new:
            diff = vals_new[n] - vals_old[n]
            diff = diff[..., None] if diff.ndim < chols[n].ndim else diff  # (*sizes, d, columns)
            # |L^T diff| per column: the change in sds of the element's precision
            sds = jnp.einsum("...ji,...jk->...ik", chols[n], diff)
            out = jnp.maximum(out, jnp.max(jnp.abs(sds), initial=0.0))
        return out

    def cond(loop):
        i, _, change = loop
        return (i < max_sweeps) & (change > SETTLED)

    def body(loop):
        i, c, _ = loop
        new = sweep(i, c)
        return i + 1, new, moved(c, new)

    _, carry, _ = jax.lax.while_loop(cond, body, (jnp.array(0), carry, jnp.array(jnp.inf)))
    return carry


def stored_base(
    state: LaplaceState,
    site: LatentSite,
    indices: Mapping,
    theta: jax.Array,
    block: Sequence[LatentSite] | None = None,
    given: Mapping[str, jax.Array] | None = None,
    ancestors: Sequence[tuple[Sequence[LatentSite], jax.Array]] = (),
):
    """``(m, L)`` of ``site`` on its current elements: the stored mode expanded to first order
    in the globals ``theta (k,)`` (whose gradient it carries) and the stored precision.

    :param block: the sites of ``site``'s block (:attr:`StoredSpec.blocks`; default: the site
        alone). A site after the first gets the Gaussian conditional given ``given``, and
        every site the marginal over the block's later sites.
    :param given: ``{earlier site of the block: canonical sampled value (*grid, d)}``.
    :param ancestors: a nested block's ancestor blocks (:attr:`StoredSpec.parents`),
        outermost first, each as its sites and their sampled canonical values concatenated,
        ``(*ancestor grid, d_ancestor)``. The block's mode moves to first order with their
        deviations from the ancestors' expanded modes (the block's conditional given its
        ancestors, whose gradient reaches their samples).
    :return: ``m (*grid, d)`` and ``L (*grid, d, d)``.
    """
    block = [site] if block is None else list(block)
    at = jnp.ix_(*(indices[p] for p in site.plates))
    name = block[0].name
    mode, jac, chol, dchol = state.mode[name][at], state.jac[name][at], state.chol[name][at], state.dchol[name][at]
    delta = theta - state.anchor
    lin = dchol @ delta  # (*grid, d, d)
    # first order in the globals, the diagonal through exp so the factor stays positive
    # however far a draw lies from the anchor (same value and derivative at the anchor)
    d = chol.shape[-1]
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    rate = jnp.clip(jnp.diagonal(lin, axis1=-2, axis2=-1) / diag, -MAX_LOG_WIDTH_CHANGE, MAX_LOG_WIDTH_CHANGE)
    eye = jnp.eye(d, dtype=chol.dtype)
    chol = (chol + lin) * (1.0 - eye) + eye * (diag * jnp.exp(rate))[..., None, :]
    mode = mode + jac @ delta
    if ancestors:
        shifts = []
        for sites, value in ancestors:
            outer = sites[0].plates
            where = jnp.ix_(*(indices[p] for p in outer))
            centre = state.mode[sites[0].name][where] + state.jac[sites[0].name][where] @ delta
            shift = _to_child(value - centre, outer, site.plates)
            shifts.append(jnp.broadcast_to(shift, mode.shape[:-1] + shift.shape[-1:]))
        pjac = state.pjac[name][at] + state.dpjac[name][at] @ delta  # (*grid, d, d_ancestors)
        mode = mode + jnp.einsum("...ij,...j->...i", pjac, jnp.concatenate(shifts, -1))
    if len(block) == 1:
        return mode, chol
    return _conditional(block, site, mode, chol, given or {})


def _conditional(block, site: LatentSite, mode: jax.Array, chol: jax.Array, given: Mapping):
    """``(m, L)`` of ``site`` from its block's joint Gaussian ``N(mode, (L L^T)^{-1})``
    (``mode (*grid, D)``, ``chol (*grid, D, D)``): given its earlier siblings' values,
    marginal over its later ones.

    With the precision factored the other way round, ``P = R R^T`` with ``R`` upper
    triangular (a Cholesky factorization in reversed order), both are read off ``R``:
    the site's conditional precision is ``R_jj R_jj^T`` and its mean ``m_j - R_jj^{-T}
    R_Ej^T (x_E - m_E)``, ``E`` the earlier coordinates."""
    cuts = np.cumsum([0] + [s.dim for s in block]).tolist()
    j = [s.name for s in block].index(site.name)
    lo, hi = cuts[j], cuts[j + 1]
    p = jnp.einsum("...ij,...kj->...ik", chol, chol)
    flip = lambda a: jnp.flip(a, (-2, -1))  # noqa: E731
    r = flip(_cholesky(flip(p)))  # (*grid, D, D) upper: P = R R^T
    r_jj = r[..., lo:hi, lo:hi]
    m = mode[..., lo:hi]
    if j:
        earlier = jnp.concatenate([given[s.name] for s in block[:j]], -1)
        pull = jnp.einsum("...ei,...e->...i", r[..., :lo, lo:hi], earlier - mode[..., :lo])
        m = m - solve_lower(jnp.swapaxes(r_jj, -1, -2), pull)
    own = r_jj if site.dim == 1 else _cholesky(jnp.einsum("...ij,...kj->...ik", r_jj, r_jj))
    return m, own
