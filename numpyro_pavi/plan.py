"""The guide's plan: everything :class:`~numpyro_pavi.AutoPAVI` decides once, from one trace.

:func:`build_plan` turns the model's structure (:mod:`numpyro_pavi.structure`), the setup
trace and the guide's options into a frozen :class:`GuidePlan`: one conditional flow per
latent site, where each plate set gets its encodings (free, set-encoded from which data,
or none), the feature sizes and normalization constants of every data source, and the
initial value of every parameter, under its NumPyro-style name ``{site}_{prefix}_{what}``.
Sampling (:mod:`numpyro_pavi.sampling`) reads the plan and never changes it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions.transforms import biject_to

from . import data as _data
from .compiling import SMALL_DATA, data_size, run_once
from .base_state import StoredSpec, stored_obstacle, stored_spec, subsampled_rows
from .data import Ragged
from .encoders import SetEncoder, init_readout
from .flows import ConditionalFlow
from .laplace import (
    PROBE_RADII_SDS,
    LaplaceWarning,
    canonical_values,
    draw_start,
    one_step_base,
    grad_and_blocks,
    flat_unscored,
    group_log_joint,
    newton_iterate,
    precision_chol,
    reference_trace,
    solve_lower,
)
from .structure import LatentSite, ModelStructure, is_scale_support

__all__ = ["GuideOptions", "GuidePlan", "build_plan", "probe_laplace", "scales_first"]

#: A local site keeps its Laplace base when at least this share of its elements' Newton
#: problems converge at the initial values (see :func:`probe_laplace`): smooth likelihoods
#: converged for all elements in the likelihood matrix, a Laplace likelihood for 7%.
MIN_CONVERGED_AT_SETUP = 0.5

#: A data source of a plate set: ``("nested", observed_site)`` or ``("ragged", plate)``.
Source = tuple[str, str]


@dataclass(frozen=True)
class GuideOptions:
    """The guide's architecture options (see :class:`~numpyro_pavi.AutoPAVI`)."""

    encoding: str = "auto"
    encoding_dim: int = 8
    num_flows: int = 1
    flow_type: str = "autoregressive"
    hidden_dims: tuple[int, ...] = (32,)
    init_scale: float = 0.1
    encoder: SetEncoder = field(default_factory=SetEncoder)
    ragged: Mapping[str, Ragged] = field(default_factory=dict)
    laplace: bool = True
    prefix: str = "auto"
    refresh_every: int | None = None


