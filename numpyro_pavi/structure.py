"""The plate structure of a NumPyro model, read from one trace.

:func:`model_structure` turns one trace of the model into an immutable
:class:`ModelStructure`: the plates (name, dim, full size, subsample size), the latent sites
in the model's order (plates, event shape, support, unconstrained size, the earlier sites
their flows condition on) and the observed sites. Everything the guide builds is derived from this description.

Layouts used throughout the package
-----------------------------------
*Site layout* is the shape NumPyro gives a site's value: ``batch_shape + event_shape`` with
plate dims at their (negative) ``dim`` positions. Batch positions not owned by a plate are
*intrinsic* dims (often size 1, from broadcasting).

*Canonical layout* is ``(*plate_sizes, d)``: one axis per plate of the site, outermost plate
(most negative dim) first, then the flattened unconstrained element of size ``d`` (intrinsic
dims times the unconstrained event). Flows work on rows of the canonical layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.primitives import Messenger
from numpyro.infer.util import helpful_support_errors

from .subsampling import subsample_draws

__all__ = ["LatentSite", "ModelStructure", "ObservedSite", "PlateInfo", "model_structure"]


@dataclass(frozen=True)
class PlateInfo:
    """One plate of the model.

    :param name: plate name.
    :param dim: negative batch dim the plate occupies.
    :param size: full number of elements.
    :param subsample_size: elements per model call when traced (``size`` when not subsampled).
    """

    name: str
    dim: int
    size: int
    subsample_size: int


@dataclass(frozen=True)
class LatentSite:
    """A latent sample site and everything needed to build its flow.

    :param name: site name.
    :param plates: names of the site's plates, outermost (most negative dim) first.
    :param batch_shape: batch shape in site layout when traced (plates at subsample size).
    :param event_shape: constrained event shape.
    :param unconstrained_event_shape: event shape after ``biject_to(support).inv``.
    :param intrinsic_shape: batch dims not owned by any plate, in position order.
    :param intrinsic_positions: their positions (0-based from the left of ``batch_shape``).
    :param support: the site's support constraint.
    :param conditions_on: the sites whose sampled values condition the site's flow: every
        earlier latent site whose plates are a subset of the site's plates: its prior
        parents in those plates, and the earlier *siblings* the posterior couples with it
        through shared observations (a group's intercept and slope, say) even when the prior
        does not. Sites in plates the site is not in are left out: their per-element values
        do not line up with this site's elements. A guide's plan may drop some (a stored
        block's earlier sites, and its ancestors' where its base is their exact
        conditional: ``plan._stored_context``), and reorders the leading globals, scales
        first, each conditioned on the globals before it in that order
        (``plan.scales_first``): ``guide.structure`` is the plan's.
    """

    name: str
    plates: tuple[str, ...]
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    unconstrained_event_shape: tuple[int, ...]
    intrinsic_shape: tuple[int, ...]
    support: Any
    intrinsic_positions: tuple[int, ...]
    conditions_on: tuple[str, ...] = ()

    @property
    def dim(self) -> int:
        """Size ``d`` of one plate element's flattened unconstrained value."""
        return math.prod(self.intrinsic_shape) * math.prod(self.unconstrained_event_shape)

    @property
    def plate_positions(self) -> tuple[int, ...]:
        """Batch positions (0-based from the left of ``batch_shape``) owned by plates."""
        return tuple(p for p in range(len(self.batch_shape)) if p not in self.intrinsic_positions)

    # -- layouts (see the module docstring) ------------------------------------------------
    def site_perm(self, lead: int = 0) -> list[int]:
        """Permutation taking ``(*lead, *plates, *intrinsic, *event)`` to site layout."""
        n_batch = len(self.batch_shape)
        plate_pos, intr_pos = self.plate_positions, self.intrinsic_positions
        perm = list(range(lead))
        for pos in range(n_batch):
            if pos in plate_pos:
                perm.append(lead + plate_pos.index(pos))
            else:
                perm.append(lead + len(plate_pos) + intr_pos.index(pos))
        n_event = len(self.event_shape)
        perm += list(range(lead + n_batch, lead + n_batch + n_event))
        return perm

    def to_canonical(self, value):
        """Site-layout *unconstrained* value ``(*batch, *unc_event) -> (*plates, d)``."""
        n_batch = len(self.batch_shape)
        order = list(self.plate_positions) + list(self.intrinsic_positions)
        order += list(range(n_batch, jnp.ndim(value)))
        value = jnp.transpose(value, order)
        grid = value.shape[: len(self.plate_positions)]
        return jnp.reshape(value, grid + (self.dim,))

    def constrain(self, x):
        """Canonical unconstrained ``x (*grid, d)`` -> site-layout value and ``log|det|`` on grid."""
        grid = x.shape[:-1]
        transform = biject_to(self.support)
        x_r = jnp.reshape(x, grid + self.intrinsic_shape + self.unconstrained_event_shape)
        y = transform(x_r)
        logdet = transform.log_abs_det_jacobian(x_r, y)
        logdet = jnp.sum(jnp.reshape(logdet, grid + (-1,)), -1)
        return jnp.transpose(y, self.site_perm()), logdet

    def spread_density(self, logq):
        """Per-element ``logq (*grid)`` as a batch-shaped array (site layout).

        Intrinsic dims are not plates, so the element's density is spread evenly over them:
        the sum over the site (which is all NumPyro ever uses) is unchanged.
        """
        n_intr = math.prod(self.intrinsic_shape)
        expanded = jnp.reshape(logq, logq.shape + (1,) * len(self.intrinsic_shape)) / n_intr
        batch = [1] * len(self.batch_shape)
        for ax, pos in enumerate(self.plate_positions):
            batch[pos] = logq.shape[ax]
        for pos, size in zip(self.intrinsic_positions, self.intrinsic_shape):
            batch[pos] = size
        perm = self.site_perm()[: len(self.batch_shape)]
        return jnp.broadcast_to(jnp.transpose(expanded, perm), tuple(batch))

    def element_share(self, mask, grid: tuple):
        """Share ``(*grid)`` of each element's cells that a batch-shaped ``mask`` keeps, or
        None when the mask does not line up with the site."""
        batch = list(self.batch_shape)
        for pos, size in zip(self.plate_positions, grid):
            batch[pos] = size
        try:
            mask = jnp.broadcast_to(mask, tuple(batch))
        except ValueError:
            return None
        order = list(self.plate_positions) + list(self.intrinsic_positions)
        return jnp.mean(jnp.reshape(jnp.transpose(mask, order), tuple(grid) + (-1,)), -1)


@dataclass(frozen=True)
class ObservedSite:
    """An observed sample site: the data of the plate elements it sits in.

    :param name: site name.
    :param plates: names of its plates, outermost first.
    :param shape: value shape when traced (site layout).
    :param event_shape: event shape.
    """

    name: str
    plates: tuple[str, ...]
    shape: tuple[int, ...]
    event_shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelStructure:
    """Immutable description of a model's plates and sites (see module docstring)."""

    plates: Mapping[str, PlateInfo]
    latent: Mapping[str, LatentSite]
    observed: Mapping[str, ObservedSite]

    def plate_order(self, names) -> tuple[str, ...]:
        """``names`` sorted outermost (most negative dim) first."""
        return tuple(sorted(names, key=lambda n: self.plates[n].dim))

    def num_latent_elements(self) -> int:
        """Number of scalar latent parameters over the full plates (the paper's count)."""
        return sum(site.dim * math.prod(self.plates[p].size for p in site.plates) for site in self.latent.values())


def _event_dim(site: dict) -> int:
    return len(site["fn"].event_shape)


def _check_plate_frames(trace: dict) -> dict[str, Any]:
    """Collect every plate frame seen on sample sites and check they agree."""
    frames: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            seen = frames.get(frame.name)
            if seen is None:
                frames[frame.name] = frame
                owner[frame.name] = name
            elif seen != frame:
                raise ValueError(
                    f"Plate '{frame.name}' is inconsistent: site '{owner[frame.name]}' sees it "
                    f"with dim={seen.dim}, size={seen.size} but site '{name}' with "
                    f"dim={frame.dim}, size={frame.size}. Declare the plate once (same size, "
                    "same subsample_size and same dim) and reuse it for every site it holds."
                )
    return frames


def full_indices(sizes: dict[str, int]) -> dict:
    """``{plate: arange(size)}``: every element of each plate (built where it is called, so
    inside a compiled program the ranges are computed, not embedded as constants)."""
    return {name: jnp.arange(size) for name, size in sizes.items()}


def plate_sizes(trace: dict) -> dict[str, int]:
    """``{plate: full size}`` of every plate seen in a trace.

    Plates opened inside ``numpyro.contrib.control_flow.scan`` leave no plate site, only
    frames on their sample sites (never subsampled there, see ``_plates``): their size is the
    frame's.
    """
    sizes = {}
    for site in trace.values():
        if site["type"] == "sample":
            for frame in site["cond_indep_stack"]:
                sizes.setdefault(frame.name, int(frame.size))
    for name, site in trace.items():
        if site["type"] == "plate":
            sizes[name] = int(site["args"][0])
    return sizes


def _unrecorded_plate(trace: dict, name: str, frame) -> PlateInfo:
    """A plate whose statement left no plate site: inside ``scan``, or hidden by ``block``."""
    sites = [s for s in trace.values() if s["type"] == "sample" and frame in s["cond_indep_stack"]]
    if not any(_in_scan(s) for s in sites):
        raise ValueError(
            f"Plate '{name}' holds sample sites but its plate statement is hidden from the guide's "
            "model, so its full size and subsample are unknown. handlers.block(model, expose=[...]) "
            f"hides plates too: block with hide=[...] instead, or add '{name}' to expose."
        )
    # a subsample scales its sites by N / B > 1; handlers.scale below 1 is not one
    if any(_scaled_up(s.get("scale")) for s in sites):
        raise ValueError(
            f"Plate '{name}' is subsampled inside scan (its sites are scaled by more than 1): the "
            "guide cannot see its full size or its indices there. Open the plate before scan "
            "(plate = numpyro.plate(...), then `with plate:` inside the step)."
        )
    return PlateInfo(name, frame.dim, int(frame.size), int(frame.size))


def _scaled_up(scale) -> bool:
    """Whether a site's scale exceeds 1 somewhere (a subsample's ``N / B``); a traced scale
    (a per-step weight computed in the model) is not a subsample's."""
    if scale is None:
        return False
    try:
        return bool(np.any(np.asarray(scale) > 1.0))
    except Exception:  # noqa: BLE001 - a tracer has no value
        return False


def _in_scan(site: dict) -> bool:
    # scan records its body's sites after the loop (time-stacked), without their plate sites
    return bool(site.get("_control_flow_done")) or "_scan_current_index" in site.get("infer", {})


def _plates(trace: dict, frames: dict) -> dict[str, PlateInfo]:
    plates = {}
    for name, frame in frames.items():
        site = trace.get(name)
        if site is None or site["type"] != "plate":
            plates[name] = _unrecorded_plate(trace, name, frame)
            continue
        size, subsample_size = site["args"]
        if subsample_size is not None and subsample_size > size:
            raise ValueError(
                f"Plate '{name}': subsample_size={subsample_size} is larger than the plate "
                f"size {size}. Use subsample_size <= {size}, or None to use the whole plate."
            )
        plates[name] = PlateInfo(name, frame.dim, int(size), int(frame.size))
    return plates


def _numpyro_support_error(site: dict) -> str:
    """NumPyro's own message for a support no continuous guide handles.

    Users (and NumPyro's guide tests) know these messages, e.g. "cannot handle discrete" or
    the ``ProjectedNormalReparam`` advice for spherical sites; AutoPAVI adds its own after it.
    """
    try:
        with helpful_support_errors(site):
            biject_to(site["fn"].support)
    except ValueError as e:
        return str(e)
    except NotImplementedError:
        pass
    return f"Latent site '{site['name']}' has support {site['fn'].support}, which has no bijection to the reals."


def _latent_site(site: dict, plates: Mapping[str, PlateInfo]) -> LatentSite:
    name = site["name"]
    fn = site["fn"]
    if fn.support.is_discrete:
        own_guide = (
            f"give it its own guide: AutoGuideList with AutoPAVI(handlers.block(model, "
            f"hide=['{name}'])) plus a guide for '{name}'"
        )
        if name.endswith("_unobserved"):
            # obs_mask's imputation site: the user wrote the observed one
            fix = f"impute the missing values of '{name[: -len('_unobserved')]}' outside the model, or {own_guide}"
        elif site.get("infer", {}).get("enumerate"):
            fix = (
                f"AutoPAVI does not skip enumerated sites: hide it (AutoPAVI(handlers.block(model, "
                f"hide=['{name}']))) and train with TraceEnum_ELBO, which marginalizes it"
            )
        elif getattr(fn, "has_enumerate_support", False):
            fix = (
                f"marginalize it with enumeration (numpyro.sample('{name}', ..., infer={{'enumerate': "
                f"'parallel'}}) and TraceEnum_ELBO) with AutoPAVI blind to it, or {own_guide}"
            )
        else:
            fix = own_guide
        raise ValueError(
            f"{_numpyro_support_error(site)} AutoPAVI's flows need continuous latents "
            f"('{name}' is {type(_base(fn)).__name__}): {fix}."
        )
    event_dim = _event_dim(site)
    shape = tuple(jnp.shape(site["value"]))
    batch_shape = shape[: len(shape) - event_dim]
    event_shape = shape[len(shape) - event_dim :]
    site_plates = {f.name: f for f in site["cond_indep_stack"]}
    n = len(batch_shape)
    owned = {n + f.dim for f in site_plates.values()}
    intrinsic_positions = tuple(p for p in range(n) if p not in owned)
    try:
        transform = biject_to(fn.support)
    except NotImplementedError as e:
        raise ValueError(
            f"{_numpyro_support_error(site)} AutoPAVI needs a bijection to the real numbers "
            "registered in numpyro.distributions.transforms.biject_to: register one or "
            "reparametrize the site."
        ) from e
    unc_event = tuple(transform.inverse_shape(event_shape))
    order = tuple(sorted(site_plates, key=lambda p: plates[p].dim))
    return LatentSite(
        name=name,
        plates=order,
        batch_shape=batch_shape,
        event_shape=event_shape,
        unconstrained_event_shape=unc_event,
        intrinsic_shape=tuple(batch_shape[p] for p in intrinsic_positions),
        support=fn.support,
        intrinsic_positions=intrinsic_positions,
    )


def _base(fn):
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


class check_plates(Messenger):
    """Effect handler: a plate name declared twice must have one size, and subsample indices
    (substituted by the user, or drawn) must lie in the plate and, where the plate holds a
    latent site, be distinct.

    NumPyro's trace keeps the last plate statement of a name only, and its frames carry the
    subsample size, not the plate's: ``plate("N", 10)`` for a site and ``plate("N", 20,
    subsample_size=10)`` for its data otherwise trained, indices past the site's 10
    elements clamped by JAX. Rows drawn with replacement (a plate of observations only) are
    legal.
    """

    def __enter__(self):
        self.sizes, self.repeated = {}, {}
        return super().__enter__()

    def process_message(self, msg):
        if msg["type"] == "sample" and not msg["is_observed"]:
            for frame in msg["cond_indep_stack"]:
                if frame.name in self.repeated:
                    raise ValueError(
                        f"Plate '{frame.name}' holds latent site '{msg['name']}' but got repeated subsample "
                        f"indices {self.repeated[frame.name]}: an element would be two. Pass distinct indices "
                        "(e.g. from numpyro_pavi.subsampling.subsample_indices)."
                    )
        if msg["type"] != "plate":
            return
        name, size = msg["name"], msg["args"][0]
        seen = self.sizes.setdefault(name, size)
        if seen != size:
            raise ValueError(
                f"Plate '{name}' is inconsistent: declared with {seen} elements and again with {size}, "
                "but a plate name stands for one set of elements. Give the plates different names, or the "
                "same size (with subsample_size for the subsampled one)."
            )

    def postprocess_message(self, msg):
        if msg["type"] != "plate" or msg["value"] is None:
            return
        size = msg["args"][0]
        if np.shape(msg["value"]) == (size,):
            return  # the whole plate (full indices): nothing to check, and O(N) to do it
        try:
            idx = np.asarray(msg["value"])
        except Exception:  # noqa: BLE001 - traced indices (inside jit) have no values
            return
        shown = f"{idx.tolist()[:8]}{'...' if idx.size > 8 else ''}"
        if idx.size and (idx.min() < 0 or idx.max() >= size):
            raise ValueError(
                f"Plate '{msg['name']}' got subsample indices {shown} outside its {size} elements: "
                "pass indices in [0, size)."
            )
        if np.unique(idx).size != idx.size:  # a subsample: B log B
            self.repeated[msg["name"]] = shown


def seeded_model(model, rng_key, data: Mapping[str, Any] | None = None, *, init: Any = None, full_plates: bool = False):
    """``model`` seeded with ``rng_key``, with ``data`` (site or plate name -> value)
    substituted, and a value for every improper latent site (``ImproperUniform``), which
    has no sampler: a uniform draw in ``(-2, 2)`` of its unconstrained space, as NumPyro's
    ``init_to_uniform`` gives. Subsampled plates draw their indices with
    :func:`~numpyro_pavi.subsampling.subsample_indices` where the subsample is small (see
    :class:`~numpyro_pavi.subsampling.subsample_draws`). Every trace this package takes of a
    user model goes through it.

    :param init: an init strategy (one of NumPyro's ``numpyro.infer.initialization``
        strategies) giving every other latent site its initial value, so one trace serves
        as the guide's prototype.
    :param full_plates: give every plate not in ``data`` all its indices (a subsampled
        plate is then traced over its full size, whatever the model's arguments make it).
    """
    from numpyro import handlers
    from numpyro.infer.initialization import init_to_uniform

    data = dict(data or {})

    def value(site):
        if site["name"] in data:
            return data[site["name"]]
        if full_plates and site["type"] == "plate":
            return jnp.arange(site["args"][0])
        if site["type"] != "sample" or site["is_observed"]:
            return None
        if init is not None:
            return init(site)
        if isinstance(_base(site["fn"]), dist.ImproperUniform):
            return init_to_uniform(site)
        return None

    # the guide's plates come from these traces: their subsample indices drawn without an
    # array of the whole plate (subsampling.subsample_draws)
    return handlers.substitute(handlers.seed(subsample_draws(check_plates(model)), rng_key), substitute_fn=value)


def _is_factor(site: dict) -> bool:
    return isinstance(_base(site["fn"]), dist.Unit)


def model_structure(trace: Mapping[str, dict]) -> ModelStructure:
    """Describe the plates and sites of a model from one trace of it.

    :param trace: an ordered trace of the model (``handlers.trace(handlers.seed(model, key))``).
        Site order is execution order, hence a topological order of the prior.
    :raises ValueError: for discrete latent sites, inconsistent plates, subsample sizes
        larger than their plate, or supports with no bijection.
    """
    frames = _check_plate_frames(trace)
    plates = _plates(trace, frames)
    latent: dict[str, LatentSite] = {}
    observed: dict[str, ObservedSite] = {}
    for name, site in trace.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            if _is_factor(site):
                # numpyro.factor: a log-density term, not data an encoder could read
                continue
            order = tuple(sorted((f.name for f in site["cond_indep_stack"]), key=lambda p: plates[p].dim))
            shape = tuple(jnp.shape(site["value"]))
            ev = _event_dim(site)
            observed[name] = ObservedSite(name, order, shape, shape[len(shape) - ev :])
            continue
        site_info = _latent_site(site, plates)
        context = tuple(p for p in latent if set(latent[p].plates) <= set(site_info.plates))
        latent[name] = dataclasses.replace(site_info, conditions_on=context)
    return ModelStructure(plates=plates, latent=latent, observed=observed)


def is_scale_support(support) -> bool:
    """True for a scale's support: bounded below only (``positive``, ``softplus_positive``,
    ``greater_than``: rates and degrees of freedom too), an interval from 0 other than a
    Beta's ``unit_interval`` (``Uniform(0, 100)`` on an sd), positive and ordered, or a
    covariance or its Cholesky factor (possibly with event dims). The guide's order of its
    globals follows it (:func:`~numpyro_pavi.plan.scales_first`); any order gives a valid
    guide, only what its Gaussian conditionals can express changes."""
    if isinstance(support, constraints.independent):
        support = support.base_constraint
    shapes = (
        constraints.positive_definite,
        constraints.positive_ordered_vector,
        constraints.corr_cholesky,
        constraints.corr_matrix,
        constraints.lower_cholesky,
        constraints.scaled_unit_lower_cholesky,
        constraints.softplus_lower_cholesky,
    )
    from_zero = False
    if isinstance(support, constraints._Interval) and support is not constraints.unit_interval:
        try:  # a bound computed under tracing is not read: the site keeps its place
            from_zero = bool(np.all(np.asarray(support.lower_bound) == 0))
        except Exception:
            from_zero = False
    return isinstance(support, constraints._GreaterThan) or from_zero or any(support is c for c in shapes)


def is_real_support(support) -> bool:
    """True when the support is the real line (possibly with event dims)."""
    return support is constraints.real or (
        isinstance(support, constraints.independent) and support.base_constraint is constraints.real
    )
