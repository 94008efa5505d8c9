"""``AutoPAVI``: a plate-amortized autoguide for NumPyro models.

The guide reads the model from one trace of it (:mod:`numpyro_pavi.structure`), plans its
variational family from that trace (:mod:`numpyro_pavi.plan`: one conditional normalizing flow per
latent site, shared by all elements of the site's plates, and each plate set's encodings),
and samples with the pure :func:`numpyro_pavi.sampling.sample_latents`. An element's flow is
conditioned on a small per-element *encoding* for each plate it sits in and on the sampled
values of the site's parents, so the family can express the coupling between global and
local variables that mean-field guides miss.
"""

from __future__ import annotations

import inspect
import math
import numbers
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
from .compiling import array_leaves, run_once, uses_linalg
from .data import Ragged
from .encoders import SetEncoder
from .laplace import LaplaceWarning
from .plan import GuideOptions, GuidePlan, build_plan, is_packed, packed_size, with_encoder_width
from .base_state import control_variate, global_vector, init_state, subsampled_rows
from .sampling import PlateInputs, draw_starts, encodings, sample_latents
from .structure import ModelStructure, full_indices, model_structure, plate_sizes, seeded_model

__all__ = ["AutoPAVI"]

_ENCODINGS = ("auto", "free", "set", "hybrid")
# NumPyro >= 0.21 guides take forward_mode_differentiation (older ones set up in reverse mode)
_BASE_TAKES_FORWARD_MODE = "forward_mode_differentiation" in inspect.signature(AutoGuide.__init__).parameters
_FLOW_TYPES = ("autoregressive", "coupling")
_ESTIMATORS = ("stl", "reparam")
#: Option names before 0.3 -> their NumPyro-style names.
_RENAMED = {"flow_layers": "num_flows", "flow_layer": "flow_type", "hidden": "hidden_dims"}


def _unconstrained(fn, value) -> tuple:
    """``(biject_to(support).inv(value), fn.log_prob(value))`` of one site."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return biject_to(fn.support).inv(value), fn.log_prob(value)


def _compiled_initial_values(model: Callable, rng_key, init: Callable, args: tuple, kwargs: dict) -> dict | None:
    """The init strategy's value of every latent sample site, with its unconstrained value
    and log density, from one compiled trace of the model (``name -> (value, x, log_prob)``);
    None where the model cannot be traced with latent tracers (it reads a latent value on
    the host) or tracing fails for any other reason: the eager trace then runs as before
    and raises whatever the model raises.

    The model's NumPy data are passed as JAX arrays first (a NumPy array indexed with a
    traced subsample raises where the training step's traced data would not), then, where
    that fails, as they are (a model that reads its data on the host: ``int(mask.sum())``).
    A model that caches arrays it computes between calls (a module-level dict) would cache
    this trace's tracers; such a model cannot train under ``jit`` either.

    On small models the eager alternative compiles every operation of the init strategy
    and of the bijections on first use, one program each: 66 of the 174 programs that
    ``svi.init`` compiled on epil.
    """
    arrays, rebuild = array_leaves((args, kwargs))

    def values(key, args, kwargs):
        trace = handlers.trace(seeded_model(model, key, init=init)).get_trace(*args, **kwargs)
        out = {}
        for name, site in trace.items():
            if site["type"] != "sample" or site["is_observed"] or isinstance(site["fn"], dist.Unit):
                continue
            try:
                out[name] = (site["value"], *_unconstrained(site["fn"], site["value"]))
            except NotImplementedError:
                continue  # no bijection (a discrete site): model_structure names it
        return out

    for inputs in (rebuild(arrays), (args, kwargs)):
        try:
            with handlers.block():
                return run_once(lambda key, inputs=inputs: values(key, *inputs), rng_key)
        except Exception:  # noqa: BLE001, S112 - the eager trace reproduces genuine errors with the model's own message
            continue
    return None


def _initial_locations(structure: ModelStructure, trace: dict, compiled: dict | None = None) -> dict:
    """Unconstrained initial values of the latent sites of a trace taken with the init strategy
    (``compiled``: :func:`_compiled_initial_values` of the same trace, reused where it has the site).

    NumPyro's ``initialize_model`` would trace the model again (twice) to check the potential
    energy: a non-finite value or log-density here gets the same kind of error, naming the site.
    """
    locs = {}
    for name, site in structure.latent.items():
        node = trace[name]
        if compiled is not None and name in compiled:
            x, log_prob = compiled[name][1:]
        else:
            x, log_prob = _unconstrained(node["fn"], node["value"])
        bad = [what for what, v in (("value", x), ("log density", log_prob)) if not _all_finite(v)]
        if bad:
            raise ValueError(
                f"Latent site '{name}' has a non-finite initial {bad[0]} under init_loc_fn: "
                "Cannot find valid initial parameters. Pass another init_loc_fn, e.g. "
                "init_to_value(values={...}) or init_to_sample, or check the site's prior."
            )
        locs[name] = x
    return locs


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _all_finite(x) -> bool:
    try:
        return bool(np.all(np.isfinite(np.asarray(x))))
    except Exception:  # noqa: BLE001 - tracers (jax.eval_shape) have no values to check
        return True


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


def _warn_unconverged(site: str, converged, warned: set, below: float = 0.5) -> None:
    """Warn, once per guide and site (``warned`` holds the sites warned about), when fewer
    than ``below`` of ``site``'s elements had a converged Newton problem in an eager call of
    the guide (``svi.init``, a guide called outside ``jit``).

    Compiled steps do not check: in jax 0.10.2 a host callback anywhere in a program, even
    in a branch never taken, sends every call of it through JAX's Python dispatch path
    (0.8-3.6 ms more a step on small models on a 2-core CPU, when ``svi.run`` or ``fit``
    call the compiled step from Python: RESULTS section 24). After a fit,
    :meth:`AutoPAVI.check_bases` gives each site's share."""
    # `not <`: a NaN share (a site with no scored element) does not warn
    if isinstance(converged, jax.core.Tracer) or site in warned or not float(converged) < below:
        return
    warned.add(site)
    warnings.warn(
        f"Laplace base of site '{site}': at the start of training (an eager call of the guide, "
        f"as svi.init makes) the Newton iterations converged for fewer than {100 * below:.0f}% of "
        f"its elements (here {100 * float(converged):.0f}%, warned once). Those elements sit on "
        "their prior given their parents, with no likelihood information in their base: the "
        "likelihood may be non-smooth (e.g. Laplace) or multimodal in this site. Check with "
        "guide.check_bases(params, *args) after the fit and compare the ELBO with "
        "AutoPAVI(model, laplace=False).",
        LaplaceWarning,
        stacklevel=2,
    )