@dataclass(frozen=True)
class GuidePlan:
    """What the guide samples and with which parameters (built by :func:`build_plan`).

    :param model: the user's model.
    :param structure: its plates and sites, in the guide's order (:func:`scales_first`), each
        site's ``conditions_on`` as the guide has it (:func:`_stored_context`).
    :param options: the guide's options.
    :param flows: ``{latent site: ConditionalFlow}``.
    :param sources: ``{plate set: data sources}`` for every plate set holding latent sites,
        in model order; an empty tuple means free encodings (or none, see ``no_encoding``).
    :param no_encoding: plate sets whose elements get no encoding (Laplace bases with no data
        inside the plates: ``encoding="set"``, or ``"auto"`` where :func:`per_element` says no).
    :param has_children: latent sites some later site's flow is conditioned on.
    :param features: encoder input width of each data source (observed site name, or
        ``("ragged", plate)``).
    :param stats: ``(mean, std)`` feature normalization of each data source (setup data).
    :param masked: observed sites with masked cells (their encoders also read the mask).
    :param init_values: ``{param name: initial value}``.
    :param laplace_sites: local sites on a Laplace base (None: every local site when
        ``options.laplace``, as in plans pickled before the setup probe).
    :param stored: the local sites whose bases are a state kept across steps (long-format
        data with rows subsampled, :mod:`numpyro_pavi.base_state`), or None.
    :param base_context: sites of plate sets with no data inside, all on Laplace bases (per
        step or stored; ``no_encoding``, or with free encodings under ``"auto"``), whose flow reads each
        element's base, its mode and the log of its precision factor's diagonal
        (``2 d`` values), beside its encoding if it has one. Not the sites whose Newton problem was
        found quadratic at setup (a Gaussian likelihood: the base is exact), which a setup
        under tracing cannot look at, so it gives every such site the inputs; empty in plans
        pickled before.
    :param quadratic: Laplace sites whose Newton problem was found quadratic at setup (a
        likelihood Gaussian in the site, ``_probe``): their base is one Newton
        step (:func:`~numpyro_pavi.laplace.newton_base`, ``quadratic=True``). Empty under
        tracing and in plans pickled before.
    :param reference_start: those of them whose posterior draws take their Newton step
        from the model's reference point (:func:`~numpyro_pavi.laplace.draw_start`, which
        does not depend on the draw), where the probe found it lands on the mode too; the
        others step from the prior location given the draw's parents, as training does.
        Empty under tracing and in plans pickled before.
    :param warm_start: Laplace sites not quadratic whose Newton problem the setup probe
        found concave around its mode (``_probe``): their posterior draws start their
        iterations at the mode of the guide's center draw
        (:func:`~numpyro_pavi.sampling.draw_starts`) instead of the prior location. Empty
        under tracing and in plans pickled before.
    :param flat_unscored: later siblings in a Laplace site's Newton problem whose cells the
        model does not score are flat directions of it where nothing scored reads them
        (``obs_mask``'s imputed cells): the setup probe names those
        (:func:`~numpyro_pavi.laplace.flat_unscored`), which get a unit quadratic there
        (:func:`~numpyro_pavi.laplace.group_log_joint`). None (under tracing, and in plans
        pickled before): every such sibling.
    """

    model: Callable
    structure: ModelStructure
    options: GuideOptions
    flows: Mapping[str, ConditionalFlow]
    sources: Mapping[tuple[str, ...], tuple[Source, ...]]
    no_encoding: frozenset
    has_children: frozenset
    features: Mapping[Any, int]
    stats: Mapping[Any, tuple]
    masked: frozenset
    init_values: Mapping[str, Any]
    laplace_sites: frozenset | None = None
    stored: StoredSpec | None = None
    base_context: frozenset = frozenset()
    quadratic: frozenset = frozenset()
    reference_start: frozenset = frozenset()
    warm_start: frozenset = frozenset()
    flat_unscored: frozenset | None = None

    def param_name(self, name: str, what: str) -> str:
        """NumPyro's naming: ``{site or plate set}_{prefix}_{what}``."""
        return f"{name}_{self.options.prefix}_{what}"

    def encoding_width(self, plates: tuple[str, ...]) -> int:
        """Width of the encodings of plate set ``plates``: ``encoding_dim``, or 0 where its
        elements get none (``no_encoding``). Plans pickled before 0.2 sized those flows for an
        all-zero encoding of ``encoding_dim``: their width is read off the flows."""
        if plates not in self.no_encoding:
            return self.options.encoding_dim
        site = next(s for s in self.structure.latent.values() if s.plates == plates)
        parents = sum(self.structure.latent[p].dim for p in site.conditions_on)
        own = 2 * site.dim if site.name in self.base_context else 0
        return self.flows[site.name].context_dim - parents - own

    @staticmethod
    def plate_set_name(plates: tuple[str, ...]) -> str:
        return "__".join(plates)

    def on_laplace(self, site: LatentSite) -> bool:
        """Whether ``site`` gets an element-wise Laplace base (local sites, ``laplace=True``,
        that passed the setup probe)."""
        if not (self.options.laplace and site.plates):
            return False
        return self.laplace_sites is None or site.name in self.laplace_sites

    @property
    def encoder(self) -> SetEncoder:
        return self.options.encoder

    def reads_data(self) -> bool:
        """Whether sampling reads the model's data (set encoders or Laplace bases)."""
        return any(self.sources.values()) or any(self.on_laplace(s) for s in self.structure.latent.values())

    def has_free(self, plates: tuple[str, ...]) -> bool:
        """Whether the elements of ``plates`` have free (learned, per-element) encodings."""
        sources = self.sources[plates]
        return (not sources and plates not in self.no_encoding) or self.has_residual(plates)

    def has_residual(self, plates: tuple[str, ...]) -> bool:
        """Whether the set encodings of ``plates`` get a free per-element residual
        (``"hybrid"``, or ``"auto"`` on plates trained whole): read off the params."""
        return self.param_name(self.plate_set_name(plates), "residual") in self.init_values

    def free_plates(self) -> set[str]:
        """Plates whose elements have free encodings or residuals."""
        return {p for plate_set in self.sources if self.has_free(plate_set) for p in plate_set}

    def num_params(self) -> int:
        return int(sum(np.size(leaf) for leaf in jax.tree.leaves(dict(self.init_values))))

    def packed_init_values(self) -> dict:
        """``{param name: initial value}`` as stored in NumPyro's param store: a flow's or an
        encoder's pytree of arrays packed into one vector (:func:`pack`), an array as it is."""
        return {name: pack(value) if is_packed(value) else value for name, value in self.init_values.items()}

    def unpack(self, params: Mapping) -> dict:
        """``params`` with every packed vector back in its pytree (a flow's layers, an
        encoder's weights): what the flows and encoders read, and a readable view of an
        SVI run's params. Pytrees given as they are (params of fits before the packing)
        pass through, as do names that are not this guide's; a vector of another length
        is a ``ValueError``."""
        out = dict(params)
        for name, init in self.init_values.items():
            if name in out and is_packed(init):
                out[name] = unpack_like(init, out[name])
        return out

    def describe(self) -> str:
        """A table of sites (plates, flow, context, parameter counts) and plate sets (encodings)."""
        structure = self.structure
        lines = [f"{'site':<16}{'plates':<24}{'d':>4}{'context':>9}  {'flow':<28}{'params':>10}"]
        for name, site in structure.latent.items():
            flow = self.flows[name]
            count = sum(np.size(x) for x in jax.tree.leaves(self.init_values[self.param_name(name, "flow")]))
            plates = ",".join(f"{p}[{structure.plates[p].size}]" for p in site.plates) or "-"
            desc = (
                ("laplace+" if self.on_laplace(site) else "")
                + f"affine+{flow.num_layers if site.dim > 1 else 0}x{flow.layer[:4]}"
                + (f" | given: {','.join(site.conditions_on)}" if site.conditions_on else "")
            )
            lines.append(f"{name:<16}{plates:<24}{site.dim:>4}{flow.context_dim:>9}  {desc:<28}{count:>10}")
        for plate_set, sources in self.sources.items():
            kind = "free" if not sources else ("hybrid" if self.has_residual(plate_set) else "set")
            on_base = any(n in self.base_context for n, s in structure.latent.items() if s.plates == plate_set)
            if plate_set in self.no_encoding:
                kind = "the Laplace base (mode, log diag L)" if on_base else "none (Laplace bases)"
            elif on_base:
                kind += " + the Laplace base (mode, log diag L)"
            src = ", ".join(f"{k}:{n}" for k, n in sources)
            size = "x".join(str(structure.plates[p].size) for p in plate_set)
            lines.append(
                f"plates {'/'.join(plate_set):<20} elements {size:<10} encoding: {kind}"
                + (f" from {src}" if src else "")
            )
        if self.stored is not None:
            spec = self.stored

            def block(b):  # a nested block names the blocks its base follows, innermost first
                return " in ".join("+".join(x) for x in [b] + spec.ancestors_of(b[0])[::-1])

            lines.append(
                f"stored Laplace bases: {', '.join(map(block, spec.blocks))} (joint mode from all rows, "
                f"refreshed every {self.stored.period} steps; globals {', '.join(self.stored.globals) or '-'})"
            )
        lines.append(f"total parameters: {self.num_params()}")
        return "\n".join(lines)


