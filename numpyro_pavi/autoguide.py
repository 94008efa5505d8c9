"""``AutoPAVI``: a plate-amortized autoguide for NumPyro models.

The guide traces the model once (:mod:`numpyro_pavi.structure`), then gives every latent
site one conditional normalizing flow (:mod:`numpyro_pavi.flows`) shared by all elements of
the site's plates. An element's flow is conditioned on a small per-element *encoding* for
each plate it sits in and on the sampled values of the site's parents, so the family can
express the coupling between global and local variables that mean-field guides miss.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import warnings
import zlib
from collections.abc import Callable, Mapping
from contextlib import ExitStack

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.distributions.transforms import biject_to
from numpyro.infer.autoguide import AutoGuide
from numpyro.infer.initialization import init_to_median

from . import data as _data
from .data import Ragged
from .encoders import SetEncoder, init_readout, readout
from .flows import ConditionalFlow
from .laplace import NEWTON_STEPS, log_joint, newton_base, reference_trace
from .structure import LatentSite, ModelStructure, model_structure, plate_sizes, prior_dependencies, seeded_model

__all__ = ["AutoPAVI"]

_ENCODINGS = ("auto", "free", "set", "hybrid")
# NumPyro >= 0.21 guides take forward_mode_differentiation (older ones set up in reverse mode)
_BASE_TAKES_FORWARD_MODE = "forward_mode_differentiation" in inspect.signature(AutoGuide.__init__).parameters
_FLOW_LAYERS = ("autoregressive", "coupling")
_ESTIMATORS = ("stl", "reparam")


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


def _masked(site: LatentSite, logq: jax.Array, trace_site: dict | None, grid: tuple) -> jax.Array:
    """Per-element ``logq (*grid)`` with the cells the model masks out removed.

    Where the model does not score a latent cell (``handlers.mask``, ``fn.mask``, or the
    imputed ``{name}_unobserved`` site of ``obs_mask`` at its observed cells), the guide must
    not score it either: its entropy alone would reward an ever wider guide there, and the
    loss would fall without bound. An element's density is spread evenly over its intrinsic
    cells (as in ``_log_density_in_site_layout``), so it keeps the share of its cells in.
    """
    mask = _data.site_mask(trace_site)
    if mask is None:
        return logq
    batch = list(site.batch_shape)
    for pos, size in zip(site.plate_positions, grid):
        batch[pos] = size
    try:
        mask = jnp.broadcast_to(mask, tuple(batch))
    except ValueError:
        return logq  # a mask that does not line up with the site: the model will complain
    order = list(site.plate_positions) + list(site.intrinsic_positions)
    share = jnp.mean(jnp.reshape(jnp.transpose(mask, order), tuple(grid) + (-1,)), -1)
    return jnp.where(share > 0, logq * share, 0.0)


def _element_noise(key: jax.Array, indices: list, dim: int) -> jax.Array:
    """Standard normal noise ``(*map(len, indices), dim)`` where element ``(i, j, ...)`` is
    drawn from ``fold_in(fold_in(key, i), j)...``: independent of the other elements."""
    if not indices:
        return jax.random.normal(key, (dim,))
    return jax.vmap(lambda i: _element_noise(jax.random.fold_in(key, i), indices[1:], dim))(indices[0])


def _takes_arguments(model: Callable) -> bool:
    try:
        return bool(inspect.signature(model).parameters)
    except (TypeError, ValueError):
        return True


def _fingerprint(value) -> int | None:
    """A checksum of observed values (None for abstract or missing ones)."""
    try:
        # float32 either way: the same data passed as float64 NumPy or float32 JAX must match
        arr = np.asarray(value, dtype=np.float32)
    except Exception:  # noqa: BLE001 - tracers (jax.eval_shape, jit) have no values
        return None
    return zlib.crc32(np.ascontiguousarray(arr).tobytes(), zlib.crc32(str(arr.shape).encode())) if arr.size else None


def _empty(shapes, sample_shape: tuple):
    """Zero-size arrays ``sample_shape + shape`` for a tree of ``ShapeDtypeStruct``."""
    return jax.tree.map(lambda s: jnp.zeros(sample_shape + s.shape, s.dtype), shapes)


class AutoPAVI(AutoGuide):
    """Plate-amortized variational inference (PAVI) as a NumPyro autoguide.

    Every latent site gets one conditional normalizing flow shared by all elements of its
    plates (plate amortization). The flow of element ``n`` is conditioned on

    * an *encoding* ``E^n in R^D`` for each plate the site sits in. With
      ``encoding="free"`` (PAVI-F) the encodings are learned parameters, one
      ``(plate_size, D)`` array per plate named ``{plate}_{prefix}_encoding``;
    * the sampled (unconstrained) values of every earlier latent site whose plates are a
      subset of the site's (its prior parents and the siblings the posterior couples it
      with), so ``q(theta) = prod_i q(theta_i | theta_<i, E)`` in the model's order. Sites in
      plates the site is not in are left out (their per-element values do not align);
    * nothing else for sites outside every plate: their flows see only their parents.

    The flow (params ``{site}_{prefix}_flow``) is a standard normal on the site's flattened
    unconstrained element, ``flow_layers`` conditional autoregressive (or coupling) layers
    when the element has more than one coordinate, a conditional affine layer that sets
    the element's location and scale, then ``biject_to(support)``.

    Subsampling works as with any NumPyro guide: write ``numpyro.plate(name, N,
    subsample_size=B)`` in the model; on each call the guide opens the model's plates with
    the model's current subsample sizes (read from a blocked trace of the model, so
    different sizes at ``init`` and ``update`` work), the model replays the guide's indices
    and NumPyro scales both by ``N / B``.

    :param callable model: a NumPyro model.
    :param str encoding: how plate elements get their encodings:

        * ``"free"`` (PAVI-F): one learned ``D``-vector per element;
        * ``"set"`` (PAVI-E): computed by a learned set encoder from the element's observed
          data (see :mod:`numpyro_pavi.data`); raises if a plate's data cannot be found;
        * ``"hybrid"``: the set encoding plus a free per-element residual (zeros at init);
        * ``"auto"`` (default): ``"set"`` where a plate's data is found; elsewhere none with
          Laplace bases (``laplace``), ``"free"`` without.
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
    :param SetEncoder encoder: architecture of the set encoders (``out_dim`` is replaced by
        ``encoding_dim``); default Deep Sets with mean pooling.
    :param dict ragged: ``{plate: Ragged(index=..., covariates=...)}`` for plates whose data
        is a flat observation plate plus an index array (see :class:`~numpyro_pavi.Ragged`).
    :param str estimator: the ELBO gradient estimator the guide's log-density supports:

        * ``"stl"`` (default): the path-derivative, "sticking the landing" estimator (Roeder,
          Wu and Duvenaud, 2017). The guide's log-density is evaluated at the sample with
          the variational parameters held constant (flow weights, encodings, set encoder
          weights); the sample keeps its path gradient, including through the parents in a
          child's context. Unbiased, and its per-sample gradient vanishes at the optimum of
          a family that contains the posterior, so a constant learning rate stays there
          instead of wandering. It costs one inversion of each flow per step (``d`` cheap
          passes for autoregressive layers, one for coupling layers).
        * ``"reparam"``: the plain reparameterization estimator (the log-density's gradient
          includes the score term, whose expectation is zero but whose noise is not).
    :param bool laplace: (default True) give every local site (one inside a plate) an element-wise
        Laplace base (see :mod:`numpyro_pavi.laplace`): a few Newton steps on the model's
        log joint, per element and given the sampled values of the sites before it, locate
        the element's mode ``m`` and precision ``P``, and the site's flow, which starts as a
        standard normal, acts in the standardized coordinates ``L^T (x - m)``. The
        likelihood then informs every element directly (covariates, gathers such as
        ``a[group]``, crossed designs, non-Gaussian families, the number of observations)
        with no declaration, at the price of ``(1 + d) * (NEWTON_STEPS + 2)`` (10) extra
        passes through the model per local site and step. With ``encoding="auto"``, plate
        sets with no data inside them get no encoding (``laplace=False``: free ones).
        Posteriors run on the model's arguments (the training ones when none are given);
        new data gives new groups their posterior without retraining.
    :param bool forward_mode_differentiation: as in NumPyro's guides: use forward-mode
        differentiation when the model is set up (initialization), for models that
        reverse mode cannot differentiate (e.g. ``jax.lax.while_loop``). Pass the same flag
        to ``SVI.run``/``Trace_ELBO`` for training.
    """

    _no_encoding: frozenset = frozenset()  # plate sets with no encoding (see _build)

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
        init_loc_fn: Callable = init_to_median(num_samples=15),  # noqa: B008 - as NumPyro's guides
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        chunk_size: int = 2**16,
        encoder: SetEncoder | None = None,
        ragged: dict[str, Ragged] | None = None,
        estimator: str = "stl",
        laplace: bool = True,
        forward_mode_differentiation: bool = False,
    ):
        if encoding not in _ENCODINGS:
            raise ValueError(f"Unknown encoding {encoding!r}; use one of {_ENCODINGS}.")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"Unknown estimator {estimator!r}; use one of {_ESTIMATORS}.")
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
        ragged = dict(ragged or {})
        for plate, decl in ragged.items():
            if not isinstance(decl, Ragged):
                raise TypeError(
                    f"ragged[{plate!r}] must be numpyro_pavi.Ragged(index=..., covariates=...), got {decl!r}."
                )
        if encoder is not None and not isinstance(encoder, SetEncoder):
            raise TypeError(f"encoder must be a numpyro_pavi.SetEncoder, got {encoder!r}.")
        self.encoding = encoding
        self.estimator = estimator
        self.laplace = bool(laplace)
        self.encoding_dim = encoding_dim
        self.encoder = encoder if encoder is not None else SetEncoder(kind="deep_sets")
        self.ragged = ragged
        self.flow_layers = flow_layers
        self.flow_layer = flow_layer
        self.hidden = tuple(hidden)
        self._init_scale = init_scale
        self.chunk_size = chunk_size
        self.structure: ModelStructure | None = None
        self._flows: dict[str, ConditionalFlow] = {}
        self._init_values: dict = {}
        fwd = {}
        if forward_mode_differentiation or _BASE_TAKES_FORWARD_MODE:
            if not _BASE_TAKES_FORWARD_MODE:
                raise ValueError(
                    "forward_mode_differentiation=True needs NumPyro >= 0.21, whose guides set up "
                    f"models in forward mode (installed: {numpyro.__version__})."
                )
            fwd = {"forward_mode_differentiation": forward_mode_differentiation}
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn, create_plates=create_plates, **fwd)

    # -- setup ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        try:
            self._setup(*args, **kwargs)
        except BaseException:
            # all or nothing: a failed setup (bad data, or tracers under jax.eval_shape) must
            # not leave a half-set-up guide that later calls would take as ready
            self.prototype_trace = None
            raise

    def _setup(self, *args, **kwargs):
        # Validate on a plain trace first: it gives clearer errors than initialize_model.
        rng_key = numpyro.prng_key()
        with handlers.block():
            trace = handlers.trace(seeded_model(self.model, rng_key)).get_trace(*args, **kwargs)
        model_structure(trace)
        _data.check_observed_finite(trace)
        super()._setup_prototype(*args, **kwargs)
        with handlers.block():
            deps = prior_dependencies(self.model, args, kwargs)
        self.structure = model_structure(self.prototype_trace, deps)
        if not self.structure.latent:
            raise ValueError("The model has no latent sample sites: there is nothing to infer.")
        self._setup_data(self.prototype_trace, args, kwargs)
        self._build(rng_key)
        self._fingerprints = self._data_fingerprints(args, kwargs)
        # posteriors asked for without arguments are the training ones (as NumPyro's guides
        # give); kept by reference, never pickled (see __getstate__), and not under tracing
        concrete = not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        self._train_args = (args, kwargs) if concrete else None

    def _on_laplace(self, site: LatentSite) -> bool:
        return self.laplace and bool(site.plates)

    def _context_dim(self, site: LatentSite) -> int:
        # one encoding per element of the site's plate set; globals see their parents only (a
        # learned constant input would only duplicate the bias, in a product of two learned
        # factors that Adam moves many times faster than a plain location)
        return (self.encoding_dim if site.plates else 0) + sum(self.structure.latent[p].dim for p in site.conditions_on)

    def _build(self, rng_key) -> None:
        keys = jax.random.split(rng_key, len(self.structure.latent) + len(self.structure.plates) + 1)
        self._flows, self._init_values = {}, {}
        self._has_children = {p for site in self.structure.latent.values() for p in site.conditions_on}
        for k, (name, site) in zip(keys, self.structure.latent.items()):
            flow = ConditionalFlow(
                site.dim,
                self._context_dim(site),
                num_layers=self.flow_layers,
                layer=self.flow_layer,
                hidden=self.hidden,
                # on a Laplace base the flow acts on standardized values: it starts as N(0, I)
                init_scale=1.0 if self._on_laplace(site) else self._init_scale,
                bilinear=self.encoding_dim if site.plates else 0,
            )
            self._flows[name] = flow
            loc = _unconstrained_to_canonical(site, self._init_locs[name])
            loc = jnp.mean(jnp.reshape(loc, (-1, site.dim)), 0)
            if self._on_laplace(site):
                loc = jnp.zeros_like(loc)
            self._init_values[self._param_name(name, "flow")] = flow.init(k, loc=loc, skip=self._encoding_skip(site))
        self._plan = self._encoding_plan(self.prototype_trace)
        # with Laplace bases the likelihood already informs every element: where no data
        # sits inside a plate set, "auto" gives no encoding rather than per-element ones
        self._no_encoding = {
            key for key, src in self._plan.items() if self.laplace and self.encoding == "auto" and not src
        }
        for k, (key, sources) in zip(keys[len(self.structure.latent) :], self._plan.items()):
            self._init_encoding(k, key, sources)

    # -- encodings -----------------------------------------------------------------------
    def _encoding_plan(self, trace) -> dict:
        """``{plate set: data sources}`` for every plate set that holds latent sites.

        A source is ``("nested", obs_site)`` or ``("ragged", plate)``; an empty list means
        free encodings.
        """
        # model order, then fewer plates first (a stable sort): a set's order would follow the
        # interpreter's hash seed, and with it the encoders' initial keys
        keys = sorted(dict.fromkeys(site.plates for site in self.structure.latent.values() if site.plates), key=len)
        unknown = set(self.ragged) - set(self.structure.plates)
        if unknown:
            raise ValueError(
                f"ragged names unknown plate(s) {sorted(unknown)}; plates: {sorted(self.structure.plates)}."
            )
        plan = {}
        for key in keys:
            sources = []
            if self.encoding == "auto" and self._only_imputed(key):
                # obs_mask's missing cells have no data of their own to encode (a set encoding
                # would see the same "missing" input for all of them): free encodings
                plan[key] = sources
                continue
            if self.encoding != "free":
                sources = [("nested", o) for o, obs in self.structure.observed.items() if set(key) <= set(obs.plates)]
                if len(key) == 1 and key[0] in self.ragged:
                    sources.append(("ragged", key[0]))
                if not sources and self.encoding in ("set", "hybrid"):
                    raise ValueError(
                        f"encoding={self.encoding!r}: no observed data identifies the elements of plate(s) "
                        f"{'/'.join(key)}: no observed site sits inside {'/'.join(key)}. Put the "
                        "observations inside the plate, declare a ragged index with "
                        f"ragged={{{key[-1]!r}: Ragged(index=..., covariates=...)}}, or use "
                        "encoding='auto' (free encodings where no data is found)."
                    )
            plan[key] = sources
        return plan

    def _only_imputed(self, key: tuple) -> bool:
        """Whether every latent site in plate set ``key`` is an ``obs_mask`` imputation
        (NumPyro's ``{name}_unobserved`` beside an observed ``{name}_observed``)."""
        sites = [name for name, site in self.structure.latent.items() if site.plates == key]
        return bool(sites) and all(
            n.endswith("_unobserved") and n[: -len("_unobserved")] + "_observed" in self.structure.observed
            for n in sites
        )

    def _key_name(self, key: tuple) -> str:
        return "__".join(key)

    def _input_dims(self, key: tuple, sources: list) -> list:
        """Encoder input sizes per pooled level of each source."""
        D = self.encoding_dim
        dims = []
        for kind, name in sources:
            if kind == "nested":
                obs = self.structure.observed[name]
                pooled = [p for p in obs.plates if p not in key]
                dims.append((kind, name, [self._features[name] if i == 0 else D + 1 for i in range(len(pooled))]))
            else:
                dims.append((kind, name, [self._features[("ragged", name)]]))
        return dims

    def _init_encoding(self, rng_key, key: tuple, sources: list) -> None:
        D = self.encoding_dim
        sizes = [self.structure.plates[p].size for p in key]
        kname = self._key_name(key)
        if key in self._no_encoding:
            return
        if not sources or self.encoding == "hybrid":
            # zero: every element starts at the flow's shared initial distribution
            what = "residual" if sources else "encoding"
            self._init_values[self._param_name(kname, what)] = jnp.zeros((*sizes, D))
        if not sources:
            return
        enc = dataclasses.replace(self.encoder, out_dim=D)
        width = 0
        for kind, name, levels in self._input_dims(key, sources):
            keys = jax.random.split(jax.random.fold_in(rng_key, zlib.crc32(str(name).encode())), max(len(levels), 1))
            if kind == "nested":
                obs = self.structure.observed[name]
                pooled = [p for p in obs.plates if p not in key][::-1]  # innermost first
                pname = self._param_name(name, "encoder")
                store = self._init_values.setdefault(pname, {})
                for level, (p, in_dim, k) in enumerate(zip(pooled, levels, keys)):
                    store.setdefault(f"{p}@{level}", enc.init(k, in_dim))
                width += (D + 1) if pooled else self._features[name]
            else:
                self._init_values[self._param_name(name, "ragged_encoder")] = enc.init(keys[0], levels[0])
                width += D + 1
        self._init_values[self._param_name(kname, "encoder_out")] = init_readout(rng_key, width, D, scale=0.1)

    def _set_encoding(self, params, key: tuple, sources: list, trace, indices, sizes, bound) -> jax.Array:
        """Encodings ``(*grid, D)`` of the current elements of plate set ``key`` from data."""
        dims = {n: p.dim for n, p in self.structure.plates.items()}
        enc = dataclasses.replace(self.encoder, out_dim=self.encoding_dim)
        outs = []
        for kind, name in sources:
            if kind == "nested":
                x, oplates, mask = _data.observed_canonical(trace[name], dims, with_mask=True)
                width = self._features[name] // (2 if name in self._masked else 1)
                if x.shape[-1] != width:
                    raise ValueError(
                        f"Observed site '{name}' gives its set encoder {x.shape[-1]} features per "
                        f"observation here but {width} in training: its event dims (and "
                        "any batch dims that are not plates) are features, of fixed size. To encode "
                        "sets of other sizes, put the varying dimension in a numpyro.plate instead of "
                        "to_event()/expand()."
                    )
                mean, std = self._stats[name]
                x = (x - mean) / std
                if mask is not None:
                    # masked cells may hold anything (NaN for missing data): they enter as the
                    # feature's mean, and an indicator says which they are
                    x = jnp.where(mask, x, 0.0)
                if name in self._masked:
                    observed = jnp.ones(x.shape, bool) if mask is None else mask
                    x = jnp.concatenate([x, observed.astype(x.dtype)], -1)
                pooled = [p for p in oplates if p not in key]
                perm = [oplates.index(p) for p in key] + [oplates.index(p) for p in pooled] + [len(oplates)]
                h = jnp.transpose(x, perm)
                for level, p in enumerate(pooled[::-1]):
                    n = h.shape[-2]
                    out = enc(params[self._param_name(name, "encoder")][f"{p}@{level}"], h)
                    h = jnp.concatenate(
                        [out, jnp.broadcast_to(_data.log_count(n, sizes[p], n), out.shape[:-1] + (1,))], -1
                    )
                outs.append(h)
            else:
                outs.append(self._ragged_encoding(params, name, trace, indices, sizes, bound, enc))
        return readout(params[self._param_name(self._key_name(key), "encoder_out")], jnp.concatenate(outs, -1))

    def _ragged_parts(self, plate: str, trace, bound):
        """Features ``(B_obs, F)`` and element ids ``(B_obs,)`` of a ragged plate's data."""
        decl = self.ragged[plate]
        if decl.index not in bound:
            raise ValueError(
                f"Ragged plate '{plate}': the model has no argument named '{decl.index}' (its arguments: "
                f"{sorted(bound)}). Ragged(index=...) names the model argument holding the index array."
            )
        dims = {n: p.dim for n, p in self.structure.plates.items()}
        names = decl.observed or tuple(
            o for o, obs in self.structure.observed.items() if len(obs.plates) == 1 and obs.plates[0] != plate
        )
        if not names:
            raise ValueError(f"Ragged plate '{plate}': no observed site in a flat plate holds its data.")
        feats, obs_plate = [], None
        for o in names:
            if o not in trace:
                raise ValueError(f"Ragged plate '{plate}': observed site '{o}' is not in the model.")
            x, oplates = _data.observed_canonical(trace[o], dims)
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
            feats.append(_data.as_rows(bound[c], full_index.shape[0], c)[idx])
        return jnp.concatenate(feats, -1), ids, obs_plate

    def _ragged_encoding(self, params, plate, trace, indices, sizes, bound, enc) -> jax.Array:
        feats, ids, obs_plate = self._ragged_parts(plate, trace, bound)
        mean, std = self._stats[("ragged", plate)]
        feats = (feats - mean) / std
        B = int(indices[plate].shape[0])
        # position of each observation's element in the current subsample; B = not in it
        where = jnp.full((sizes[plate],), B).at[indices[plate]].set(jnp.arange(B))
        seg = where[ids]
        out = enc.segments(params[self._param_name(plate, "ragged_encoder")], feats, seg, B + 1)[:B]
        counts = jax.ops.segment_sum(jnp.ones(seg.shape[0]), seg, B + 1)[:B]
        n_obs = int(trace[obs_plate]["value"].shape[0])
        return jnp.concatenate([out, _data.log_count(counts, sizes[obs_plate], n_obs)], -1)

    def _setup_data(self, trace, args, kwargs) -> None:
        """Feature sizes and normalization constants of every data source (from setup data)."""
        self._features, self._stats, self._masked = {}, {}, set()
        dims = {n: p.dim for n, p in self.structure.plates.items()}
        if self.encoding == "free":
            return
        for name, obs in self.structure.observed.items():
            x, _, mask = _data.observed_canonical(trace[name], dims, with_mask=True)
            if mask is not None:
                self._masked.add(name)  # the encoder also reads which cells are observed
            if obs.plates:
                _data.check_finite(
                    f"observed site {name}", x if mask is None else jnp.where(mask, x, 0.0), obs.plates[0]
                )
            self._features[name] = int(x.shape[-1]) * (2 if mask is not None else 1)
            self._stats[name] = _data.feature_stats(x, mask)
        bound = _data.bind_arguments(self.model, args, kwargs) if self.ragged else {}
        for plate in self.ragged:
            feats, _, _ = self._ragged_parts(plate, trace, bound)
            _data.check_finite(f"data of ragged plate {plate}", feats, plate)
            self._features[("ragged", plate)] = int(feats.shape[-1])
            self._stats[("ragged", plate)] = _data.feature_stats(feats)

    def _encoding_skip(self, site: LatentSite) -> np.ndarray:
        """Initial skip ``(C, 2d)``: the element's encoding starts as a direct offset.

        Encoding coordinates ``[0, d)`` add to the element's shift and ``[d, 2d)`` to its raw
        scale, so from the first step each element moves on its own, as in a mean-field
        guide, instead of waiting for a shared projection to be learned; later coordinates
        and the non-linear path are free to learn anything else.
        """
        d, D = site.dim, self.encoding_dim
        skip = np.zeros((self._context_dim(site), 2 * d), np.float32)
        # on a Laplace base each element already starts at its own location and scale: an
        # encoding added directly would only move it away (by whole sds) until unlearned
        if site.plates and not self._on_laplace(site):
            for j in range(min(D, d)):
                skip[j, j] = 1.0
            for j in range(min(max(D - d, 0), d)):
                skip[d + j, d + j] = 1.0
        return skip

    def _param_name(self, name: str, what: str) -> str:
        return f"{name}_{self.prefix}_{what}"

    def _params(self) -> dict:
        self._check_param_clash()
        return {name: numpyro.param(name, value) for name, value in self._init_values.items()}

    def _check_param_clash(self) -> None:
        """Two guides writing one param name would silently share it (or fail on shapes).

        Site-level names cannot clash between guides of one ``AutoGuideList`` (each site has
        one guide), but plate-level ones (encodings, encoders) can: two AutoPAVIs over sites of
        the same plates with the same ``prefix``. An enclosing trace that already holds one
        of our names at this call is another guide's.
        """
        for handler in numpyro.primitives._PYRO_STACK:
            if isinstance(handler, handlers.trace):
                clash = [n for n in self._init_values if handler.trace.get(n, {}).get("type") == "param"]
                if clash:
                    raise ValueError(
                        f"Param '{clash[0]}' of this AutoPAVI (prefix={self.prefix!r}) was already created "
                        "by another guide in this run, e.g. a second AutoPAVI in the same AutoGuideList: the "
                        "params shared by a plate's elements (encodings, set encoders) are named after "
                        "plates and observed sites, not latent sites. Give each AutoPAVI its own "
                        "prefix, e.g. AutoPAVI(..., prefix='pavi2')."
                    )

    # -- plates --------------------------------------------------------------------------
    def _create_plates(self, *args, **kwargs) -> dict:
        """Open every plate of the model at its *current* subsample size (see ``_probe``)."""
        return self._open_plates(*self._probe(args, kwargs))

    def _probe(self, args, kwargs):
        """A blocked, seeded trace of the model on this call's arguments.

        It gives the plate indices the model would draw now (so different subsample sizes
        at ``init`` and ``update`` work) and the observed data at those indices for the set
        encoders. Its latent draws are dead code under ``jit``. User plates from
        ``create_plates`` take precedence and are substituted into the trace.
        """
        user = {}
        if self.create_plates is not None:
            user = self.create_plates(*args, **kwargs)
            user = [user] if isinstance(user, numpyro.plate) else list(user)
            user = {p.name: p for p in user}
        key = numpyro.prng_key()
        key = jax.random.PRNGKey(0) if key is None else key
        fixed = {name: p._indices for name, p in user.items()}
        model = seeded_model(self.model, key, fixed)
        with handlers.block():
            trace = handlers.trace(model).get_trace(*args, **kwargs)
        self._check_shapes(trace)
        now = plate_sizes(trace)
        for name, info in self.structure.plates.items():
            if name in now and now[name] != info.size:
                raise ValueError(
                    f"Plate '{name}' has {now[name]} elements in this call but {info.size} "
                    "when the guide was set up. Training needs fixed plate sizes (subsample with "
                    "subsample_size instead); for posteriors of new elements use "
                    "guide.sample_posterior(key, params, *new_args) with encoding='set'."
                )
        return trace, user

    def _open_plates(self, trace, user) -> dict:
        plates = dict(user)
        for name, info in self.structure.plates.items():
            if name in plates:
                continue
            site = trace.get(name)
            # a plate inside scan leaves no plate site, and is never subsampled (see structure)
            idx = site["value"] if site is not None and site["type"] == "plate" else jnp.arange(info.size)
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
    def _encodings(self, params: dict, indices: dict, trace, sizes: dict, bound: dict) -> dict:
        """Encodings ``(*grid, D)`` of the current elements of every plate set."""
        out = {}
        for key, sources in self._plan.items():
            kname = self._key_name(key)
            enc = None
            if key in self._no_encoding:
                out[key] = jnp.zeros(tuple(int(indices[p].shape[0]) for p in key) + (self.encoding_dim,))
                continue
            if sources:
                enc = self._set_encoding(params, key, sources, trace, indices, sizes, bound)
            for what in ("encoding", "residual"):
                free = params.get(self._param_name(kname, what))
                if free is not None:
                    free = free[jnp.ix_(*(indices[p] for p in key))]
                    enc = free if enc is None else enc + free
            out[key] = enc
        return out

    def _sample_site(self, site, params, enc, unc, centers, noise, chunk_size=None, path_gradient=False, base=None):
        """Sample one site on the grid of its plates' current elements.

        Parents enter the context as ``value - center``, where a parent's center is its
        flow's output at zero noise with zero parent input (held constant by
        ``stop_gradient``). This is a fixed per-element shift, so no information is lost,
        but the weights acting on parents no longer duplicate the bias: with raw values, a
        parent far from zero makes the coupling weights absorb bias noise, which slows
        SGD badly on the globals' scales.

        With ``path_gradient``, ``log q`` is evaluated with the variational parameters held
        constant (the path-derivative estimator, see ``estimator``): same value, other
        gradient.

        With a Laplace ``base = (m, L)`` (``(*grid, d)``, ``(*grid, d, d)``), the flow's
        output ``u`` is placed as ``x = m + L^{-T} u``; children then see ``u`` as this
        site's context (its standardized deviation), which depends on the sample only.

        :return: canonical ``x (*grid, d)``, ``log q (*grid)`` and, when the site has
            children, its center ``(*grid, d)`` (else None).
        """
        grid = enc[site.plates].shape[:-1] if site.plates else ()
        n = math.prod(grid)
        flow = self._flows[site.name]
        fparams = params[self._param_name(site.name, "flow")]
        parents = [(self.structure.latent[p], unc[p], centers[p]) for p in site.conditions_on]

        def rows(r, z, with_parents=True, m=None, chol=None):
            multi = jnp.unravel_index(r, grid) if grid else ()
            pos = dict(zip(site.plates, multi))
            own = (
                enc[site.plates][tuple(pos[p] for p in site.plates)] if site.plates else jnp.zeros(jnp.shape(r) + (0,))
            )
            deltas = []
            for par, value, center in parents:
                at = tuple(pos[p] for p in par.plates)
                delta = value[at] - center[at] if with_parents else jnp.zeros_like(center[at])
                deltas.append(jnp.broadcast_to(delta, jnp.shape(r) + (par.dim,)))
            x, logq = flow.sample_and_log_prob(fparams, z, jnp.concatenate([own, *deltas], -1))
            if path_gradient and with_parents:
                # Sticking the landing: score the sample with the variational parameters held
                # constant (flow weights and the encoding, free or set-encoded); the sample and
                # the parents' samples in the context keep their path gradients.
                frozen = jax.lax.stop_gradient
                logq = flow.log_prob(frozen(fparams), x, jnp.concatenate([frozen(own), *deltas], -1))
            if m is None:
                return x, logq
            # x = m + L^{-T} u, so log q(x) = log q(u) + log|det L|; m and L are functions of
            # the sampled parents only (no variational parameter), so they keep their gradients
            u = x
            x = m + jax.scipy.linalg.solve_triangular(chol, u[..., None], lower=True, trans=1)[..., 0]
            logdet = jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
            return jnp.concatenate([x, u], -1), logq + logdet

        def run(fn, *xs):
            if chunk_size is None or n <= chunk_size:
                return fn(*xs)
            return jax.lax.map(lambda a: fn(*a), xs, batch_size=chunk_size)

        r = jnp.arange(n)
        if base is not None:
            m, chol = base
            m, chol = jnp.reshape(m, (n, site.dim)), jnp.reshape(chol, (n, site.dim, site.dim))
            xu, logq = run(
                lambda r_, z_, m_, c_: rows(r_, z_, True, m_, c_), r, jnp.reshape(noise, (n, site.dim)), m, chol
            )
            x, u = xu[..., : site.dim], xu[..., site.dim :]
            center = (x - u) if site.name in self._has_children else None
            if center is not None:
                center = jnp.reshape(center, grid + (site.dim,))
            return jnp.reshape(x, grid + (site.dim,)), jnp.reshape(logq, grid), center
        x, logq = run(rows, r, jnp.reshape(noise, (n, site.dim)))
        center = None
        if site.name in self._has_children:
            zeros = jnp.zeros((n, site.dim))
            center, _ = run(lambda r_, z_: rows(r_, z_, with_parents=False), r, zeros)
            center = jax.lax.stop_gradient(jnp.reshape(center, grid + (site.dim,)))
        return jnp.reshape(x, grid + (site.dim,)), jnp.reshape(logq, grid), center

    def _sample_all(
        self,
        params,
        rng_key,
        indices,
        trace,
        sizes,
        bound,
        chunk_size=None,
        path_gradient=False,
        model_args=None,
        element_keys=False,
    ):
        """Top-down sample of every latent site on the given plate elements.

        :param indices: ``{plate: current element indices}``.
        :param trace: a model trace on those indices (observed data for the encoders).
        :param sizes: ``{plate: full size}``; ``bound``: model arguments by name.
        :param model_args: ``(args, kwargs)`` of the model, for the Laplace bases.
        :param element_keys: draw each element's noise from its own key (the site's key
            folded with the element's indices), so an element's draw does not depend on which
            other elements are sampled with it: chunked full-plate summaries then equal
            unchunked ones (see :mod:`numpyro_pavi.summaries`).
        :return: constrained site-layout values, canonical unconstrained values and
            per-element ``log q`` (on each site's grid, support log-det included).
        """
        enc = self._encodings(params, indices, trace, sizes, bound)
        values, unc, centers, logqs = {}, {}, {}, {}
        keys = jax.random.split(rng_key, len(self.structure.latent))
        for key, (name, site) in zip(keys, self.structure.latent.items()):
            grid = tuple(int(indices[p].shape[0]) for p in site.plates)
            if element_keys:
                noise = _element_noise(key, [indices[p] for p in site.plates], site.dim)
            else:
                noise = jax.random.normal(key, grid + (site.dim,))
            base = self._laplace_base(site, values, indices, model_args) if self._on_laplace(site) else None
            x, logq, centers[name] = self._sample_site(
                site, params, enc, unc, centers, noise, chunk_size, path_gradient, base
            )
            value, logdet = _constrain(site, x)
            unc[name], values[name], logqs[name] = (
                x,
                value,
                _masked(site, logq - logdet, None if trace is None else trace.get(name), grid),
            )
        return values, unc, logqs

    def _laplace_base(self, site: LatentSite, values: dict, indices: dict, model_args):
        """``(m, L)`` of ``site`` on the current elements, given the sampled ``values`` of the
        sites before it (see :mod:`numpyro_pavi.laplace`).

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
        plates = {p: indices[p] for p in self.structure.plates if p in indices}
        names = list(self.structure.latent)
        group = [site] + [
            s
            for s in (self.structure.latent[n] for n in names[names.index(site.name) + 1 :])
            if s.plates == site.plates
        ]
        cuts = np.cumsum([g.dim for g in group])[:-1].tolist()

        def logp(z, known):
            vals, logdet = {}, 0.0
            for g, part in zip(group, jnp.split(z, cuts, axis=-1)):
                vals[g.name], ld = _constrain(g, part)
                logdet = logdet + jnp.sum(ld)
            lp = log_joint(self.model, {**plates, **known, **vals}, args, kwargs, per_element_of=site.name)
            return lp + logdet

        frozen = jax.lax.stop_gradient(values)
        # the start: the group's prior means given the values before it, in canonical layout
        trace = reference_trace(self.model, {**plates, **frozen}, args, kwargs)
        z_init = jnp.concatenate(
            [_unconstrained_to_canonical(g, biject_to(g.support).inv(trace[g.name]["value"])) for g in group], -1
        )
        m, chol = newton_base(lambda z: logp(z, values), lambda z: logp(z, frozen), z_init, NEWTON_STEPS)
        if len(group) == 1:
            return m, chol
        d, total = site.dim, m.shape[-1]
        cov = jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(jnp.eye(total), chol.shape))[..., :d, :d]
        prec = jnp.linalg.inv(cov)
        return m[..., :d], jnp.linalg.cholesky(0.5 * (prec + jnp.swapaxes(prec, -1, -2)))

    def __call__(self, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpyro warns when there is no key: we raise instead
            unseeded = numpyro.prng_key() is None
        if unseeded:
            raise RuntimeError("AutoPAVI must run under a seed handler (SVI and Predictive provide one).")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        trace, user = self._probe(args, kwargs)
        plates = self._open_plates(trace, user)
        params = self._params()
        indices = {name: p._indices for name, p in plates.items()}
        rng_key = numpyro.prng_key()
        if rng_key is None:
            raise RuntimeError("AutoPAVI must run under a seed handler (SVI and Predictive provide one).")
        sizes = {name: info.size for name, info in self.structure.plates.items()}
        bound = _data.bind_arguments(self.model, args, kwargs) if self.ragged else {}
        values, _, logqs = self._sample_all(
            params,
            rng_key,
            indices,
            trace,
            sizes,
            bound,
            path_gradient=self.estimator == "stl",
            model_args=(args, kwargs),
        )
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
    def _full_indices(self, sizes: dict | None = None) -> dict:
        sizes = sizes or {name: info.size for name, info in self.structure.plates.items()}
        return {name: jnp.arange(size) for name, size in sizes.items()}

    def _check_call(self, rng_key, params, sample_shape=()) -> tuple:
        """Argument checks shared by the posterior methods; returns ``sample_shape`` as a tuple."""
        if not isinstance(params, Mapping):
            swapped = isinstance(rng_key, Mapping)
            raise TypeError(
                f"params must be the dict svi.get_params(state) returns, got {type(params).__name__}"
                + (": rng_key and params look swapped; the order is (rng_key, params, *args)." if swapped else ".")
            )
        if isinstance(rng_key, Mapping) or not hasattr(rng_key, "dtype"):
            raise TypeError(f"rng_key must be a PRNG key (jax.random.PRNGKey(0)), got {type(rng_key).__name__}.")
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        if not all(isinstance(n, (int, np.integer)) and n >= 0 for n in shape):
            raise ValueError(f"sample_shape must be a tuple of non-negative ints, got {sample_shape!r}.")
        return shape

    def _check_params(self, params: dict) -> None:
        missing = [k for k in self._init_values if k not in params]
        if missing:
            raise ValueError(
                f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}: pass the params "
                "of an SVI run with this guide (svi.get_params(state))."
            )
        for name, init in self._init_values.items():
            want = jax.tree.map(jnp.shape, init)
            got = jax.tree.map(jnp.shape, params[name])
            if want != got:
                raise ValueError(
                    f"params['{name}'] does not match this guide (shapes {got} vs {want}): were they "
                    "trained with other options (encoding_dim, hidden, flow_layers) or another model?"
                )

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_train_args", None)  # the training data: not part of the guide
        return state

    def _posterior_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model arguments a posterior method runs on: the given ones, or, when none are
        given and the guide reads data (set encoders, Laplace bases), the training ones."""
        if args or kwargs or self.structure is None:
            return args, kwargs
        reads_data = any(self._plan.values()) or any(self._on_laplace(s) for s in self.structure.latent.values())
        train = getattr(self, "_train_args", None)
        return train if (reads_data and train is not None) else (args, kwargs)

    def _full_inputs(self, args, kwargs):
        """Full plate sizes, indices, a full-plate trace and the bound arguments.

        With the set encoder, ``args`` may hold new data (more or other groups): the plate
        sizes are read from it. Free encodings only exist for the training elements.
        """
        if self.structure is None:
            raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
        sizes = {name: info.size for name, info in self.structure.plates.items()}
        needs_data = any(self._plan.values()) or (
            any(self._on_laplace(s) for s in self.structure.latent.values()) and _takes_arguments(self.model)
        )
        if not (args or kwargs):
            if needs_data:
                raise ValueError(
                    "This guide encodes plate elements from their data: pass the model's arguments "
                    "(e.g. guide.sample_posterior(key, params, *args, **kwargs))."
                )
            return sizes, self._full_indices(sizes), None, {}
        with handlers.block():
            trace = handlers.trace(seeded_model(self.model, 0)).get_trace(*args, **kwargs)
        now = plate_sizes(trace)
        sizes.update({name: now[name] for name in sizes if name in now})
        changed = {n for n, sz in sizes.items() if sz != self.structure.plates[n].size}
        for key, sources in self._plan.items():
            free_needed = (not sources and key not in self._no_encoding) or self.encoding == "hybrid"
            if free_needed and changed & set(key):
                p = min(changed & set(key))
                raise ValueError(
                    f"Plate '{p}' has {sizes[p]} elements here but {self.structure.plates[p].size} in "
                    f"training, and its elements have free (per-element, learned) encodings: there "
                    f"is none for new elements. Use encoding='set' with data inside plate '{p}' (or "
                    "a Ragged declaration) to get posteriors of new elements without retraining."
                )
        indices = self._full_indices(sizes)
        trace = self._trace_full(indices, args, kwargs)
        self._check_shapes(trace)
        _data.check_observed_finite(trace)  # new data: the same clear error as in training
        self._check_same_data(trace)
        bound = _data.bind_arguments(self.model, args, kwargs) if self.ragged else {}
        return sizes, indices, trace, bound

    def _free_plates(self) -> set[str]:
        """Plates whose elements have free (learned, per-element) encodings or residuals."""
        return {
            p
            for key, sources in self._plan.items()
            if (not sources and key not in self._no_encoding) or self.encoding == "hybrid"
            for p in key
        }

    def _free_observed(self) -> list[str]:
        """Observed sites inside a plate whose elements have free encodings."""
        free = self._free_plates()
        return [name for name, obs in self.structure.observed.items() if free & set(obs.plates)]

    def _data_fingerprints(self, args, kwargs) -> dict:
        """Checksums of the full-plate training data behind free encodings (see ``_check_same_data``).

        Taken on a full-plate trace: the setup trace may hold a subsample only.
        """
        names = self._free_observed()
        if not names:
            return {}
        trace = self._trace_full(self._full_indices(), args, kwargs)
        return {name: _fingerprint(trace[name]["value"]) for name in names if name in trace}

    def _check_same_data(self, trace) -> None:
        """Free encodings were learned from the training data: with other observed values for
        their elements, they would silently give the training posterior."""
        free = self._free_plates()
        for name in self._free_observed():
            site = trace.get(name)
            if site is None or not site["is_observed"]:
                continue
            known, now = getattr(self, "_fingerprints", {}).get(name), _fingerprint(site["value"])
            if known is not None and now is not None and known != now:
                plates = sorted(free & set(self.structure.observed[name].plates))
                raise ValueError(
                    f"Observed site '{name}' holds other values than in training, but the elements of "
                    f"plate(s) {plates} have free (learned, per-element) encodings: they describe the "
                    "training data, and the posterior returned would be the training one. Retrain "
                    "on the new data, or use encoding='set' (set encoders read each element's data)."
                )

    def _trace_full(self, data: dict, args, kwargs) -> dict:
        """A blocked trace of the model with full-plate indices (and any values) substituted."""
        with handlers.block(), warnings.catch_warnings():
            # full indices in a subsampled plate are intended here, not a model/guide mismatch
            warnings.filterwarnings("ignore", message="subsample_size does not match")
            return handlers.trace(seeded_model(self.model, 0, data)).get_trace(*args, **kwargs)

    def _deterministic(self, values: dict, indices: dict, args, kwargs) -> dict:
        """The model's deterministic sites given full-plate latent values.

        Without the model's arguments the model runs on its defaults, as NumPyro's guides do
        (``Predictive`` on the latents): observed sites are then drawn, and the plates keep
        the sizes the model gives them.
        """
        data = {**indices, **values} if (args or kwargs) else values
        trace = self._trace_full(data, args, kwargs)
        return {k: s["value"] for k, s in trace.items() if s["type"] == "deterministic"}

    def _one_draw(self, params, args, kwargs) -> Callable:
        """``key -> {site: full-plate value}``: one posterior draw (latent and deterministic
        sites), the sampler shared by :meth:`sample_posterior` and :meth:`posterior_moments`."""
        self._check_params(params)
        args, kwargs = self._posterior_args(args, kwargs)
        sizes, indices, trace, bound = self._full_inputs(args, kwargs)
        margs = (args, kwargs)
        deterministic = any(s["type"] == "deterministic" for s in self.prototype_trace.values())

        def one(key):
            values, _, _ = self._sample_all(
                params, key, indices, trace, sizes, bound, self.chunk_size, model_args=margs
            )
            if deterministic:
                values.update(self._deterministic(values, indices, args, kwargs))
            return values

        return one

    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw latent samples over the **full** plates (plus the model's deterministic sites).

        Samples are drawn one at a time (``lax.map``) and, within a sample, along each
        site's plate elements in chunks of ``chunk_size``, so memory is bounded by the
        output plus one chunk of flow intermediates. With set encodings, ``args`` may be
        new data with other or more groups: their posterior comes without retraining.

        :param rng_key: PRNG key.
        :param params: ``svi.get_params(state)``.
        :param args, kwargs: model arguments (needed for set encodings and deterministic sites).
        :param sample_shape: leading shape of the samples.
        :return: ``{site: array of shape sample_shape + full site shape}``.
        """
        sample_shape = self._check_call(rng_key, params, sample_shape)
        one = self._one_draw(params, args, kwargs)
        keys = jax.random.split(rng_key, max(math.prod(sample_shape), 1))
        if not sample_shape:
            return one(keys[0])
        if math.prod(sample_shape) == 0:
            return _empty(jax.eval_shape(one, keys[0]), sample_shape)
        out = jax.lax.map(one, keys)
        return jax.tree.map(lambda v: jnp.reshape(v, sample_shape + v.shape[1:]), out)

    def sample_with_log_prob(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Full-plate samples with their log density under the guide.

        :return: ``(values, log_q)`` where ``values`` maps sites to constrained samples of
            shape ``sample_shape + full site shape`` and ``log_q`` maps sites to per-element
            log densities of shape ``sample_shape + plate sizes`` (outermost plate first).
        """
        sample_shape = self._check_call(rng_key, params, sample_shape)
        self._check_params(params)
        args, kwargs = self._posterior_args(args, kwargs)
        sizes, indices, trace, bound = self._full_inputs(args, kwargs)
        margs = (args, kwargs)
        keys = jax.random.split(rng_key, max(math.prod(sample_shape), 1))

        def one(key):
            values, _, logqs = self._sample_all(
                params, key, indices, trace, sizes, bound, self.chunk_size, model_args=margs
            )
            return values, logqs

        if sample_shape and math.prod(sample_shape) == 0:
            return _empty(jax.eval_shape(one, keys[0]), sample_shape)
        values, logqs = jax.lax.map(one, keys)
        reshape = lambda v: jnp.reshape(v, sample_shape + v.shape[1:])
        return jax.tree.map(reshape, values), jax.tree.map(reshape, logqs)

    def posterior_moments(
        self,
        rng_key,
        params,
        *args,
        num_samples: int = 1000,
        batch_size: int = 100,
        progress_bar: bool = False,
        **kwargs,
    ) -> dict:
        """Posterior mean and sd of every site over the full plates, streamed: draws are made
        ``batch_size`` at a time and folded into running moments (Chan et al.'s pairwise
        update), so memory holds one batch of draws, not ``num_samples`` of them. The draws are
        those of ``sample_posterior(rng_key, params, *args, sample_shape=(num_samples,))``.

        :param num_samples: number of posterior draws.
        :param batch_size: draws held in memory at once (one compiled program, reused).
        :param progress_bar: show a ``tqdm`` bar over the batches.
        :return: ``{site: {"mean": array, "sd": array}}`` with each site's full shape (``sd``
            with ``ddof=1``, as ArviZ's summaries), for latent and deterministic sites.
        """
        self._check_call(rng_key, params)
        for name, n, low in (("num_samples", num_samples, 2), ("batch_size", batch_size, 1)):
            if not isinstance(n, (int, np.integer)) or n < low:
                raise ValueError(f"{name} must be an int >= {low}, got {n!r}.")
        batch_size = min(batch_size, num_samples)  # no padded draws beyond the ones asked for
        one = self._one_draw(params, args, kwargs)
        keys = jax.random.split(rng_key, num_samples)

        @jax.jit
        def fold(state, batch_keys, valid):
            # a short last batch is padded with repeated keys, weighted out by ``valid``
            values = jax.lax.map(one, batch_keys)
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

        shapes = jax.eval_shape(one, keys[0])
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
            state = fold(state, batch, valid)
        count, mean, m2 = state
        return {k: {"mean": mean[k], "sd": jnp.sqrt(m2[k] / (count - 1))} for k in mean}

    def posterior_summary(self, rng_key, params, *args, **kwargs) -> dict:
        """Per-element posterior mean, sd and quantiles of every latent site, streamed over the
        elements of one plate, optionally writing every draw to a Zarr store: see
        :func:`numpyro_pavi.summaries.posterior_summary` for the options. Unlike
        :meth:`quantiles`, memory never holds all draws of all elements."""
        from .summaries import posterior_summary

        return posterior_summary(self, rng_key, params, *args, **kwargs)

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
        if not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
            raise ValueError(
                f"num_samples must be a positive int (draws to estimate quantiles from), got {num_samples!r}."
            )
        levels = np.asarray(quantiles, dtype=float)
        if levels.ndim > 1 or levels.size == 0 or np.any((levels < 0) | (levels > 1)) or np.any(np.isnan(levels)):
            raise ValueError(f"quantiles must be a non-empty list of levels in [0, 1], got {quantiles!r}.")
        samples = self.sample_posterior(rng_key, params, *args, sample_shape=(num_samples,), **kwargs)
        samples = {k: v for k, v in samples.items() if k in self.structure.latent}
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
            desc = (
                ("laplace+" if self._on_laplace(site) else "")
                + f"affine+{flow.num_layers if site.dim > 1 else 0}x{flow.layer[:4]}"
                + (f" | given: {','.join(site.conditions_on)}" if site.conditions_on else "")
            )
            lines.append(f"{name:<16}{plates:<24}{site.dim:>4}{flow.context_dim:>9}  {desc:<28}{count:>10}")
        for key, sources in self._plan.items():
            kind = "free" if not sources else ("hybrid" if self.encoding == "hybrid" else "set")
            kind = "none (Laplace bases)" if key in self._no_encoding else kind
            src = ", ".join(f"{k}:{n}" for k, n in sources)
            size = "x".join(str(self.structure.plates[p].size) for p in key)
            lines.append(
                f"plates {'/'.join(key):<20} elements {size:<10} encoding: {kind}" + (f" from {src}" if src else "")
            )
        lines.append(f"total parameters: {self.num_params()}")
        return "\n".join(lines)