def _renamed_options(old: dict) -> dict:
    """Map the options' names before 0.3 to the current ones, with a warning."""
    unknown = set(old) - set(_RENAMED)
    if unknown:
        raise TypeError(f"AutoPAVI() got unexpected keyword argument(s) {sorted(unknown)}.")
    for name in old:
        warnings.warn(
            f"AutoPAVI({name}=...) is deprecated and will be removed in 0.4: use {_RENAMED[name]}=... "
            "(the names of NumPyro's flow guides).",
            FutureWarning,
            stacklevel=3,
        )
    return {_RENAMED[k]: v for k, v in old.items()}


class AutoPAVI(AutoGuide):
    """Plate-amortized variational inference (PAVI) as a NumPyro autoguide.

    Every latent site gets one conditional normalizing flow shared by all elements of its
    plates (plate amortization). The flow of element ``n`` is conditioned on

    * an *encoding* ``E^n in R^D`` for each plate the site sits in. With
      ``encoding="free"`` (PAVI-F) the encodings are learned parameters, one
      ``(plate_size, D)`` array per plate named ``{plate}_{prefix}_encoding``;
    * the sampled (unconstrained) values of every earlier latent site whose plates are a
      subset of the site's (its prior parents and the siblings the posterior couples it
      with), so ``q(theta) = prod_i q(theta_i | theta_<i, E)`` in the model's order, except
      that the globals written before the first local site are drawn scales first (a
      location given its scale holds their funnel; :func:`~numpyro_pavi.plan.scales_first`).
      Sites in plates the site is not in are left out (their per-element values do not align);
    * nothing else for sites outside every plate: their flows see only their parents.

    The flow (params ``{site}_{prefix}_flow``) is a standard normal on the site's flattened
    unconstrained element, ``num_flows`` conditional autoregressive (or coupling) layers
    when the element has more than one coordinate, a conditional affine layer that sets
    the element's location and scale, then ``biject_to(support)``. A flow's weights, and a
    set encoder's, are stored packed, one vector per param (``svi.get_params(state)``), so
    that a step's state has a few leaves per site, as ``AutoNormal``'s;
    ``guide.plan.unpack(params)`` gives them back as pytrees of layers, and every method
    taking ``params`` accepts either form.

    Subsampling works as with any NumPyro guide: write ``numpyro.plate(name, N,
    subsample_size=B)`` in the model; on each call the guide opens the model's plates with
    the model's current subsample sizes (read from a blocked trace of the model, so
    different sizes at ``init`` and ``update`` work), the model replays the guide's indices
    and NumPyro scales both by ``N / B``.

    :param callable model: a NumPyro model.
    :param str encoding: how plate elements get their encodings:

        * ``"free"`` (PAVI-F): one learned ``D``-vector per element;
        * ``"set"`` (PAVI-E): computed by a learned set encoder from the element's observed
          data (see :mod:`numpyro_pavi.data`); a plate with no data inside gets none where
          its sites have Laplace bases (each element's base informs it), and raises
          otherwise. No parameter per element anywhere: new elements and new data get
          their posterior without retraining (and :func:`~numpyro_pavi.local_calibration`
          can check it);
        * ``"hybrid"``: the set encoding plus a free per-element residual (zeros at init);
        * ``"auto"`` (default): with ``laplace=True``, on plates trained on all their
          elements at every step (none of a plate set subsampled in the setup call), a
          learned vector per element as well, where it has something to add: ``"hybrid"``
          where a plate's data is found, ``"free"`` where not (their flows also read each
          element's Laplace base); not where every site's likelihood is Gaussian in it (its
          base is exact; a setup traced under ``jit`` cannot tell, and gives them the
          vectors too) nor on stored bases (below), which get ``"set"``'s encodings. On
          subsampled plates ``"set"``'s encodings (``"free"`` where no data is found and
          there is no base). With ``laplace=False``: ``"set"`` where a plate's data is
          found, ``"free"`` where not. Per-element vectors exist for the training elements
          and data only: for posteriors of new elements or new data without retraining,
          train with ``"set"``.
    :param int encoding_dim: D, size of each plate element's encoding.
    :param int num_flows: autoregressive/coupling layers per flow (only used for sites
        whose element has more than one coordinate). Formerly ``flow_layers``.
    :param str flow_type: ``"autoregressive"`` or ``"coupling"``. Formerly ``flow_layer``.
    :param tuple hidden_dims: hidden widths of every conditioner network. Formerly ``hidden``.
    :param str prefix: prefix of all param names.
    :param callable init_loc_fn: per-site initialization (one of NumPyro's
        ``numpyro.infer.initialization`` strategies); a site's flow starts centred on the
        average of its elements' initial unconstrained values.
    :param float init_scale: initial scale of every flow in unconstrained space.
    :param callable create_plates: as in :class:`~numpyro.infer.autoguide.AutoGuide`.
    :param int chunk_size: plate elements per chunk when sampling over full plates in
        :meth:`sample_posterior`; bounds the memory of the flows' intermediates.
    :param SetEncoder encoder: architecture of the set encoders; default Deep Sets with mean
        pooling. Its ``out_dim`` is ``encoding_dim`` (another explicit value is an error).
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
        with no declaration, at the price of ``1 + d`` passes through the model per Newton
        iteration (they stop when every element has converged: one for a Gaussian
        likelihood, at most ``NEWTON_STEPS``) plus about ``3 + d`` for the differentiated
        base, per local site and step (posterior draws skip the latter). A site whose Newton problems mostly fail to converge
        at setup (a non-smooth likelihood) loses its base, with a
        :class:`~numpyro_pavi.LaplaceWarning`; see :meth:`check_bases`. Where a plate set has
        no data inside it (crossed effects of a long table), unless the likelihood is
        Gaussian in the site (found at setup, so a setup traced under ``jit`` gives every
        such site these inputs), the sites' flows read each element's base (its mode and
        ``log diag L``, stored bases too), beside a free encoding (``"auto"``, plates not
        subsampled) or as its only per-element input (``"set"``, subsampled plates, stored
        bases). Posteriors run on the model's arguments (the training ones when none are
        given); with ``encoding="set"``, new data gives new groups their posterior without
        retraining. On a CPU, elements of more than 2 coordinates call LAPACK in pieces
        (:func:`~numpyro_pavi.laplace.in_pieces`: jaxlib's batched kernels can deadlock a
        machine with few cores); ``Trace_ELBO(num_particles > 1)`` vectorizes its particles
        and batches every piece again: pass it ``vectorize_particles=False`` there.

        Long-format data whose *rows* are subsampled (``numpyro.plate("ratings", N,
        subsample_size=B)``, the local sites on full plates, crossed or nested (students in
        schools in regions), the global sites first; sites on the same plates, a user's
        intercept and slope, form one block) get *stored* bases instead
        (:mod:`numpyro_pavi.base_state`): the joint mode of all local sites given the
        globals, from all rows, its derivative in the globals and each element's precision
        (a nested site's base follows its ancestors' draws, an ancestor's is its marginal
        over its descendants), kept between steps as non-learned state (a ``numpyro.mutable`` site named
        ``laplace_{prefix}_state``, carried by ``SVI`` with ``Trace_ELBO`` or
        ``TraceMeanField_ELBO``) and refreshed every ``refresh_every`` steps; a step expands
        the stored mode to first order in its sampled globals and does not run the model
        for the bases. A step also gives its ELBO a control variate (a ``numpyro.factor``
        site of the guide named ``laplace_{prefix}_control_variate``, zero on average over
        the batches): the linear term of the batch log joint's expansion at the stored
        modes, less the same over all rows (kept in the state), which takes most of the
        rows' noise out of the gradients (about one more forward and backward pass of the
        model on the batch). Pass the state to the posterior methods with the params,
        ``{**svi.get_params(state), **state.mutable_state}``; without it they compute the
        bases from scratch at every draw. ``Trace_ELBO(num_particles > 1)`` drops mutable
        state (NumPyro warns): the bases are then computed from scratch at every step,
        correct and slower. ELBOs without mutable state (``RenyiELBO``,
        ``TraceGraph_ELBO``) refuse such a guide in ``SVI``: use ``laplace=False`` there.
        Where rows are subsampled but these conditions fail (a site whose plates contain
        those of two crossed factors' sites, an interaction; a global site after the local
        ones), a base computed at each step would read only the batch's rows: the local
        sites are then sampled without a base, with a :class:`~numpyro_pavi.LaplaceWarning`
        naming the condition.
    :param int refresh_every: steps between refreshes of the stored bases (default: once per
        pass over the subsampled rows, ``ceil(N / B)``).
    :param bool forward_mode_differentiation: as in NumPyro's guides: use forward-mode
        differentiation when the model is set up (initialization), for models that
        reverse mode cannot differentiate (e.g. ``jax.lax.while_loop``). Pass the same flag
        to ``SVI.run``/``Trace_ELBO`` for training.
    """

    plan: GuidePlan | None = None

    def __init__(
        self,
        model: Callable,
        *,
        encoding: str = "auto",
        encoding_dim: int = 8,
        num_flows: int = 1,
        flow_type: str = "autoregressive",
        hidden_dims: tuple[int, ...] = (32,),
        prefix: str = "auto",
        init_loc_fn: Callable = init_to_median(num_samples=15),  # noqa: B008 - as NumPyro's guides
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        chunk_size: int = 2**16,
        encoder: SetEncoder | None = None,
        ragged: dict[str, Ragged] | None = None,
        estimator: str = "stl",
        laplace: bool = True,
        refresh_every: int | None = None,
        forward_mode_differentiation: bool = False,
        **deprecated,
    ):
        renamed = _renamed_options(deprecated)
        num_flows = renamed.get("num_flows", num_flows)
        flow_type = renamed.get("flow_type", flow_type)
        hidden_dims = renamed.get("hidden_dims", hidden_dims)
        if encoding not in _ENCODINGS:
            raise ValueError(f"Unknown encoding {encoding!r}; use one of {_ENCODINGS}.")
        if estimator not in _ESTIMATORS:
            raise ValueError(f"Unknown estimator {estimator!r}; use one of {_ESTIMATORS}.")
        if flow_type not in _FLOW_TYPES:
            raise ValueError(f"Unknown flow_type {flow_type!r}; use one of {_FLOW_TYPES}.")
        if not (_is_int(encoding_dim) and encoding_dim >= 1):
            raise ValueError(f"encoding_dim must be a positive int, got {encoding_dim!r}.")
        if not (_is_int(num_flows) and num_flows >= 0):
            raise ValueError(f"num_flows must be a non-negative int, got {num_flows!r}.")
        if not (isinstance(hidden_dims, (tuple, list)) and all(_is_int(h) and h >= 1 for h in hidden_dims)):
            raise ValueError(f"hidden_dims must be a tuple of positive ints (e.g. (32,)), got {hidden_dims!r}.")
        if not (isinstance(init_scale, numbers.Real) and math.isfinite(init_scale) and init_scale > 0):
            raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}.")
        if refresh_every is not None and not (_is_int(refresh_every) and refresh_every >= 1):
            raise ValueError(f"refresh_every must be a positive int or None, got {refresh_every!r}.")
        if not (_is_int(chunk_size) and chunk_size >= 1):
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        refresh_every = None if refresh_every is None else int(refresh_every)
        chunk_size = int(chunk_size)
        ragged = dict(ragged or {})
        for plate, decl in ragged.items():
            if not isinstance(decl, Ragged):
                raise TypeError(
                    f"ragged[{plate!r}] must be numpyro_pavi.Ragged(index=..., covariates=...), got {decl!r}."
                )
        if encoder is not None and not isinstance(encoder, SetEncoder):
            raise TypeError(f"encoder must be a numpyro_pavi.SetEncoder, got {encoder!r}.")
        encoding_dim, num_flows = int(encoding_dim), int(num_flows)  # NumPy ints accepted, kept plain
        encoder = with_encoder_width(encoder if encoder is not None else SetEncoder(), encoding_dim)
        self.options = GuideOptions(
            encoding=encoding,
            encoding_dim=encoding_dim,
            num_flows=num_flows,
            flow_type=flow_type,
            hidden_dims=tuple(int(h) for h in hidden_dims),
            init_scale=float(init_scale),
            encoder=encoder,
            ragged=ragged,
            laplace=bool(laplace),
            prefix=prefix,
            refresh_every=refresh_every,
        )
        self.estimator = estimator
        self.chunk_size = chunk_size
        self._warned: set[str] = set()  # sites already warned about (LaplaceWarning)
        fwd = {}
        if forward_mode_differentiation or _BASE_TAKES_FORWARD_MODE:
            if not _BASE_TAKES_FORWARD_MODE:
                raise ValueError(
                    "forward_mode_differentiation=True needs NumPyro >= 0.21, whose guides set up "
                    f"models in forward mode (installed: {numpyro.__version__})."
                )
            fwd = {"forward_mode_differentiation": forward_mode_differentiation}
        super().__init__(model, prefix=prefix, init_loc_fn=init_loc_fn, create_plates=create_plates, **fwd)

    # the options, read-only, under their names (the guide's plan depends on them)
    encoding = property(lambda self: self.options.encoding)
    encoding_dim = property(lambda self: self.options.encoding_dim)
    num_flows = property(lambda self: self.options.num_flows)
    flow_type = property(lambda self: self.options.flow_type)
    hidden_dims = property(lambda self: self.options.hidden_dims)
    encoder = property(lambda self: self.options.encoder)
    ragged = property(lambda self: self.options.ragged)
    laplace = property(lambda self: self.options.laplace)

    @property
    def structure(self) -> ModelStructure | None:
        """The model's plates and sites (None until the guide is set up)."""
        return None if self.plan is None else self.plan.structure

    # -- setup ---------------------------------------------------------------------------
    def _setup_prototype(self, *args, **kwargs):
        try:
            self._setup(*args, **kwargs)
        except BaseException:
            # all or nothing: a failed setup (bad data, or tracers under jax.eval_shape) must
            # not leave a half-set-up guide that later calls would take as ready
            self.prototype_trace, self.plan = None, None
            raise

    def _setup(self, *args, **kwargs):
        # One eager trace of the model gives everything: the structure, the checks, the data
        # statistics, the initial values (the init strategy's, computed in one compiled
        # trace and substituted into it) and the plate indices of the guide's first call
        # (see ``__call__``).
        rng_key = numpyro.prng_key()
        compiled = _compiled_initial_values(self.model, rng_key, self.init_loc_fn, args, kwargs)
        known = {name: v[0] for name, v in (compiled or {}).items()}
        with handlers.block():
            trace = handlers.trace(seeded_model(self.model, rng_key, known, init=self.init_loc_fn)).get_trace(*args, **kwargs)
        structure = model_structure(trace)
        _data.check_observed_finite(trace)
        if not structure.latent:
            raise ValueError("The model has no latent sample sites: there is nothing to infer.")
        init_locs = _initial_locations(structure, trace, compiled)
        self.plan = build_plan(self.model, structure, self.options, trace, init_locs, rng_key, args, kwargs)
        self.prototype_trace = trace
        # posteriors asked for without arguments are the training ones (as NumPyro's guides
        # give); kept by reference, never pickled (see __getstate__), and not under tracing
        concrete = not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((args, kwargs)))
        self._train_args = (args, kwargs) if concrete else None
        self._fingerprints = None  # of the training data behind free encodings: taken when needed

    def _params(self) -> dict:
        self._check_param_clash()
        # flows and encoders live packed, one vector each (GuidePlan.unpack): a step's state
        # then has a few leaves per site, as AutoNormal's, not one per weight matrix
        packed = {name: numpyro.param(name, value) for name, value in self.plan.packed_init_values().items()}
        return self.plan.unpack(packed)

    def _check_param_clash(self) -> None:
        """Two guides writing one param name would silently share it (or fail on shapes).

        Site-level names cannot clash between guides of one ``AutoGuideList`` (each site has
        one guide), but plate-level ones (encodings, encoders) can: two AutoPAVIs over sites of
        the same plates with the same ``prefix``. An enclosing trace that already holds one
        of our names at this call is another guide's.
        """
        for handler in numpyro.primitives._PYRO_STACK:
            if isinstance(handler, handlers.trace):
                clash = [n for n in self.plan.init_values if handler.trace.get(n, {}).get("type") == "param"]
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
        encoders and Laplace bases. Its latent draws are dead code under ``jit``. User plates
        from ``create_plates`` take precedence and are substituted into the trace.
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
            trace = handlers.trace(seeded_model(self.model, key, fixed)).get_trace(*args, **kwargs)
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

    def _full_shape(self, site, frames, trace_site) -> tuple:
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

    # -- training ------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpyro warns when there is no key: we raise instead
            unseeded = numpyro.prng_key() is None
        if unseeded:
            raise RuntimeError("AutoPAVI must run under a seed handler (SVI and Predictive provide one).")
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
            # the setup trace holds this call's plate indices and data: no second pass
            trace, user = (self.prototype_trace, {}) if self.create_plates is None else self._probe(args, kwargs)
        else:
            trace, user = self._probe(args, kwargs)
        plates = self._open_plates(trace, user)
        params = self._params()
        indices = {name: p._indices for name, p in plates.items()}
        sizes = {name: info.size for name, info in self.structure.plates.items()}
        bound = _data.bind_arguments(self.model, args, kwargs) if self.ragged else {}
        stored = None
        if self.plan.stored is not None:
            # non-learned state kept by SVI between steps (numpyro.mutable): the stored bases
            stored = numpyro.primitives.mutable(self._state_name, {"state": init_state(self.structure, self.plan.stored)})
        # rows seen through a batch: the stored modes give the step's ELBO a control variate
        subsampled = any(indices[p].shape[0] < sizes[p] for p in subsampled_rows(self.structure))

        def sample(params, key, state):
            values, unc, logqs, reports, *new_state = sample_latents(
                self.plan,
                params,
                key,
                indices,
                trace,
                sizes,
                bound,
                model_args=(args, kwargs),
                path_gradient=self.estimator == "stl",
                with_reports=True,
                laplace_state=state,
                with_state=stored is not None,
            )
            densities = {name: site.spread_density(logqs[name]) for name, site in self.structure.latent.items()}
            shares = {
                name: _data.scored_mean(self.structure.latent[name], report.converged(), trace.get(name))
                for name, report in reports.items()
            }
            if stored is not None and subsampled:
                spec = self.plan.stored
                theta = global_vector(self.structure, spec, unc)
                blocks = {b[0]: jnp.concatenate([unc[n] for n in b], -1) for b in spec.blocks}
                cv = control_variate(
                    self.plan.model, self.structure, spec, new_state[0], theta, blocks, indices, (args, kwargs)
                )
                new_state = [new_state[0], cv]
            return values, densities, shares, new_state

        key = numpyro.prng_key()
        state = None if stored is None else stored["state"]
        if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((params, key))):
            # run eagerly (svi.init, a guide called outside jit): one compiled program
            # instead of hundreds of op-by-op dispatches, each compiled on first use (13 of
            # the 19 s that svi.init took on epil)
            values, densities, shares, new_state = run_once(sample, params, key, state)
            # what NumPyro's validation of the Delta sites below would have caught, by name
            bad = [name for name in self.structure.latent if not _all_finite(densities[name])]
            if bad:
                raise ValueError(
                    f"AutoPAVI's log density of site '{bad[0]}' is not finite at this draw: check the "
                    "params passed (a diverged fit) and the site's prior and data for NaN or inf."
                )
        else:
            values, densities, shares, new_state = sample(params, key, state)
        if stored is not None:
            stored["state"] = new_state[0]
            if len(new_state) > 1:
                # zero-mean over the batches (base_state.control_variate): the ELBO stays unbiased
                numpyro.factor(f"laplace_{self.prefix}_control_variate", new_state[1])
        for name in self.structure.latent:  # in the plan's order (a program's dict comes back sorted)
            if name in shares:
                _warn_unconverged(name, shares[name], self.__dict__.setdefault("_warned", set()))
        result = {}
        for name, site in self.structure.latent.items():
            with ExitStack() as stack:
                for p in site.plates:
                    stack.enter_context(plates[p])
                # our own values and densities (checked above when concrete): validating them
                # eagerly, under svi.init, would compile every check op on first use
                fn = dist.Delta(
                    values[name], log_density=densities[name], event_dim=len(site.event_shape), validate_args=False
                )
                result[name] = numpyro.sample(name, fn)
        return result

    # -- posterior over full plates: inputs and checks ------------------------------------
    def _full_indices(self, sizes: dict | None = None) -> dict:
        sizes = sizes or {name: info.size for name, info in self.structure.plates.items()}
        return full_indices(sizes)

    def check_call(self, rng_key, params, sample_shape=()) -> tuple:
        """Argument checks shared by the posterior methods (``TypeError`` for a swapped or
        wrong key or params, ``ValueError`` for a bad ``sample_shape``); returns
        ``sample_shape`` as a tuple."""
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

    def check_params(self, params: dict) -> None:
        """Raise a ``ValueError`` (``RuntimeError`` before setup) unless ``params`` are this
        guide's: every parameter present, with the shapes of its options and model."""
        if self.plan is None:
            raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
        if not isinstance(params, Mapping):
            raise ValueError(
                f"params must be a dict of this guide's params (svi.get_params(state)), got {type(params).__name__}."
            )
        init_values = self.plan.init_values
        missing = [k for k in init_values if k not in params]
        if missing:
            raise ValueError(
                f"params lack {missing[:3]}{'...' if len(missing) > 3 else ''}: pass the params "
                "of an SVI run with this guide (svi.get_params(state))."
            )
        for name, init in init_values.items():
            value = params[name]
            if is_packed(init) and hasattr(value, "shape"):  # stored packed (GuidePlan.unpack)
                want, got = (packed_size(init),), tuple(jnp.shape(value))
            else:
                want, got = jax.tree.map(jnp.shape, init), jax.tree.map(jnp.shape, value)
            if want != got:
                raise ValueError(
                    f"params['{name}'] does not match this guide (shapes {got} vs {want}): were they "
                    "trained with other options (encoding_dim, hidden_dims, num_flows), another model, or an "
                    "earlier numpyro-pavi version (the CHANGELOG lists the changes of the guide's family)?"
                )

    _check_params = check_params
    _check_call = check_call

    def trace_model(self, data: dict, *args, full_plates: bool = True, **kwargs) -> dict:
        """A trace of the model, blocked (no outer handler sees it), over its full plates
        (``full_plates``) with ``data`` (site or plate name -> value) substituted."""
        return self._trace_full(data, args, kwargs, full_plates=full_plates)

    def __getstate__(self):
        if self.plan is not None:
            self._training_fingerprints()  # the check of new data outlives the training data
        state = super().__getstate__()
        state.pop("_train_args", None)  # the training data: not part of the guide
        return state

    def _posterior_args(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The model arguments a posterior method runs on: the given ones, or, when none are
        given and the guide reads data (set encoders, Laplace bases), the training ones."""
        if args or kwargs or self.plan is None:
            return args, kwargs
        train = getattr(self, "_train_args", None)
        return train if (self.plan.reads_data() and train is not None) else (args, kwargs)

    def plate_inputs(self, *args, **kwargs) -> PlateInputs:
        """The :class:`~numpyro_pavi.sampling.PlateInputs` of a posterior call with these model
        arguments (none: the training ones where the guide reads data): every plate at its
        full size, a trace of the model over them, the bound arguments.

        With the set encoder, ``args`` may hold new data (more or other groups): the plate
        sizes are read from it. Free encodings only exist for the training elements
        (``ValueError`` for new ones), and their training data may not change.
        """
        args, kwargs = self._posterior_args(args, kwargs)
        return PlateInputs(*self._full_inputs(args, kwargs), (args, kwargs))

    def _full_inputs(self, args, kwargs):
        """``(sizes, indices, trace, bound)`` of :meth:`plate_inputs`."""
        if self.plan is None:
            raise RuntimeError("The guide is not set up yet: run SVI (or call the guide) once first.")
        sizes = {name: info.size for name, info in self.structure.plates.items()}
        needs_data = any(self.plan.sources.values()) or (self.plan.reads_data() and _takes_arguments(self.model))
        if not (args or kwargs):
            if needs_data:
                raise ValueError(
                    "This guide encodes plate elements from their data: pass the model's arguments "
                    "(e.g. guide.sample_posterior(key, params, *args, **kwargs))."
                )
            return sizes, self._full_indices(sizes), None, {}
        # one trace: every plate at its full size, whatever the arguments make it
        trace = self._trace_full({}, args, kwargs)
        now = plate_sizes(trace)
        sizes.update({name: now[name] for name in sizes if name in now})
        changed = {n for n, sz in sizes.items() if sz != self.structure.plates[n].size}
        for key in self.plan.sources:
            if self.plan.has_free(key) and changed & set(key):
                p = min(changed & set(key))
                raise ValueError(
                    f"Plate '{p}' has {sizes[p]} elements here but {self.structure.plates[p].size} in "
                    f"training, and its elements have free (per-element, learned) encodings: there "
                    f"is none for new elements. Use encoding='set' with data inside plate '{p}' (or "
                    "a Ragged declaration, or Laplace bases on all its sites) to get posteriors of new "
                    "elements without retraining."
                )
        self._check_shapes(trace)
        _data.check_observed_finite(trace)  # new data: the same clear error as in training
        self._check_same_data(trace)
        bound = _data.bind_arguments(self.model, args, kwargs) if self.ragged else {}
        return sizes, self._full_indices(sizes), trace, bound

    def _free_observed(self) -> list[str]:
        """Observed sites behind free encodings: those inside a plate whose elements have
        them; every observed site where a plate set with free vectors has no data inside it
        (crossed effects of a long table, a Ragged declaration), whose elements' data are
        rows of other plates."""
        plan = self.plan
        free = plan.free_plates()
        if any(plan.has_free(k) and not any(kind == "nested" for kind, _ in src) for k, src in plan.sources.items()):
            return list(self.structure.observed)
        return [name for name, obs in self.structure.observed.items() if free & set(obs.plates)]

    def _training_fingerprints(self) -> dict:
        """Checksums of the full-plate training data behind free encodings (see
        ``_check_same_data``), taken the first time they are needed (or the guide is pickled)
        from the training arguments, so that setting up costs no extra pass through the model.
        """
        if getattr(self, "_fingerprints", None) is None:
            names = self._free_observed()
            if self.plan.stored is not None:  # stored bases read every observed site
                names = list(self.structure.observed)
            train = getattr(self, "_train_args", None)
            if names and train is None:
                return {}  # set up under tracing: no values to take a checksum of
            trace = self._trace_full({}, *train) if names else {}
            self._fingerprints = {name: _fingerprint(trace[name]["value"]) for name in names if name in trace}
        return self._fingerprints

    def _changed_observed(self, trace, names) -> str | None:
        """The first of the observed sites ``names`` whose values in ``trace`` differ from the
        training data's (checksums; None when none does, or none can be compared)."""
        for name in names:
            site = trace.get(name)
            if site is None or site["type"] != "sample" or not site["is_observed"]:
                continue
            known, now = self._training_fingerprints().get(name), _fingerprint(site["value"])
            if known is not None and now is not None and known != now:
                return name
        return None

    def _check_same_data(self, trace) -> None:
        """Free encodings were learned from the training data: with other observed values for
        their elements, they would silently give the training posterior."""
        free = self.plan.free_plates()
        name = self._changed_observed(trace, self._free_observed())
        if name is not None:
            plates = sorted(free & set(self.structure.observed[name].plates)) or sorted(free)
            raise ValueError(
                f"Observed site '{name}' holds other values than in training, but the elements of "
                f"plate(s) {plates} have free (learned, per-element) encodings: they describe the "
                "training data, and the posterior returned would be the training one. Retrain "
                "on the new data, or use encoding='set' (set encoders read each element's data; "
                "plates with no data inside need none on Laplace bases)."
            )

    def _trace_full(self, data: dict, args, kwargs, full_plates: bool = True) -> dict:
        """A blocked trace of the model over its full plates, with ``data`` substituted."""
        with handlers.block(), warnings.catch_warnings():
            # full indices in a subsampled plate are intended here, not a model/guide mismatch
            warnings.filterwarnings("ignore", message="subsample_size does not match")
            return handlers.trace(seeded_model(self.model, 0, data, full_plates=full_plates)).get_trace(*args, **kwargs)

    def _deterministic(self, values: dict, indices: dict, args, kwargs) -> dict:
        """The model's deterministic sites given full-plate latent values.

        Without the model's arguments the model runs on its defaults, as NumPyro's guides do
        (``Predictive`` on the latents): observed sites are then drawn, and the plates keep
        the sizes the model gives them.
        """
        data = {**indices, **values} if (args or kwargs) else values
        trace = self._trace_full(data, args, kwargs, full_plates=bool(args or kwargs))
        return {k: s["value"] for k, s in trace.items() if s["type"] == "deterministic"}

    def _sampler(self, params, args, kwargs, num_draws: int, **options) -> tuple[Callable, int]:
        """:meth:`full_plate_sampler` and how many of ``num_draws`` draws it runs at once
        (:meth:`draw_batch`)."""
        one, sizes, state = self._full_plate_sampler(params, args, kwargs, **options)
        with_values = not options.get("with_log_prob", False) and options.get("deterministic", True)
        return one, self.draw_batch(sizes, num_draws, with_state=state is not None, sampler=one, deterministic=with_values)

    def draw_batch(
        self,
        sizes: dict,
        num_draws: int,
        with_state: bool = True,
        sampler: Callable | None = None,
        deterministic: bool = True,
    ) -> int:
        """How many posterior draws :meth:`sample_posterior` vectorizes at once over plates of
        ``sizes``: as many as keep ``chunk_size`` values in all (latent values and, where a
        draw passes through the model, the observed ones; a divisor of ``num_draws``, so one
        program serves every batch).

        1 (one draw at a time, a ``lax.map``) where a draw iterates: a site whose per-draw
        Laplace base is not quadratic (Newton iterations would run to the slowest draw of a
        batch, both branches of their conditionals for all of them: the crossed Bernoulli's
        draws took 1.1-1.7x as long), or stored bases not given (``with_state`` False: each
        draw solves for them). Also 1 where a draw would batch LAPACK calls, which can
        deadlock jaxlib's CPU thread pool (:func:`~numpyro_pavi.laplace.in_pieces`): a base
        wider than 2, or sharing its plates with another site (its Schur complement), or a
        draw that passes through the model (Gaussian bases, deterministic sites) where the
        model's own operations hold one (read from ``sampler``'s jaxpr, a draw
        ``key -> values``, traced once more for it; without it such draws are not
        vectorized). ``deterministic``: the draws also compute the model's deterministic
        sites (a pass through the model). A draw costs a few
        small kernels per site: one at a time, their launches were most of a draw's time
        (RESULTS section 22).
        """
        latent = self.structure.latent
        if self.plan.stored is not None and not with_state:
            return 1
        stored = self.plan.stored.sites if self.plan.stored is not None else ()
        through_model = deterministic and any(s["type"] == "deterministic" for s in self.prototype_trace.values())
        for name, site in latent.items():
            if name in stored:
                if sum(latent[n].dim for n in self.plan.stored.block_of(name)) > 2:
                    return 1
            elif self.plan.on_laplace(site):
                shared = any(s.plates == site.plates for s in latent.values() if s is not site)
                if name not in self.plan.quadratic or site.dim > 2 or shared:
                    return 1
                through_model = True
        plates = self.structure.plates
        size = lambda p: sizes.get(p, plates[p].size if p in plates else 1)  # noqa: E731
        per_draw = sum(math.prod(size(p) for p in site.plates) * site.dim for site in latent.values())
        if through_model:  # the observed values over the full plates (the setup trace holds a batch)
            for s in self.prototype_trace.values():
                if s["type"] == "sample" and s["is_observed"]:
                    frames = [f.name for f in s["cond_indep_stack"] if f.name in plates]
                    scale = math.prod(size(f) / plates[f].subsample_size for f in frames)
                    per_draw += int(np.size(s["value"]) * scale)
        most = max(1, min(num_draws, self.chunk_size // max(per_draw, 1)))
        k = max(k for k in range(1, most + 1) if num_draws % k == 0)
        if k > 1 and through_model and (sampler is None or uses_linalg(jax.make_jaxpr(sampler)(jax.random.PRNGKey(0)))):
            return 1
        return k

    def full_plate_sampler(
        self, params, *args, with_log_prob=False, deterministic=True, center_starts=True, **kwargs
    ) -> Callable:
        """``key -> draw``: one posterior draw over the full plates, the sampler shared by
        :meth:`sample_posterior`, :meth:`sample_with_log_prob`, :meth:`posterior_moments` and
        (through them) the diagnostics and the ArviZ export. A draw is ``{site: value}``
        (latent and, with ``deterministic``, deterministic sites), or ``(values, log_q)``.
        With ``center_starts`` the Newton iterations of ``plan.warm_start``'s bases start at
        the guide's center draw, computed here once for all the sampler's draws
        (:func:`~numpyro_pavi.sampling.draw_starts`): worth it from two draws on."""
        return self._full_plate_sampler(
            params, args, kwargs, with_log_prob=with_log_prob, deterministic=deterministic, center_starts=center_starts
        )[0]

    def _full_plate_sampler(self, params, args, kwargs, with_log_prob=False, deterministic=True, center_starts=True):
        """:meth:`full_plate_sampler`, the plate sizes it draws over and the stored bases it
        uses (None: none, or computed at each draw)."""
        self._check_params(params)
        sizes, indices, trace, bound, (args, kwargs) = self.plate_inputs(*args, **kwargs)
        deterministic = deterministic and any(s["type"] == "deterministic" for s in self.prototype_trace.values())

        state = self.stored_state(params, sizes, trace)
        # the Newton iterations of plan.warm_start's bases start at the guide's center draw:
        # computed once here, not once per draw
        starts = {}
        if center_starts and self.plan.warm_start:
            starts = run_once(
                lambda p: draw_starts(
                    self.plan, p, indices, trace, sizes, bound, model_args=(args, kwargs),
                    chunk_size=self.chunk_size, laplace_state=state,
                ),
                params,
            )  # fmt: skip
        # the encodings depend on the params and data, not on the draw: computed once here,
        # outside the draws' loop, not left to the compiler to hoist (one program when eager)
        enc = run_once(lambda p: encodings(self.plan, p, indices, trace, sizes, bound), params)

        def one(key):
            values, _, logqs = sample_latents(
                self.plan,
                params,
                key,
                indices,
                trace,
                sizes,
                bound,
                model_args=(args, kwargs),
                chunk_size=self.chunk_size,
                laplace_state=state,
                differentiate=False,
                starts=starts,
                enc=enc,
            )
            if with_log_prob:
                return values, logqs
            if deterministic:
                values.update(self._deterministic(values, indices, args, kwargs))
            return values

        return one, sizes, state

    @property
    def _state_name(self) -> str:
        return self.plan.param_name("laplace", "state")

    def stored_state(self, params, sizes: dict, trace: dict | None = None):
        """The stored bases passed in ``params`` (``{**svi.get_params(state),
        **state.mutable_state}``) when they fit these plate sizes, else None (posteriors then
        compute them from scratch at each draw's globals).

        :param trace: the posterior call's trace of the model over its full plates: bases
            stored from the training data, passed with observed values other than those,
            raise ``ValueError`` (they would silently give the training posterior).
        """
        if self.plan.stored is None or self._state_name not in params:
            return None
        state = params[self._state_name]["state"]
        for block in self.plan.stored.blocks:
            site = self.structure.latent[block[0]]
            width = sum(self.structure.latent[n].dim for n in block)
            if state.mode[block[0]].shape != tuple(sizes[p] for p in site.plates) + (width,):
                return None
        spec = self.plan.stored
        if spec.parents:
            if state.pjac is None:  # stored before nested blocks had bases
                return None
            for child in dict(spec.parents):  # nesting of another shape (a chain of other length)
                width = sum(self.structure.latent[n].dim for outer in spec.ancestors_of(child) for n in outer)
                if child not in state.pjac or state.pjac[child].shape[-1] != width:
                    return None
        name = self._changed_observed(trace or {}, self.structure.observed)
        if name is not None:
            raise ValueError(
                f"Observed site '{name}' holds other values than in training, but the params carry "
                f"stored Laplace bases ('{self._state_name}'), the modes of the training data: the "
                "posterior would be the training one. Pass the params without the state "
                "(svi.get_params(state) alone): the bases are then computed from these data at each "
                "draw's globals."
            )
        return state

    # -- Laplace bases: convergence ------------------------------------------------------
    def check_bases(
        self,
        params,
        *args,
        num_samples: int = 10,
        rng_key=None,
        min_converged: float = 0.95,
        max_multimodal: float = 0.0,
        **kwargs,
    ) -> dict:
        """How the Laplace bases' Newton problems end over the full plates, at
        ``num_samples`` posterior draws of the sites before each one; warns
        (:class:`LaplaceWarning`) naming every site where fewer than ``min_converged`` of
        the element-draws converged, or more than ``max_multimodal`` have a higher mode
        next to their base's (:func:`~numpyro_pavi.laplace.higher_modes`).

        An element that does not converge (a likelihood that is not smooth, such as
        Laplace, whose curvature says nothing; several modes under a flat prior) is placed
        on its prior location given its parents with the curvature there, so its gradient
        stays exact, but its base then carries no likelihood information and the flow must
        learn the rest: where many do, ``AutoPAVI(model, laplace=False)`` may fit better.

        An element with several modes (a mixture likelihood, heavy tails under a random
        slope) gets a Gaussian base on one of them, which jumps to another as the parents
        move: the reparameterization gradient does not see the jump. On the likelihood
        matrix (``benchmarks/likelihoods.py``, RESULTS section 11) the share is 0 in every
        cell but the normal mixtures (1.0% with an intercept; 0.3% and 2.5% of the
        intercepts and slopes with a slope).

        :return: ``{site: {"converged": fraction, "concave": fraction, "max_decrement":
            float, "multimodal": fraction}}`` (the decrement is the remaining Newton step in
            posterior sds; "multimodal" is NaN for stored bases, which are not probed; the
            sites of a stored block share its figures, one Newton problem).
        """
        self._check_params(params)
        if not any(self.plan.on_laplace(s) for s in self.structure.latent.values()):
            return {}
        sizes, indices, trace, bound, (args, kwargs) = self.plate_inputs(*args, **kwargs)
        key = jax.random.PRNGKey(0) if rng_key is None else rng_key

        def one(k):
            reports = sample_latents(
                self.plan, params, k, indices, trace, sizes, bound, model_args=(args, kwargs),
                chunk_size=self.chunk_size, with_reports=True, differentiate=False, probe_modes=True,
            )[3]  # fmt: skip
            latent = self.structure.latent
            scored = lambda n, v, if_none=1.0: _data.scored_mean(  # noqa: E731
                latent[n], v, None if trace is None else trace.get(n), if_none
            )
            return {
                n: (
                    scored(n, r.converged()),
                    scored(n, r.concave),
                    r.decrement,
                    jnp.nan if r.higher_mode is None else scored(n, r.higher_mode, 0.0),
                )
                for n, r in reports.items()
            }

        out = jax.lax.map(one, jax.random.split(key, num_samples))
        result = {
            name: {
                "converged": float(jnp.mean(conv)),
                "concave": float(jnp.mean(concave)),
                "max_decrement": float(jnp.max(dec)),
                "multimodal": float(jnp.mean(multi)),
            }
            for name, (conv, concave, dec, multi) in out.items()
        }
        for name, r in result.items():
            if r["converged"] < min_converged:
                warnings.warn(
                    f"Laplace base of site '{name}': the Newton iterations converged for only "
                    f"{100 * r['converged']:.1f}% of its elements at posterior draws (largest remaining "
                    f"step {r['max_decrement']:.3g} sds; {100 * r['concave']:.1f}% at a concave point). "
                    "Those elements sit on their prior given their parents, with no likelihood "
                    "information in their base: the likelihood may be non-smooth (e.g. Laplace) or "
                    "multimodal in this site. Compare the ELBO with AutoPAVI(model, laplace=False).",
                    LaplaceWarning,
                    stacklevel=2,
                )
            if r["multimodal"] > max_multimodal:
                warnings.warn(
                    f"Laplace base of site '{name}': at posterior draws {100 * r['multimodal']:.1f}% of "
                    "its elements have a higher mode next to the one their base sits on: the log "
                    "joint is multimodal in this site (a mixture likelihood, heavy tails with a "
                    "random slope). A Gaussian base then jumps between modes as the parents move, "
                    "which the gradient does not see, and the fit can drift. Compare the ELBO with "
                    "AutoPAVI(model, laplace=False).",
                    LaplaceWarning,
                    stacklevel=2,
                )
        return result

    # -- posterior API (NumPyro's signatures) ----------------------------------------------
    def sample_posterior(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Draw latent samples over the **full** plates (plus the model's deterministic sites).

        Samples are drawn one at a time (``lax.map``), or several at once where a draw
        iterates no Newton steps and is small (:meth:`draw_batch`: ``chunk_size`` values per
        batch), and, within a sample, each site's flow runs along its plate elements in
        chunks of ``chunk_size``, so the flows' memory is one chunk of intermediates. Per-step Laplace bases are computed on the full
        plates (the model's gradient and ``d`` curvature columns over all its data), their
        Newton iterations started, where the setup probe found the site concave around its
        mode (``plan.warm_start``), at the mode of the guide's center draw, computed once
        per call (:func:`~numpyro_pavi.sampling.draw_starts`); for plates past memory,
        :func:`~numpyro_pavi.summaries.posterior_summary` streams over
        chunks of a plate's elements instead. With set encodings, ``args`` may be
        new data with other or more groups: their posterior comes without retraining.

        :param rng_key: PRNG key.
        :param params: ``svi.get_params(state)``.
        :param args, kwargs: model arguments (needed for set encodings and deterministic sites).
        :param sample_shape: leading shape of the samples.
        :return: ``{site: array of shape sample_shape + full site shape}``.
        """
        sample_shape = self._check_call(rng_key, params, sample_shape)
        sampler, batch = self._sampler(params, args, kwargs, math.prod(sample_shape), center_starts=math.prod(sample_shape) > 1)
        return self._draws(sampler, rng_key, sample_shape, batch=batch)

    def sample_with_log_prob(self, rng_key, params, *args, sample_shape=(), **kwargs):
        """Full-plate samples with their log density under the guide.

        :return: ``(values, log_q)`` where ``values`` maps sites to constrained samples of
            shape ``sample_shape + full site shape`` and ``log_q`` maps sites to per-element
            log densities of shape ``sample_shape + plate sizes`` (outermost plate first).
        """
        sample_shape = self._check_call(rng_key, params, sample_shape)
        many = math.prod(sample_shape) > 1
        one, batch = self._sampler(params, args, kwargs, math.prod(sample_shape), with_log_prob=True, center_starts=many)
        return self._draws(one, rng_key, sample_shape or (1,), squeeze=not sample_shape, batch=batch)

    @staticmethod
    def _draws(one: Callable, rng_key, sample_shape: tuple, squeeze: bool = False, batch: int = 1):
        keys = jax.random.split(rng_key, max(math.prod(sample_shape), 1))
        if not sample_shape:
            return one(keys[0])
        if math.prod(sample_shape) == 0:
            return _empty(jax.eval_shape(one, keys[0]), sample_shape)
        out = jax.lax.map(one, keys, batch_size=batch if batch > 1 else None)
        if squeeze:
            return jax.tree.map(lambda v: v[0], out)
        return jax.tree.map(lambda v: jnp.reshape(v, sample_shape + v.shape[1:]), out)

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
        """Posterior mean and sd of every site over the full plates, streamed over draws: see
        :func:`numpyro_pavi.summaries.posterior_moments`. The draws are those of
        ``sample_posterior(rng_key, params, *args, sample_shape=(num_samples,))``.

        :return: ``{site: {"mean": array, "sd": array}}`` with each site's full shape (``sd``
            with ``ddof=1``, as ArviZ's summaries), for latent and deterministic sites.
        """
        from .summaries import posterior_moments

        self._check_call(rng_key, params)
        return posterior_moments(
            self, rng_key, params, *args, num_samples=num_samples, batch_size=batch_size,
            progress_bar=progress_bar, **kwargs,
        )  # fmt: skip

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
        out = self.quantiles(params, [0.5], *args, num_samples=num_samples, rng_key=rng_key, **kwargs)
        return {k: v[0] for k, v in out.items()}

    def quantiles(self, params, quantiles, *args, num_samples: int = 1000, rng_key=None, **kwargs):
        """Monte Carlo estimate of posterior quantiles (coordinate-wise, full plates).

        :param quantiles: quantile levels in ``[0, 1]``: a list (or 1-d array), or one level.
        :return: ``{site: array (len(quantiles), *site_shape)}``, as NumPyro's guides: the
            leading axis is kept whatever the number of levels (``[0.5]`` and ``0.5``
            included); only :meth:`median` drops it.
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
        qs = jnp.atleast_1d(jnp.asarray(quantiles))
        return {k: jnp.quantile(v, qs, axis=0) for k, v in samples.items()}

    # -- introspection -------------------------------------------------------------------
    def num_params(self) -> int:
        """Number of scalar parameters of the guide."""
        return 0 if self.plan is None else self.plan.num_params()

    def describe(self) -> str:
        """A table of sites: plates, encoding, flow, context and parameter counts."""
        if self.plan is None:
            return "AutoPAVI (not set up yet: run SVI or call the guide once)"
        return self.plan.describe()