def context_dim(structure: ModelStructure, site: LatentSite, encoding_dim: int) -> int:
    # one encoding per element of the site's plate set; globals see their parents only (a
    # learned constant input would only duplicate the bias, in a product of two learned
    # factors that Adam moves many times faster than a plain location)
    return (encoding_dim if site.plates else 0) + sum(structure.latent[p].dim for p in site.conditions_on)


def _only_imputed(structure: ModelStructure, plate_set: tuple) -> bool:
    """Whether every latent site in plate set ``plate_set`` is an ``obs_mask`` imputation
    (NumPyro's ``{name}_unobserved`` beside an observed ``{name}_observed``)."""
    sites = [name for name, site in structure.latent.items() if site.plates == plate_set]
    return bool(sites) and all(
        n.endswith("_unobserved") and n[: -len("_unobserved")] + "_observed" in structure.observed for n in sites
    )


def encoding_sources(structure: ModelStructure, options: GuideOptions, bases: frozenset = frozenset()) -> dict:
    """``{plate set: data sources}`` for every plate set that holds latent sites.

    :param bases: local sites on a Laplace base: under ``encoding="set"`` a plate set with no
        data inside needs none when all its sites have one (the base informs each element).
    """
    # model order, then fewer plates first (a stable sort): a set's order would follow the
    # interpreter's hash seed, and with it the encoders' initial keys
    plate_sets = sorted(dict.fromkeys(site.plates for site in structure.latent.values() if site.plates), key=len)
    unknown = set(options.ragged) - set(structure.plates)
    if unknown:
        raise ValueError(f"ragged names unknown plate(s) {sorted(unknown)}; plates: {sorted(structure.plates)}.")
    out = {}
    for plate_set in plate_sets:
        sources = []
        if options.encoding == "auto" and _only_imputed(structure, plate_set):
            # obs_mask's missing cells have no data of their own to encode (a set encoding
            # would see the same "missing" input for all of them): free encodings
            out[plate_set] = ()
            continue
        if options.encoding != "free":
            sources = [("nested", o) for o, obs in structure.observed.items() if set(plate_set) <= set(obs.plates)]
            if len(plate_set) == 1 and plate_set[0] in options.ragged:
                sources.append(("ragged", plate_set[0]))
            sites = [s.name for s in structure.latent.values() if s.plates == plate_set]
            on_bases = options.encoding == "set" and all(n in bases for n in sites)
            if not sources and options.encoding in ("set", "hybrid") and not on_bases:
                if options.encoding == "hybrid":
                    bases_hint = "."
                elif not options.laplace:
                    bases_hint = ", or Laplace bases (laplace=True), which inform each element with no encoding."
                else:
                    lost = [n for n in sites if n not in bases]
                    bases_hint = (
                        f". Site(s) {lost} lost their Laplace base at setup (see the LaplaceWarning), so "
                        "nothing else tells their elements apart."
                    )
                raise ValueError(
                    f"encoding={options.encoding!r}: no observed data identifies the elements of plate(s) "
                    f"{'/'.join(plate_set)}: no observed site sits inside {'/'.join(plate_set)}. Put the "
                    "observations inside the plate, declare a ragged index with "
                    f"ragged={{{plate_set[-1]!r}: Ragged(index=..., covariates=...)}}, or use "
                    "encoding='auto' (free encodings where no data is found)" + bases_hint
                )
        out[plate_set] = tuple(sources)
    return out


def _data_statistics(structure: ModelStructure, options: GuideOptions, model, trace, args, kwargs):
    """Feature sizes and normalization constants of every data source (from setup data)."""
    features, stats, masked = {}, {}, set()
    if options.encoding == "free":
        return features, stats, masked
    dims = {n: p.dim for n, p in structure.plates.items()}
    for name, obs in structure.observed.items():
        x, _, mask = _data.observed_canonical(trace[name], dims, with_mask=True)
        if mask is not None:
            masked.add(name)  # the encoder also reads which cells are observed
        if obs.plates:
            _data.check_finite(f"observed site {name}", x if mask is None else jnp.where(mask, x, 0.0), obs.plates[0])
        features[name] = int(x.shape[-1]) * (2 if mask is not None else 1)
        stats[name] = _data.feature_stats(x, mask)
    bound = _data.bind_arguments(model, args, kwargs) if options.ragged else {}
    for plate, decl in options.ragged.items():
        feats, _, _ = _data.ragged_parts(structure, plate, decl, trace, bound)
        _data.check_finite(f"data of ragged plate {plate}", feats, plate)
        features[("ragged", plate)] = int(feats.shape[-1])
        stats[("ragged", plate)] = _data.feature_stats(feats)
    return features, stats, masked


def _encoding_skip(structure: ModelStructure, site: LatentSite, encoding_dim: int, laplace: bool) -> np.ndarray:
    """Initial skip ``(C, 2d)``: the element's encoding starts as a direct offset.

    Encoding coordinates ``[0, d)`` add to the element's shift and ``[d, 2d)`` to its raw
    scale, so from the first step each element moves on its own, as in a mean-field
    guide, instead of waiting for a shared projection to be learned; later coordinates
    and the non-linear path are free to learn anything else.
    """
    d, D = site.dim, encoding_dim
    skip = np.zeros((context_dim(structure, site, D), 2 * d), np.float32)
    # on a Laplace base each element already starts at its own location and scale: an
    # encoding added directly would only move it away (by whole sds) until unlearned
    if site.plates and not laplace:
        for j in range(min(D, d)):
            skip[j, j] = 1.0
        for j in range(min(max(D - d, 0), d)):
            skip[d + j, d + j] = 1.0
    return skip


def encoder_levels(structure: ModelStructure, plate_set: tuple, name: str) -> list[str]:
    """The plates an observed site's set encoders pool, innermost first, for plate set ``plate_set``."""
    return [p for p in structure.observed[name].plates if p not in plate_set][::-1]


