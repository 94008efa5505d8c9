"""``AutoPAVI``: a plate-amortized autoguide for NumPyro models.

The guide traces the model once (:mod:`numpyro_pavi.structure`), then gives every latent
site one conditional normalizing flow (:mod:`numpyro_pavi.flows`) shared by all elements of
the site's plates. An element's flow is conditioned on a small per-element *encoding* for
each plate it sits in and on the sampled values of the site's parents, so the family can
express the coupling between global and local variables that mean-field guides miss.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.initialization import init_to_median

from .flows import ConditionalFlow
from .structure import LatentSite, ModelStructure, model_structure, prior_dependencies

__all__ = ["AutoPAVI"]

_ENCODINGS = ("auto", "free")
_FLOW_LAYERS = ("autoregressive", "coupling")


# ---------------------------------------------------------------------------------------
# layouts (see structure.py): canonical (*plate_sizes, d) <-> site (batch + event)
# ---------------------------------------------------------------------------------------
def _site_perm(site: LatentSite, lead: int = 0) -> list[int]:
    """Permutation taking ``(*lead, *plates, *intrinsic, *event)`` to site layout."""
    n_batch = len(site.batch_shape)
    plate_pos, intr_pos = site.plate_positions, site.intrinsic_positions
    perm = list(range(lead))
    for pos in range(n_batch):
        if pos in plate_pos:
            perm.append(lead + plate_pos.index(pos))
        else:
            perm.append(lead + len(plate_pos) + intr_pos.index(pos))
    n_event = len(site.event_shape)
    perm += list(range(lead + n_batch, lead + n_batch + n_event))
    return perm


def _unconstrained_to_canonical(site: LatentSite, value: jax.Array) -> jax.Array:
    """Site-layout unconstrained value ``(*batch, *unc_event) -> (*plates, d)``."""
    n_batch = len(site.batch_shape)
    order = list(site.plate_positions) + list(site.intrinsic_positions)
    order += list(range(n_batch, jnp.ndim(value)))
    value = jnp.transpose(value, order)
    grid = value.shape[: len(site.plate_positions)]
    return jnp.reshape(value, grid + (site.dim,))


def _constrain(site: LatentSite, x: jax.Array):
    """Canonical unconstrained ``x (*grid, d)`` -> site-layout value and ``log|det|`` on grid."""
    grid = x.shape[:-1]
    transform = biject_to(site.support)
    x_r = jnp.reshape(x, grid + site.intrinsic_shape + site.unconstrained_event_shape)
    y = transform(x_r)
    logdet = transform.log_abs_det_jacobian(x_r, y)
    logdet = jnp.sum(jnp.reshape(logdet, grid + (-1,)), -1)
    return jnp.transpose(y, _site_perm(site)), logdet


def _log_density_in_site_layout(site: LatentSite, logq: jax.Array) -> jax.Array:
    """Per-element ``logq (*grid)`` as a batch-shaped array for a ``Delta`` site.

    Intrinsic dims are not plates, so the element's density is spread evenly over them:
    the sum over the site (which is all NumPyro ever uses) is unchanged.
    """
    n_intr = math.prod(site.intrinsic_shape)
    expanded = jnp.reshape(logq, logq.shape + (1,) * len(site.intrinsic_shape)) / n_intr
    batch = [1] * len(site.batch_shape)
    for ax, pos in enumerate(site.plate_positions):
        batch[pos] = logq.shape[ax]
    for pos, size in zip(site.intrinsic_positions, site.intrinsic_shape):
        batch[pos] = size
    perm = _site_perm(site)[: len(site.batch_shape)]
    return jnp.broadcast_to(jnp.transpose(expanded, perm), tuple(batch))


class AutoPAVI(AutoGuide):
    """Plate-amortized variational inference (PAVI) as a NumPyro autoguide.

    Every latent site gets one conditional normalizing flow shared by all elements of its
    plates (plate amortization). The flow of element ``n`` is conditioned on

    * an *encoding* ``E^n in R^D`` for each plate the site sits in. With
      ``encoding="free"`` (PAVI-F) the encodings are learned parameters, one
      ``(plate_size, D)`` array per plate named ``{plate}_{prefix}_encoding``;
    * the sampled (unconstrained) values of the site's parents, so ``q`` factorizes like
      the prior: ``q(theta) = prod_i q(theta_i | parents_i, E)``. Parents in plates the site
      is not in are left out (their per-element values do not align with the site's);
    * for sites outside every plate, a learned context vector ``{site}_{prefix}_context``.

    The flow (params ``{site}_{prefix}_flow``) is a standard normal on the site's flattened
    unconstrained element, a conditional affine layer, ``flow_layers`` conditional
    autoregressive (or coupling) layers when the element has more than one coordinate, then
    ``biject_to(support)``.

    Subsampling works as with any NumPyro guide: write ``numpyro.plate(name, N,
    subsample_size=B)`` in the model; on each call the guide opens the model's plates with
    the model's current subsample sizes (read from a blocked trace of the model, so
    different sizes at ``init`` and ``update`` work), the model replays the guide's indices
    and NumPyro scales both by ``N / B``.

    :param callable model: a NumPyro model.
    :param str encoding: ``"free"`` (PAVI-F) or ``"auto"`` (currently the same as ``"free"``).
    :param int encoding_dim: D, size of each plate element's encoding.
    :param int flow_layers: autoregressive/coupling layers per flow (only used for sites
        whose element has more than one coordinate).
    :param str flow_layer: ``"autoregressive"`` or ``"coupling"``.
    :param tuple hidden: hidden widths of every conditioner network.
    :param str prefix: prefix of all param names.
    :param callable init_loc_fn: per-site initialization (:ref:`init_strategy`); a site's
        flow starts centred on the average of its elements' initial unconstrained values.
    :param float init_scale: initial scale of every flow in unconstrained space.
    :param callable create_plates: as in :class:`~numpyro.infer.autoguide.AutoGuide`.
    :param int chunk_size: plate elements per chunk when sampling over full plates in
        :meth:`sample_posterior`; bounds the memory of the flows' intermediates.
    """

    def __init__(
        self,
        model: Callable,
        *,
        encoding: str = "auto",
        encoding_dim: int = 8,
        flow_layers: int = 1,
        flow_layer: str = "autoregressive",
        hidden: tuple[int, ...] = (32,),
        prefix: str = "auto",
        init_loc_fn: Callable = init_to_median(num_samples=15),
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        chunk_size: int = 2**16,
    ):
        if encoding not in _ENCODINGS:
            raise ValueError(f"Unknown encoding {encoding!r}; use one of {_ENCODINGS}.")
        if flow_layer not in _FLOW_LAYERS:
            raise ValueError(f"Unknown flow_layer {flow_layer!r}; use one of {_FLOW_LAYERS}.")
        if not (isinstance(encoding_dim, int) and encoding_dim >= 1):
            raise ValueError(f"encoding_dim must be a positive int, got {encoding_dim!r}.")
        if not (isinstance(flow_layers, int) and flow_layers >= 0):
            raise ValueError(f"flow_layers must be a non-negative int, got {flow_layers!r}.")
        if not init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {init_scale!r}.")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.encoding = "free" if encoding == "auto" else encoding
        self.encoding_dim = encoding_dim
        self.flow_layers = flow_layers
        self.flow_layer = flow_layer
        self.hidden = tuple(hidden)
        self._init_scale = init_scale
        self.chunk_size = chunk_size
        self.structure: ModelStructure | None = None
        self._flows: dict[str, ConditionalFlow] = {}
        self._init_values: dict = {}
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn, create_plates=create_plates)

    # -- setup ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        # Validate on a plain trace first: it gives clearer errors than initialize_model.
        rng_key = numpyro.prng_key()
        with handlers.block():
            trace = handlers.trace(handlers.seed(self.model, rng_key)).get_trace(*args, **kwargs)
        model_structure(trace)
        super()._setup_prototype(*args, **kwargs)
        with handlers.block():
            deps = prior_dependencies(self.model, args, kwargs)
        self.structure = model_structure(self.prototype_trace, deps)
        if not self.structure.latent:
            raise ValueError("The model has no latent sample sites: there is nothing to infer.")
        self._build(rng_key)

    def _context_dim(self, site: LatentSite) -> int:
        own = self.encoding_dim * (len(site.plates) if site.plates else 1)
        return own + sum(self.structure.latent[p].dim for p in site.parents)

    def _build(self, rng_key) -> None:
        keys = jax.random.split(rng_key, len(self.structure.latent) + len(self.structure.plates) + 1)
        self._flows, self._init_values = {}, {}
        self._has_children = {p for site in self.structure.latent.values() for p in site.parents}
        for k, (name, site) in zip(keys, self.structure.latent.items()):
            flow = ConditionalFlow(
                site.dim,
                self._context_dim(site),
                num_layers=self.flow_layers,
                layer=self.flow_layer,
                hidden=self.hidden,
                init_scale=self._init_scale,
            )
            self._flows[name] = flow
            loc = _unconstrained_to_canonical(site, self._init_locs[name])
            loc = jnp.mean(jnp.reshape(loc, (-1, site.dim)), 0)
            k1, k2 = jax.random.split(k)
            self._init_values[self._param_name(name, "flow")] = flow.init(k1, loc=loc, skip=self._encoding_skip(site))
            if not site.plates:
                self._init_values[self._param_name(name, "context")] = jax.random.normal(k2, (self.encoding_dim,))
        used = {p for site in self.structure.latent.values() for p in site.plates}
        for k, name in zip(keys[len(self.structure.latent) :], sorted(used)):
            size = self.structure.plates[name].size
            # zero: every element starts at the flow's shared initial distribution
            self._init_values[self._param_name(name, "encoding")] = jnp.zeros((size, self.encoding_dim))

    def _encoding_skip(self, site: LatentSite) -> np.ndarray:
        """Initial skip ``(C, 2d)``: each plate's encoding starts as a direct offset.

        Encoding coordinates ``[0, d)`` add to the element's shift and ``[d, 2d)`` to its raw
        scale, so from the first step each element moves on its own, as in a mean-field
        guide, instead of waiting for a shared projection to be learned; later coordinates
        and the non-linear path are free to learn anything else.
        """
        d, D = site.dim, self.encoding_dim
        skip = np.zeros((self._context_dim(site), 2 * d), np.float32)
        for i, _ in enumerate(site.plates):
            for j in range(min(D, d)):
                skip[i * D + j, j] = 1.0
            for j in range(min(max(D - d, 0), d)):
                skip[i * D + d + j, d + j] = 1.0
        return skip

    def _param_name(self, name: str, what: str) -> str:
        return f"{name}_{self.prefix}_{what}"

    def _params(self) -> dict:
        return {name: numpyro.param(name, value) for name, value in self._init_values.items()}

    # -- plates --------------------------------------------------------------------------
    def _create_plates(self, *args, **kwargs) -> dict:
        """Open every plate of the model at its *current* subsample size.

        A blocked, seeded trace of the model (its latent draws are dead code under ``jit``)
        gives the indices the model would draw; the guide opens its plates with exactly those
        indices, so the model replays them. User plates from ``create_plates`` take
        precedence and are substituted into that trace.
        """
        user = {}
        if self.create_plates is not None:
            user = self.create_plates(*args, **kwargs)
            user = [user] if isinstance(user, numpyro.plate) else list(user)
            user = {p.name: p for p in user}
        key = numpyro.prng_key()
        key = jax.random.PRNGKey(0) if key is None else key
        fixed = {name: p._indices for name, p in user.items()}
        with handlers.block():
            trace = handlers.trace(handlers.substitute(handlers.seed(self.model, key), data=fixed)).get_trace(
                *args, **kwargs
            )
        self._check_shapes(trace)
        plates = dict(user)
        for name, info in self.structure.plates.items():
            if name in plates:
                continue
            idx = trace[name]["value"]
            with handlers.substitute(data={name: idx}):
                plates[name] = numpyro.plate(name, info.size, subsample_size=int(idx.shape[0]), dim=info.dim)
        self.plates = plates
        return plates

    def _check_shapes(self, trace: dict) -> None:
        for name, site in self.structure.latent.items():
            new = trace.get(name)
            if new is None or new["type"] != "sample" or new["is_observed"]:
                raise ValueError(
                    f"Latent site '{name}' seen when the guide was set up is missing from this "
                    "call of the model. AutoPAVI needs a fixed set of latent sites: create a "
                    "new guide for a model whose structure changed."
                )
            full = self._full_shape(site, {f.name: f.size for f in new["cond_indep_stack"]}, new)
            if full != self._full_shape(site, None, None):
                raise ValueError(
                    f"Latent site '{name}' changed shape between calls: expected full shape "
                    f"{self._full_shape(site, None, None)}, got {full}. AutoPAVI's flows are "
                    "built for the first call's shapes (plate sizes may change only through "
                    "subsample_size): create a new guide for the new shapes."
                )

    def _full_shape(self, site: LatentSite, frames, trace_site) -> tuple:
        if trace_site is None:
            shape = list(site.batch_shape) + list(site.event_shape)
            plates = site.plates
        else:
            shape = list(jnp.shape(trace_site["value"]))
            plates = tuple(frames)
        n = len(shape) - len(site.event_shape)
        for p in plates:
            info = self.structure.plates.get(p)
            if info is None:
                return tuple(shape) + (p,)
            shape[n + info.dim] = info.size
        return tuple(shape)

    # -- sampling ------------------------------------------------------------------------
    def _encodings(self, params: dict, indices: dict) -> dict:
        """Encodings ``(len(indices[p]), D)`` of the current elements of every used plate."""
        out = {}
        for name in self.structure.plates:
            pname = self._param_name(name, "encoding")
            if pname in params:
                out[name] = params[pname][indices[name]]
        return out

    def _sample_site(self, site, params, enc, unc, centers, noise, chunk_size=None):
        """Sample one site on the grid of its plates' current elements.

        Parents enter the context as ``value - center``, where a parent's center is its
        flow's output at zero noise with zero parent input (held constant by
        ``stop_gradient``). This is a fixed per-element shift, so no information is lost,
        but the weights acting on parents no longer duplicate the bias: with raw values, a
        parent far from zero makes the coupling weights absorb bias noise, which slows
        SGD badly on the globals' scales.

        :return: canonical ``x (*grid, d)``, ``log q (*grid)`` and, when the site has
            children, its center ``(*grid, d)`` (else None).
        """
        grid = tuple(enc[p].shape[0] for p in site.plates)
        n = math.prod(grid)
        flow = self._flows[site.name]
        fparams = params[self._param_name(site.name, "flow")]
        context = params.get(self._param_name(site.name, "context"))
        parents = [(self.structure.latent[p], unc[p], centers[p]) for p in site.parents]

        def rows(r, z, with_parents=True):
            multi = jnp.unravel_index(r, grid) if grid else ()
            pos = dict(zip(site.plates, multi))
            parts = [enc[p][pos[p]] for p in site.plates]
            if context is not None:
                parts.append(jnp.broadcast_to(context, jnp.shape(r) + context.shape))
            for par, value, center in parents:
                at = tuple(pos[p] for p in par.plates)
                delta = value[at] - center[at] if with_parents else jnp.zeros_like(center[at])
                parts.append(jnp.broadcast_to(delta, jnp.shape(r) + (par.dim,)))
            return flow.sample_and_log_prob(fparams, z, jnp.concatenate(parts, -1))

        def run(fn, *xs):
            if chunk_size is None or n <= chunk_size:
                return fn(*xs)
            return jax.lax.map(lambda a: fn(*a), xs, batch_size=chunk_size)

        r = jnp.arange(n)
        x, logq = run(rows, r, jnp.reshape(noise, (n, site.dim)))
        center = None
        if site.name in self._has_children:
            zeros = jnp.zeros((n, site.dim))
            center, _ = run(lambda r_, z_: rows(r_, z_, with_parents=False), r, zeros)
            center = jax.lax.stop_gradient(jnp.reshape(center, grid + (site.dim,)))
        return jnp.reshape(x, grid + (site.dim,)), jnp.reshape(logq, grid), center

    def _sample_all(self, params, rng_key, indices, chunk_size=None):
        """Top-down sample of every latent site on the given plate elements.

        :return: constrained site-layout values, canonical unconstrained values and
            per-element ``log q`` (on each site's grid, support log-det included).
        """
        enc = self._encodings(params, indices)
        values, unc, centers, logqs = {}, {}, {}, {}
        keys = jax.random.split(rng_key, len(self.structure.latent))
        for key, (name, site) in zip(keys, self.structure.latent.items()):
            grid = tuple(int(indices[p].shape[0]) for p in site.plates)
            noise = jax.random.normal(key, grid + (site.dim,))
            x, logq, centers[name] = self._sample_site(site, params, enc, unc, centers, noise, chunk_size)
            value, logdet = _constrain(site, x)
            unc[name], values[name], logqs[name] = x, value, logq - logdet
        return values, unc, logqs

    def __call__(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        params = self._params()
        indices = {name: p._indices for name, p in plates.items()}
        rng_key = numpyro.prng_key()
        if rng_key is None:
            raise RuntimeError("AutoPAVI must run under a seed handler (SVI and Predictive provide one).")
        values, _, logqs = self._sample_all(params, rng_key, indices)
        result = {}
        for name, site in self.structure.latent.items():
            with ExitStack() as stack:
                for p in site.plates:
                    stack.enter_context(plates[p])
                log_density = _log_density_in_site_layout(site, logqs[name])
                fn = dist.Delta(values[name], log_density=log_density, event_dim=len(site.event_shape))
                result[name] = numpyro.sample(name, fn)
        return result

    # -- posterior over full plates ------------------------------------------------------
    def _full_indices(self) -> dict:
        return {name: jnp.arange(info.size) for name, info in self.structure.plates.items()}

    def _check_params(self, params: dict) -> None:
        missing = [k for k in self._init_values if k not in params]
        if missing:
            raise ValueError(
                f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}: pass the params "
                "of an SVI run with this guide (svi.get_params(state))."
            )

    def _deterministic(self, values: dict, args, kwargs) -> dict:
        """The model's deterministic sites given full-plate latent values."""
        data = {**self._full_indices(), **values}
        model = handlers.substitute(handlers.seed(self.model, 0), data=data)
        with handlers.block():
            trace = handlers.trace(model).get_trace(*args, **kwargs)
        return {k: s["value"] for k, s in trace.items() if s["type"] == "deterministic"}

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw latent samples over the **full** plates (plus the model's deterministic sites).

        Samples are drawn one at a time (``lax.map``) and, within a sample, along each
        site's plate elements in chunks of ``chunk_size``, so memory is bounded by the
        output plus one chunk of flow intermediates.

        :param rng_key: PRNG key.
        :param params: ``svi.get_params(state)``.
        :param args, kwargs: model arguments (needed for deterministic sites).
        :param sample_shape: leading shape of the samples.
        :return: ``{site: array of shape sample_shape + full site shape}``.
        """
        if self.structure is None:
            raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
        self._check_params(params)
        sample_shape = tuple(sample_shape)
        indices = self._full_indices()

        def one(key):
            values, _, _ = self._sample_all(params, key, indices, self.chunk_size)
            if args or kwargs:
                values.update(self._deterministic(values, args, kwargs))
            return values

        n = math.prod(sample_shape)
        keys = jax.random.split(rng_key, max(n, 1))
        if not sample_shape:
            return one(keys[0])
        out = jax.lax.map(one, keys)
        return jax.tree.map(lambda v: jnp.reshape(v, sample_shape + v.shape[1:]), out)

    def sample_with_log_prob(self, rng_key, params, sample_shape=()):
        """Full-plate samples with their log density under the guide.

        :return: ``(values, log_q)`` where ``values`` maps sites to constrained samples of
            shape ``sample_shape + full site shape`` and ``log_q`` maps sites to per-element
            log densities of shape ``sample_shape + plate sizes`` (outermost plate first).
        """
        self._check_params(params)
        indices = self._full_indices()
        sample_shape = tuple(sample_shape)
        keys = jax.random.split(rng_key, max(math.prod(sample_shape), 1))
        values, _, logqs = jax.lax.map(lambda k: self._sample_all(params, k, indices, self.chunk_size), keys)
        reshape = lambda v: jnp.reshape(v, sample_shape + v.shape[1:])  # noqa: E731
        return jax.tree.map(reshape, values), jax.tree.map(reshape, logqs)

    def median(self, params, *args, num_samples: int = 1000, rng_key=None, **kwargs):
        """Monte Carlo estimate of the posterior median of every latent site (full plates).

        A flow has no closed-form median, so this is the coordinate-wise median of
        ``num_samples`` draws from :meth:`sample_posterior`.
        """
        return self.quantiles(params, [0.5], *args, num_samples=num_samples, rng_key=rng_key, **kwargs)

    def quantiles(self, params, quantiles, *args, num_samples: int = 1000, rng_key=None, **kwargs):
        """Monte Carlo estimate of posterior quantiles (coordinate-wise, full plates).

        :param quantiles: a list of quantile levels in ``[0, 1]``.
        :return: ``{site: array (len(quantiles), *site_shape)}``; for :meth:`median` the
            leading axis is dropped.
        """
        rng_key = jax.random.PRNGKey(0) if rng_key is None else rng_key
        samples = self.sample_posterior(rng_key, params, sample_shape=(num_samples,))
        qs = jnp.asarray(quantiles)
        out = {k: jnp.quantile(v, qs, axis=0) for k, v in samples.items()}
        if list(np.atleast_1d(quantiles)) == [0.5] and np.ndim(quantiles) == 1 and len(quantiles) == 1:
            return {k: v[0] for k, v in out.items()}
        return out

    # -- introspection -------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of scalar parameters of the guide."""
        return int(sum(np.size(leaf) for leaf in jax.tree.leaves(self._init_values)))

    def describe(self) -> str:
        """A table of sites: plates, encoding, flow, context and parameter counts."""
        if self.structure is None:
            return "AutoPAVI (not set up yet: run SVI or call the guide once)"
        lines = [f"{'site':<16}{'plates':<24}{'d':>4}{'context':>9}  {'flow':<28}{'params':>10}"]
        for name, site in self.structure.latent.items():
            flow = self._flows[name]
            count = sum(np.size(x) for x in jax.tree.leaves(self._init_values[self._param_name(name, "flow")]))
            plates = ",".join(f"{p}[{self.structure.plates[p].size}]" for p in site.plates) or "-"
            desc = f"affine+{flow.num_layers if site.dim > 1 else 0}x{flow.layer[:4]}" + (
                f" | parents: {','.join(site.parents)}" if site.parents else ""
            )
            lines.append(f"{name:<16}{plates:<24}{site.dim:>4}{flow.context_dim:>9}  {desc:<28}{count:>10}")
        for name in self.structure.plates:
            pname = self._param_name(name, "encoding")
            if pname in self._init_values:
                lines.append(f"plate {name:<10} encoding: {self.encoding} {self._init_values[pname].shape}")
        lines.append(f"total parameters: {self.num_params()}")
        return "\n".join(lines)