def encoder_key(plate: str, level: int) -> str:
    """Key of the encoder pooling ``plate`` at ``level`` (0 = innermost) within an observed
    site's ``{site}_{prefix}_encoder`` params. Two plate sets that pool the same plate at the
    same level from the same site share that encoder. Above level 0 the sets it sees are
    encodings of whichever plate was pooled below it, which can differ between the two
    (crossed plate sets of a site in three plates): one network then serves both."""
    return f"{plate}@{level}"


def _init_encoding(
    no_encoding: frozenset,
    rng_key,
    plate_set: tuple,
    sources: tuple,
    features: dict,
    structure,
    options,
    init_values,
    residual: frozenset = frozenset(),
) -> None:
    """Add the initial values of ``plate_set``'s encodings and encoders to ``init_values``."""
    D = options.encoding_dim
    sizes = [structure.plates[p].size for p in plate_set]
    if plate_set in no_encoding:
        return
    kname = GuidePlan.plate_set_name(plate_set)
    name_of = lambda n, what: f"{n}_{options.prefix}_{what}"
    if not sources or plate_set in residual:
        # zero: every element starts at the flow's shared initial distribution
        init_values[name_of(kname, "residual" if sources else "encoding")] = jnp.zeros((*sizes, D))
    if not sources:
        return
    enc = options.encoder
    width = 0
    for kind, name in sources:
        k_src = jax.random.fold_in(rng_key, zlib.crc32(str(name).encode()))
        if kind == "nested":
            pooled = encoder_levels(structure, plate_set, name)
            keys = jax.random.split(k_src, max(len(pooled), 1))
            store = init_values.setdefault(name_of(name, "encoder"), {})
            for level, (p, k) in enumerate(zip(pooled, keys)):
                in_dim = features[name] if level == 0 else D + 1
                store.setdefault(encoder_key(p, level), enc.init(k, in_dim))
            width += (D + 1) if pooled else features[name]
        else:
            init_values[name_of(name, "ragged_encoder")] = enc.init(
                jax.random.split(k_src, 1)[0], features[("ragged", name)]
            )
            width += D + 1
    init_values[name_of(kname, "encoder_out")] = init_readout(rng_key, width, D, scale=0.1)


def per_element(structure: ModelStructure, plate_set: tuple, quadratic: frozenset, stored) -> bool:
    """Whether ``encoding="auto"`` with ``laplace=True`` (``laplace=False`` keeps the paper's
    PAVI-E) gives the elements of ``plate_set`` learned per-element vectors (free encodings
    where the plates hold no data, a residual added to the set encoding where they do), also
    for sites whose base was dropped at setup (a Laplace likelihood): where no plate of the
    set is subsampled, so every element's vector gets a gradient at every step, as a
    mean-field guide's parameters do, and where the bases leave something to learn (not on
    stored bases, refreshed from all rows, nor where every site's likelihood is Gaussian in
    it: the base is then exact).

    Measured (benchmarks/RESULTS.md, section 16): one shared flow of the set encoding (or of
    the base alone) leaves each element's own error, a per-element vector removes it: issue
    15's crossed Bernoulli 0.052 -> 0.023 sd from NUTS, epil 0.029 -> 0.022, the Cauchy
    random intercept 0.129 -> 0.023. On subsampled plates the set encoder is what trains
    fast (each element is seen once per pass) and what gives new elements their posterior.
    """
    # read off the setup trace: a setup on the full batch followed by subsampled steps counts
    # as trained whole; under tracing no site is known Gaussian, so every plate set qualifies
    sites = [s for s in structure.latent.values() if s.plates == plate_set]
    subsampled = any(structure.plates[p].subsample_size < structure.plates[p].size for p in plate_set)
    exact = bool(sites) and all(s.name in quadratic for s in sites)
    on_stored = stored is not None and any(s.name in stored.sites for s in sites)
    return bool(sites) and not (subsampled or exact or on_stored)


def build_plan(
    model: Callable,
    structure: ModelStructure,
    options: GuideOptions,
    trace: Mapping[str, dict],
    init_locs: Mapping[str, jax.Array],
    rng_key: jax.Array,
    args: tuple = (),
    kwargs: Mapping | None = None,
) -> GuidePlan:
    """Build the guide's plan from the setup trace.

    :param init_locs: unconstrained initial values of the latent sites (site layout): a
        site's flow starts centred on the average of its elements' values (on a Laplace
        base it starts as a standard normal in the base's standardized coordinates).
    :param rng_key: key of the parameters' initial values.
    :param args, kwargs: the model's arguments of the setup trace (ragged declarations).
    """
    kwargs = dict(kwargs or {})
    features, stats, masked = _data_statistics(structure, options, model, trace, args, kwargs)
    laplace_sites, gaussian, reference_start, warm_start, flat, linear = _laplace_sites(
        model, structure, options, trace, args, kwargs
    )
    batch_only = _batch_only_bases(structure, laplace_sites)
    laplace_sites, gaussian, reference_start, warm_start, linear = (
        x - batch_only for x in (laplace_sites, gaussian, reference_start, warm_start, linear)
    )
    sources = encoding_sources(structure, options, laplace_sites)
    stored = stored_spec(structure, laplace_sites, options.refresh_every)
    if stored is not None:
        warm_start = warm_start - frozenset(stored.sites)  # stored bases solve no Newton problem per draw
        structure = _stored_context(structure, stored, gaussian, linear)
    structure = scales_first(structure)
    # plate sets with no data inside whose sites all have a Laplace base: the base informs
    # every element, so "set" gives them no encoding, and "auto" none where per-element
    # vectors would not be trained at every step (or would have nothing to add)
    data_less = frozenset(
        plate_set
        for plate_set, src in sources.items()
        if options.encoding in ("auto", "set")
        and not src
        and all(s.name in laplace_sites for s in structure.latent.values() if s.plates == plate_set)
    )
    learned = frozenset(
        plate_set
        for plate_set in sources
        if options.encoding == "auto" and options.laplace and per_element(structure, plate_set, gaussian, stored)
    )
    no_encoding = data_less - learned
    residual = frozenset(
        plate_set
        for plate_set, src in sources.items()
        if src and (options.encoding == "hybrid" or plate_set in learned)
    )
    # without an encoding, a base (per step or stored) is all an element's flow could tell
    # it apart by: read it (on issue 15's crossed Bernoulli the subject effects kept 0.05-0.06
    # sd of error with every variant of the bases until the flow could shape each element's
    # skew; with its rows subsampled, on stored bases, 0.064 -> 0.022: RESULTS section 22).
    # Not where the base is already exact (a likelihood Gaussian in the site: the inputs only
    # added noise, sleepstudy 0.062 -> 0.079 sd, and a Gaussian long table's gap 0.0031 ->
    # 0.0048 nats/latent)
    base_context = frozenset(
        name for name, site in structure.latent.items() if site.plates in data_less and name not in gaussian
    )
    flows, flow_inputs = {}, {}
    for name, site in structure.latent.items():
        laplace = name in laplace_sites
        # sized after no_encoding is known: an encoding that is always zero would only give
        # the flow weights that never get a gradient
        width = 0 if site.plates in no_encoding else options.encoding_dim
        width += 2 * site.dim if name in base_context else 0
        flow = ConditionalFlow(
            site.dim,
            context_dim(structure, site, width),
            num_layers=options.num_flows,
            layer=options.flow_type,
            hidden=options.hidden_dims,
            # on a Laplace base the flow acts on standardized values: it starts as N(0, I)
            init_scale=1.0 if laplace else options.init_scale,
            bilinear=width if site.plates else 0,
        )
        flows[name] = flow
        skip = _encoding_skip(structure, site, width, laplace)
        flow_inputs[f"{name}_{options.prefix}_flow"] = (None if laplace else init_locs[name], skip)

    def initial_values(rng_key, inputs):
        keys = jax.random.split(rng_key, len(structure.latent) + len(structure.plates) + 1)
        values = {}
        # inputs in the plan's order (a dict's keys would come back sorted)
        for k, site, flow, name, (loc, skip) in zip(keys, structure.latent.values(), flows.values(), flow_inputs, inputs):
            loc = jnp.zeros(site.dim) if loc is None else jnp.mean(jnp.reshape(site.to_canonical(loc), (-1, site.dim)), 0)
            values[name] = flow.init(k, loc=loc, skip=skip)
        for k, (plate_set, src) in zip(keys[len(structure.latent) :], sources.items()):
            _init_encoding(no_encoding, k, plate_set, src, features, structure, options, values, residual)
        order[:] = list(values)
        return values

    # one compiled program for all initial values: eagerly, each initializer's ops would
    # compile on first use; one program per site compiles the shared parts once per site
    order: list = []  # the params' order of creation (a program's dict output comes back sorted)
    values = run_once(initial_values, rng_key, list(flow_inputs.values()))
    init_values = {name: values[name] for name in order}
    return GuidePlan(
        model=model,
        structure=structure,
        options=options,
        flows=flows,
        sources=sources,
        no_encoding=no_encoding,
        has_children=frozenset(p for site in structure.latent.values() for p in site.conditions_on),
        features=features,
        stats=stats,
        masked=frozenset(masked),
        init_values=init_values,
        laplace_sites=laplace_sites,
        stored=stored,
        base_context=base_context,
        quadratic=gaussian,
        reference_start=reference_start,
        warm_start=warm_start,
        flat_unscored=flat,
    )


#: How far (in sds of the mode's curvature) one Newton step from the prior location (and,
#: for draws, from the model's reference point) may land from the iterated mode at setup for
#: a site to count as quadratic (float32 round-off on a start 100 sds away is ~1e-4 sds).
ONE_STEP_TOL_SDS = 1e-2


def probe_laplace(
    model: Callable, structure: ModelStructure, trace: Mapping[str, dict], args: tuple = (), kwargs=None
) -> dict[str, float]:
    """Share of each local site's elements whose Newton problem converges at the values of
    ``trace`` (the setup trace: initial values, current plate elements), each site given
    the values before it, later sites at their prior means.

    :return: ``{local site: fraction in [0, 1]}``.
    """
    return {name: share for name, (share, *_) in _probe(model, structure, trace, args, kwargs).items()}


def _probe(model, structure, trace, args, kwargs) -> dict[str, tuple]:
    """``{local site: (converged share, quadratic, from reference, concave, flat, linear)}`` (see
    :func:`probe_laplace`); ``quadratic``: the log joint of the site's Newton problem (the
    site and its later siblings of the same plates, as in
    :func:`~numpyro_pavi.sampling.laplace_base`) has the same curvature, to round-off, at
    every converged element's mode and one sd away along ``L^{-T} 1``, and one Newton step
    from the prior location lands within :data:`ONE_STEP_TOL_SDS` of the mode: a likelihood
    Gaussian in them, whose base is exact and one Newton step. ``from reference``: also one
    step from the model's reference point (:func:`~numpyro_pavi.laplace.draw_start`, where
    posterior draws take it) lands there; float32 round-off can miss from a start far from
    the data (data at 1,000 with a noise sd of 0.01). ``concave`` (sites not quadratic): the
    curvature is negative definite at every converged element's mode and at
    ``PROBE_RADII_SDS`` sds on both sides of it along ``L^{-T} 1``, so where the draws'
    iterations start does not change where they end (``GuidePlan.warm_start``); a
    heuristic, as the probe sees one point of the parameter space: heavy tails and
    mixtures, whose curvature turns within a few sds, fail it. ``flat``: ``{later sibling
    with unscored cells: whether they are flat directions}``
    (:func:`~numpyro_pavi.laplace.flat_unscored`). ``linear``: quadratic, and so as its
    local parents move (:func:`_linear_in_parents`); False for a site without them."""
    kwargs = dict(kwargs or {})
    latent = structure.latent
    plates = {p: trace[p]["value"] for p in structure.plates if p in trace}
    local = [s for s in latent.values() if s.plates]
    # one compiled program for every site: run eagerly, every op (of the model's reference
    # traces and of the loops) compiles on first use, and each program has a fixed cost;
    # on large data one per site, so that no two sites' working memory is live at once
    batches = [local] if data_size((args, kwargs)) <= SMALL_DATA else [[s] for s in local]
    flags = {}
    for batch in batches:
        flags.update(run_once(lambda b=batch: {s.name: _probe_site(model, structure, trace, plates, s, args, kwargs) for s in b}))
    # in the model's order (a program's dict comes back sorted): the warnings follow it
    def host(share, quadratic, from_reference, concave, flat, linear):
        flat = {k: bool(v) for k, v in flat.items()}
        return float(share), bool(quadratic), bool(from_reference), bool(concave), flat, bool(linear)

    return {s.name: host(*flags[s.name]) for s in local}


def _probe_site(model, structure, trace, plates, site, args, kwargs) -> tuple[jax.Array, ...]:
    """:func:`_probe`'s flags of one local site, traced: ``(converged share, quadratic, from
    reference, concave, flat, linear)``."""
    latent = structure.latent
    names = list(latent)
    before = {n: trace[n]["value"] for n in names[: names.index(site.name)]}
    group = [site] + [latent[n] for n in _later_siblings(structure, site.name)]
    ref = reference_trace(model, {**plates, **before}, args, kwargs)
    start = canonical_values(ref, group)
    flat = flat_unscored(model, group, args, kwargs, ref, {**plates, **before}, start)
    joint = group_log_joint(model, group, args, kwargs, ref, flat=flat)

    def logp(z):
        return joint(z, {**plates, **before})

    def quadratic(start, fixed, f=logp):
        z, chol, report = newton_iterate(f, start)
        ok = report.converged()
        shift = solve_lower(chol, jnp.full_like(z, 1.0 / math.sqrt(z.shape[-1])), transpose=True)

        def concave_around(_):
            def at(flag, r):
                _, h = grad_and_blocks(f, z + r * shift)
                return flag & (precision_chol(h, with_concave=True)[1] | ~ok), None

            radii = jnp.asarray([r * sign for r in PROBE_RADII_SDS for sign in (1.0, -1.0)], z.dtype)
            flags, _ = jax.lax.scan(at, report.concave | ~ok, radii)
            return jnp.all(flags) & jnp.any(ok)

        h0, h1 = (grad_and_blocks(f, v)[1] for v in (z, z + shift))
        same = jnp.all(jnp.abs(h1 - h0) <= 1e-3 * (jnp.abs(h0) + 1e-6), (-2, -1))
        # and the one Newton step such a site will take lands on the mode from both starts
        # it will take it from (training's prior location, draws' fixed start): a smooth
        # likelihood with a lot of data (Poisson counts of 1e7) has a nearly constant
        # curvature near its mode, not out at the prior mean
        lands = []
        for s0 in (start, fixed):
            one_step = one_step_base(f, s0, None)[0]
            miss = jnp.linalg.norm(jnp.einsum("...ji,...j->...i", chol, one_step - z), axis=-1)  # |L^T s|: sds
            lands.append(jnp.all(same & (miss <= ONE_STEP_TOL_SDS) | ~ok) & jnp.any(ok))
        # a quadratic site takes one step from a fixed start: no iterations to shorten
        concave = jax.lax.cond(lands[0], lambda _: jnp.array(False), concave_around, None)
        return ok, lands[0], lands[0] & lands[1], concave

    # the site's whole Newton problem, as the step solves it: its convergence too (a
    # sibling's flat direction would leave every element of the site on its prior location)
    fixed = draw_start(model, group, plates, args, kwargs)
    converged, one_step, one_step_ref, concave = quadratic(start, fixed)
    parents = [n for n in before if latent[n].plates and set(latent[n].plates) < set(site.plates)]
    linear = jnp.array(False)
    if parents and subsampled_rows(structure):  # only stored bases read it
        def probe():
            return _linear_in_parents(joint, plates, before, parents, latent, start)

        linear = jax.lax.cond(one_step, probe, lambda: jnp.array(False))
    return _data.scored_mean(site, converged, trace.get(site.name)), one_step, one_step_ref, concave, flat, linear


def _linear_in_parents(joint, plates, before, parents, latent, start) -> jax.Array:
    """Whether a quadratic Newton problem stays so as its local parents (earlier sites on
    fewer plates: a school over its students) move: with each parent site shifted on its own
    by 1 and 2 times ``u`` (``u_i = 1 + i / d`` over the ``d`` unconstrained coordinates of
    its event, so that a difference of coordinates moves too), the modes' second difference is within
    :data:`ONE_STEP_TOL_SDS` sds and the curvature is the same to round-off at every
    converged element. The problem is then jointly Gaussian in the site and its parents
    (``a ~ N(k, tau)``): its conditional mean is linear and its width fixed in them, and
    the stored base, its mode moved by ``pjac`` along the parents' draws, is the exact
    conditional at the last refresh's globals (to first order in them between refreshes,
    as every stored base). Not so where a parent sets the width (``a ~ N(0, exp(k))``, a
    per-school noise sd) or enters nonlinearly. A heuristic, as the probe's others: a few
    directions of the parents' space (a site's intrinsic, non-plate batch coordinates all
    move together), at the setup values."""

    def at(name, scale):
        moved = dict(before)
        if name is not None:
            transform = biject_to(latent[name].support)
            unc = transform.inv(before[name])
            shape = latent[name].unconstrained_event_shape
            d = math.prod(shape)
            u = jnp.reshape(1.0 + jnp.arange(d, dtype=unc.dtype) / d, shape)
            moved[name] = transform(unc + scale * u)

        def logp(z):
            return joint(z, {**plates, **moved})

        z, chol, report = newton_iterate(logp, start)
        return z, chol, grad_and_blocks(logp, z)[1], report.converged()

    z0, chol, h0, ok = at(None, 0.0)
    flags = []
    for name in parents:
        (z1, _, h1, ok1), (z2, _, h2, ok2) = at(name, 1.0), at(name, 2.0)
        both = ok & ok1 & ok2
        miss = jnp.linalg.norm(jnp.einsum("...ji,...j->...i", chol, z2 - 2.0 * z1 + z0), axis=-1)  # |L^T s|: sds
        same = jnp.all(jnp.abs(h1 - h0) <= 1e-3 * (jnp.abs(h0) + 1e-6), (-2, -1))
        same &= jnp.all(jnp.abs(h2 - h0) <= 1e-3 * (jnp.abs(h0) + 1e-6), (-2, -1))
        flags.append(jnp.all(same & (miss <= ONE_STEP_TOL_SDS) | ~both) & jnp.any(both))
    return jnp.all(jnp.stack(flags))


def _later_siblings(structure: ModelStructure, name: str) -> list[str]:
    """The later latent sites of ``name``'s plates, which its Newton problem holds."""
    names = list(structure.latent)
    plates = structure.latent[name].plates
    return [n for n in names[names.index(name) + 1 :] if structure.latent[n].plates == plates]


def is_packed(init) -> bool:
    """Whether a param with initial value ``init`` is stored packed: any pytree that is not
    a single array (a flow's list of layers, an encoder's dict of weights). Each packed param
    is one leaf of SVI's state instead of dozens: a step called from Python pays JAX's
    dispatch per leaf, and Adam runs one kernel per leaf (RESULTS section 26)."""
    return not hasattr(init, "shape")


def pack(tree):
    """``tree``'s leaves raveled and concatenated in ``jax.tree.leaves`` order, ``(n,)``: a
    packed param's initial value. Host arrays (NumPy: nothing staged into a compiled step)
    unless a leaf is traced (a guide set up under ``jit``)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return np.zeros((0,), jnp.result_type(float))
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves])
    flat = [np.ravel(np.asarray(leaf)) for leaf in leaves]
    return np.concatenate(flat).astype(np.result_type(*flat))


def packed_size(init) -> int:
    """Length of the vector :func:`pack` makes of ``init``."""
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(init)))


def unpack_like(init, value):
    """The pytree of ``init``'s structure and shapes whose leaves are the consecutive pieces
    of ``value (n,)`` (:func:`pack`'s inverse); ``value`` itself where it is a pytree
    already (no ``shape``). An array of another shape is a ``ValueError``."""
    if not hasattr(value, "shape"):
        return value
    leaves, treedef = jax.tree.flatten(init)
    sizes = [int(np.size(leaf)) for leaf in leaves]
    if jnp.shape(value) != (sum(sizes),):
        raise ValueError(
            f"a packed param of this guide is a vector of {sum(sizes)} numbers, got shape {jnp.shape(value)}: "
            "were the params trained with other options (encoding_dim, hidden_dims, num_flows) or another model?"
        )
    cuts = np.cumsum([0] + sizes).tolist()
    pieces = [jnp.reshape(value[a:b], np.shape(leaf)) for a, b, leaf in zip(cuts[:-1], cuts[1:], leaves)]
    return jax.tree.unflatten(treedef, pieces)


def _laplace_sites(model, structure, options, trace, args, kwargs) -> tuple[frozenset, ...]:
    """The local sites that keep a Laplace base: all of them, except those whose Newton
    problems mostly fail to converge at the setup values (:func:`probe_laplace`), with a
    :class:`~numpyro_pavi.LaplaceWarning` naming each; those of them whose likelihood is
    Gaussian in the site (:func:`_probe`); those of these whose posterior draws may step
    from the model's reference point (``GuidePlan.reference_start``); and the others whose
    draws may start from the guide's center (``GuidePlan.warm_start``); the later
    siblings whose unscored cells are flat directions of a Newton problem
    (``GuidePlan.flat_unscored``); and the Gaussian sites whose problem stays quadratic as
    their local parents move (:func:`_linear_in_parents`). Under tracing (no values to look
    at) every local site keeps its base, none counts as Gaussian, and every masked sibling
    counts as flat (None)."""
    local = frozenset(name for name, s in structure.latent.items() if s.plates)
    if not (options.laplace and local):
        return frozenset(), frozenset(), frozenset(), frozenset(), None, frozenset()
    values = [trace[n]["value"] for n in structure.latent] + jax.tree.leaves((args, kwargs))
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return local, frozenset(), frozenset(), frozenset(), None, frozenset()
    kept, gaussian, reference, warm, linear = set(local), set(), set(), set(), set()
    # a sibling is flat only where every Newton problem holding it finds it so
    flat, read = set(), set()
    probes = _probe(model, structure, trace, args, kwargs)
    for name, (share, quadratic, from_reference, concave, flags, in_parents) in probes.items():
        flat.update(k for k, v in flags.items() if v)
        read.update(k for k, v in flags.items() if not v)
        if quadratic:
            gaussian.add(name)
        if in_parents:
            linear.add(name)
        if from_reference:
            reference.add(name)
        if concave and not quadratic:
            warm.add(name)
        if share < MIN_CONVERGED_AT_SETUP:
            kept.discard(name)
            siblings = _later_siblings(structure, name)
            # the problem is the group's: a sibling's failure sinks the site too
            where = (
                "this site or in a later site of its plates, whose Newton problem it shares ("
                + ", ".join(f"'{n}'" for n in siblings)
                + ")"
                if siblings
                else "this site"
            )
            warnings.warn(
                f"Laplace base of site '{name}' is off: at the initial values its Newton iterations "
                f"converged for only {100 * share:.0f}% of its elements, so its curvature does not "
                "locate its posterior (a likelihood that is not smooth, e.g. Laplace, or one "
                f"with several modes, in {where}). The site is sampled without a base: its flow "
                "on its plates' encodings (with encoding='auto', plus a learned vector per element "
                "where its plates are not subsampled). AutoPAVI(model, laplace=False) turns the "
                "bases off for every site, without this warning.",
                LaplaceWarning,
                stacklevel=5,
            )
    return (
        frozenset(kept),
        frozenset(gaussian & kept),
        frozenset(reference & kept),
        frozenset(warm & kept),
        frozenset(flat - read),
        frozenset(linear & kept),
    )


def _stored_context(
    structure: ModelStructure, stored: StoredSpec, gaussian: frozenset, linear: frozenset
) -> ModelStructure:
    """The structure with the earlier sites of a stored block dropped from the flow context
    of its later sites, where the block's first site is Gaussian (``gaussian``: the probe of
    its Newton problem, which holds the whole block, found it quadratic) and so is every
    block nested in it (its base is its marginal over them: a Laplace approximation, not
    exact, under students with a Poisson likelihood). The block is then
    jointly Gaussian given the other sites, and a later site's stored base already is its
    exact conditional given the earlier ones' draws (:func:`~numpyro_pavi.base_state.stored_base`,
    at the last refresh's globals, to first order in them between refreshes):
    the flow has nothing to learn from those values, and without them (and with no other
    local site in the context) its context is the same for every element, so its
    conditioner runs once, not once per element (most of a posterior draw's time on a
    Gaussian table with an intercept and slope: RESULTS section 31).

    A nested block drops its ancestor blocks' sites as well only where the probe found its
    problem quadratic jointly with them (``linear``: :func:`_linear_in_parents`, a student's
    ``a ~ N(k, tau)``): its base follows the parent's draw in its mode only, and a parent
    that sets the child's scale (``a ~ N(0, exp(k))``, or a per-school noise sd in the
    likelihood) leaves the child Gaussian but its width dependent on the parent, which the
    flow can learn only by reading it."""
    latent = dict(structure.latent)
    below = {b[0]: [c for c, outer in stored.parents if outer == b[0]] for b in stored.blocks}
    for block in stored.blocks:
        if not all(n in gaussian for n in [block[0]] + below[block[0]]):
            continue
        drop = set(block)
        if block[0] in linear:
            drop.update(n for outer in stored.ancestors_of(block[0]) for n in outer)
        for name in block:
            site = latent[name]
            context = tuple(p for p in site.conditions_on if p not in drop)
            latent[name] = dataclasses.replace(site, conditions_on=context)
    return dataclasses.replace(structure, latent=latent)


def scales_first(structure: ModelStructure) -> ModelStructure:
    """The structure with the model's leading global sites (those before its first local
    one) in the guide's order: scales (:func:`~numpyro_pavi.structure.is_scale_support`)
    first, each group in the model's order, and each global's flow conditioned on every
    global before it in that order.

    A global's flow is a Gaussian in its unconstrained coordinates given the earlier
    globals' draws (its mean and log-scale functions of them). A location given a scale
    is nearly that (``mu`` beside ``g_r ~ N(0, tau)``: its posterior sd grows with
    ``tau``), while a scale given a location is a distribution of ``tau`` that widens with
    ``|mu - m|``, which no Gaussian in ``log tau`` shifted and scaled by ``mu`` expresses:
    written location first (the usual order), the funnel between them is lost and both
    come out narrow (RESULTS section 33). Sites after the first local one keep their place:
    a local site's Laplace base may read the globals sampled before it."""
    latent = list(structure.latent.values())
    lead = next((i for i, s in enumerate(latent) if s.plates), len(latent))
    head = [s for s in latent[:lead] if is_scale_support(s.support)]
    head += [s for s in latent[:lead] if not is_scale_support(s.support)]
    if [s.name for s in head] == [s.name for s in latent[:lead]]:
        return structure
    order = {s.name: dataclasses.replace(s, conditions_on=tuple(e.name for e in head[:i])) for i, s in enumerate(head)}
    order.update((s.name, s) for s in latent[lead:])
    return dataclasses.replace(structure, latent=order)


def _batch_only_bases(structure: ModelStructure, laplace_sites: frozenset) -> frozenset:
    """The local sites that lose their Laplace base because a step's base would read only
    the batch's rows: observations subsampled along a plate of their own (a long table) in
    a model the stored bases do not cover (:func:`~numpyro_pavi.base_state.stored_obstacle`),
    with a :class:`~numpyro_pavi.LaplaceWarning` naming them and why.

    A per-step base computed from the batch's rows alone, the other factors at their prior
    means, changes with the batch, and the ELBO's gradient is then not that of any one
    guide: on a long table with students nested in schools and crossed lecturers (8,000
    rows, 1,024 per step, RESULTS section 30; it has stored bases since section 31) the
    default guide ended with a variance component 16.4 and the noise sd 18.9 posterior
    sds from NUTS, and its reported loss 1,180 nats below AutoNormal's."""
    rows = subsampled_rows(structure)
    if not rows or not laplace_sites:
        return frozenset()
    reason = stored_obstacle(structure, laplace_sites)
    if reason is None:
        return frozenset()
    names = sorted(laplace_sites, key=list(structure.latent).index)
    warnings.warn(
        f"Observations are subsampled along plate '{rows[0]}', which holds no latent site (a long "
        f"table's rows), but the model gets no stored Laplace bases: {reason}. A base computed at each "
        "step would read only that step's rows, so sites "
        + ", ".join(f"'{n}'" for n in names)
        + " are sampled without a base: their flows on their plates' encodings, as with "
        "AutoPAVI(model, laplace=False), which turns the bases off without this warning.",
        LaplaceWarning,
        stacklevel=5,
    )
    return frozenset(laplace_sites)


def with_encoder_width(encoder: SetEncoder, encoding_dim: int) -> SetEncoder:
    """``encoder`` with ``out_dim = encoding_dim``: every set encoding has the width of the
    plate's encoding. An explicit other ``out_dim`` is an error rather than silently replaced."""
    if encoder.out_dim != encoding_dim and encoder.out_dim != SetEncoder.out_dim:
        raise ValueError(
            f"SetEncoder(out_dim={encoder.out_dim}) disagrees with encoding_dim={encoding_dim}: a set "
            "encoding is the plate element's encoding, so its width is encoding_dim. Leave out_dim out "
            "(or set it equal to encoding_dim)."
        )
    return dataclasses.replace(encoder, out_dim=encoding_dim)
