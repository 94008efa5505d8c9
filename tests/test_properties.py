"""Property tests for AutoPAVI on programmatically generated models.

A hypothesis strategy draws a *model spec* (plates, sites, optional subsampling); ``build_model``
turns it into a NumPyro model. For every drawn model the guide must build, sample every latent
site over the **full** plates in the right shape and inside the site's support, give a finite
log density and finite Trace_ELBO losses. Drawn models may hold improper (``ImproperUniform``)
and ordered latents, a ``numpyro.factor`` term and masked observations (``obs_mask``, whose
imputed cells are one more latent site). Fixed examples cover the features too costly to draw
every time (LKJCholesky, explicit ``dim=-3`` plates, intrinsic batch dims, guide lists).

JAX compilation dominates the cost, so plate sizes come from a tiny set (compiled primitives
are reused across examples) and the networks are small.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from numpyro import handlers
from numpyro.distributions import constraints, transforms
from numpyro.infer import SVI, Trace_ELBO, init_to_feasible
from numpyro.infer.autoguide import AutoGuideList, AutoNormal
from numpyro.infer.util import log_density

from numpyro_pavi import AutoPAVI

# slow tier: property tests over generated models: each example compiles a fit
pytestmark = pytest.mark.slow

GUIDE_KW = {"encoding_dim": 2, "hidden_dims": (4,)}
MAX_SITES = 4
FEW = settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# kind -> (event shape, expected support)
KINDS = {
    "normal": ((), constraints.real),
    "halfnormal": ((), constraints.positive),
    "lognormal": ((), constraints.positive),
    "beta": ((), constraints.unit_interval),
    "dirichlet": ((3,), constraints.simplex),
    "normal_vec": ((2,), constraints.real_vector),
    "mvn": ((2,), constraints.real_vector),
    "improper": ((), constraints.real),
    "ordered": ((3,), constraints.ordered_vector),
}


# ---------------------------------------------------------------------------------------------
# model specs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PlateSpec:
    name: str
    size: int
    dim: int
    subsample_size: int | None = None


@dataclass(frozen=True)
class SiteSpec:
    name: str
    kind: str


@dataclass(frozen=True)
class ModelSpec:
    """``chain`` are nested plates (outermost first, innermost at dim=-1); ``crossed`` is an
    optional plate at a dim left of the chain, nested in none of them (its sites sit in it
    alone; the observation sits in every plate). ``sites[level]`` for level ``"global"``,
    ``0 .. len(chain) - 1`` (inside ``chain[: level + 1]``) and ``"crossed"``."""

    chain: tuple[PlateSpec, ...]
    crossed: PlateSpec | None
    sites: tuple[tuple[object, tuple[SiteSpec, ...]], ...]
    factor: bool = False  # a numpyro.factor term on the latents
    masked: bool = False  # obs_mask on the observation (NumPyro then imputes "y_unobserved")

    @property
    def plates(self) -> tuple[PlateSpec, ...]:
        return self.chain + ((self.crossed,) if self.crossed else ())

    @property
    def nbatch(self) -> int:
        return len(self.plates)

    def level_plates(self, level) -> tuple[PlateSpec, ...]:
        if level == "global":
            return ()
        if level == "crossed":
            return (self.crossed,)
        return self.chain[: level + 1]

    def full_shape(self, level, kind: str) -> tuple[int, ...]:
        """Site shape over full plates (NumPyro's broadcasting convention)."""
        plates = self.level_plates(level)
        n = max((-p.dim for p in plates), default=0)
        batch = [1] * n
        for p in plates:
            batch[n + p.dim] = p.size
        return tuple(batch) + KINDS[kind][0]

    def obs_shape(self) -> tuple[int, ...]:
        shape = [1] * self.nbatch
        for p in self.plates:
            shape[self.nbatch + p.dim] = p.size
        return tuple(shape)

    def latent(self):
        for level, sites in self.sites:
            for s in sites:
                yield level, s


def _site_dist(kind: str, loc):
    if kind == "normal":
        return dist.Normal(loc, 1.0)
    if kind == "halfnormal":
        return dist.HalfNormal(1.0)
    if kind == "lognormal":
        return dist.LogNormal(0.0, 0.5)
    if kind == "beta":
        return dist.Beta(2.0, 2.0)
    if kind == "dirichlet":
        return dist.Dirichlet(jnp.ones(3))
    if kind == "normal_vec":
        return dist.Normal(0.0, 1.0).expand([2]).to_event(1)
    if kind == "mvn":
        return dist.MultivariateNormal(jnp.zeros(2), jnp.array([[1.0, 0.3], [0.3, 1.0]]))
    if kind == "improper":
        return dist.ImproperUniform(constraints.real, (), ())
    if kind == "ordered":
        return dist.TransformedDistribution(dist.Normal(0.0, 1.0).expand([3]).to_event(1), transforms.OrderedTransform())
    raise AssertionError(kind)


def _reduce(kind: str, value):
    """A site's value reduced to its batch shape (feeds the observation's mean)."""
    if kind == "dirichlet":
        return value[..., 0]
    if KINDS[kind][0]:
        return jnp.sum(value, -1)
    return value


def build_model(spec: ModelSpec):
    """A NumPyro model ``model(y)`` for ``spec``; ``y`` has the full observation shape and is
    sliced with the subsampled plate's indices inside the model."""

    def model(y):
        plates, idx = {}, {}
        for p in spec.plates:
            plates[p.name] = numpyro.plate(p.name, p.size, subsample_size=p.subsample_size, dim=p.dim)
            idx[p.name] = plates[p.name]._indices
        first_normal = {}
        total = 0.0
        for level, sites in spec.sites:
            if level == "global":
                parent = 0.0
            elif level == "crossed" or level == 0:
                parent = first_normal.get("global", 0.0)
            else:
                parent = first_normal.get(level - 1, 0.0)
            with ExitStack() as stack:
                for p in spec.level_plates(level):
                    stack.enter_context(plates[p.name])
                for s in sites:
                    value = numpyro.sample(s.name, _site_dist(s.kind, parent))
                    if s.kind == "normal":
                        first_normal.setdefault(level, value)
                    total = total + _reduce(s.kind, value)
        if spec.factor:
            numpyro.factor("penalty", -0.1 * jnp.sum(jnp.square(total)))
        for p in spec.plates:
            if p.subsample_size is not None:
                y = jnp.take(y, idx[p.name], axis=spec.nbatch + p.dim)
        with ExitStack() as stack:
            for p in spec.plates:
                stack.enter_context(plates[p.name])
            mask = (y > -1.0) if spec.masked else None
            numpyro.sample("y", dist.Normal(total, 1.0), obs=y, obs_mask=mask)

    return model


@st.composite
def model_specs(draw):
    depth = draw(st.integers(0, 3))
    crossed = draw(st.booleans()) if depth < 3 else False
    n = depth + int(crossed)
    sizes = [draw(st.sampled_from([2, 3])) for _ in range(n)]
    chain = tuple(PlateSpec(f"p{i}", sizes[i], dim=-(depth - i)) for i in range(depth))
    cross = PlateSpec("c", sizes[-1], dim=-n) if crossed else None
    plates = list(chain) + ([cross] if cross else [])
    if plates and draw(st.booleans()):
        i = draw(st.integers(0, len(plates) - 1))
        p = plates[i]
        sub = PlateSpec(p.name, p.size, p.dim, draw(st.integers(1, p.size - 1)))
        if cross is not None and i == len(plates) - 1:
            cross = sub
        else:
            chain = chain[:i] + (sub,) + chain[i + 1 :]
    levels = ["global"] + list(range(depth)) + (["crossed"] if crossed else [])
    kinds = st.sampled_from(sorted(KINDS))
    # 1-3 sites per plate level, at most MAX_SITES in all (compilation cost grows per site)
    budget = MAX_SITES - (len(levels) - 1)
    sites = []
    for level in levels:
        lo = 0 if level == "global" and n > 0 else 1
        k = min(draw(st.integers(lo, 3 if level != "global" else 2)), budget + (level != "global"))
        budget -= max(k - (level != "global"), 0)
        tag = {"global": "g", "crossed": "c"}.get(level, f"l{level}")
        sites.append((level, tuple(SiteSpec(f"{tag}_{j}", draw(kinds)) for j in range(k))))
    return ModelSpec(chain, cross, tuple(sites), factor=draw(st.booleans()), masked=draw(st.booleans()))


def _data(spec: ModelSpec) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).normal(size=spec.obs_shape()), dtype=jnp.float32)


def _fit(model, args, steps=5, **guide_kw):
    guide = AutoPAVI(model, **{**GUIDE_KW, **guide_kw})
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), *args)
    update = jax.jit(svi.update)
    losses = []
    for _ in range(steps):
        state, loss = update(state, *args)
        losses.append(float(loss))
    return guide, svi.get_params(state), losses


def _improper_at_zero(site):
    """A value for improper sites, which cannot be sampled from (None: sample as usual)."""
    if site["type"] != "sample":
        return None
    fn = site["fn"]
    while not isinstance(fn, dist.ImproperUniform) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return jnp.zeros(site["fn"].shape()) if isinstance(fn, dist.ImproperUniform) else None


def _check_guide(model, args, guide, params, losses, expected_shapes):
    """The four properties every model must satisfy."""
    assert np.all(np.isfinite(losses)), losses
    samples = guide.sample_posterior(jax.random.PRNGKey(1), params, *args, sample_shape=(3,))
    trace = handlers.trace(handlers.seed(handlers.substitute(model, substitute_fn=_improper_at_zero), 0)).get_trace(*args)
    for name, shape in expected_shapes.items():
        assert name in samples, (name, sorted(samples))
        value = samples[name]
        assert value.shape == (3, *shape), (name, value.shape, shape)
        assert bool(jnp.all(jnp.isfinite(value))), name
        assert bool(jnp.all(trace[name]["fn"].support(value))), (name, value)
    lp, _ = log_density(handlers.seed(guide, 2), args, {}, params)
    assert np.isfinite(float(lp))


# nested chain p0 > p1 with p0 subsampled, plus a crossed plate c at dim -3 (always run)
CROSSED_SPEC = ModelSpec(
    (PlateSpec("p0", 3, -2, subsample_size=2), PlateSpec("p1", 2, -1)),
    PlateSpec("c", 2, -3),
    (
        ("global", (SiteSpec("g_0", "normal"),)),
        (0, (SiteSpec("l0_0", "normal"), SiteSpec("l0_1", "dirichlet"))),
        (1, (SiteSpec("l1_0", "mvn"),)),
        ("crossed", (SiteSpec("c_0", "beta"),)),
    ),
)


# a subsampled plate with an ordered latent under an improper global, a factor term and masked
# observations (always run)
FEATURES_SPEC = ModelSpec(
    (PlateSpec("p0", 3, -1, subsample_size=2),),
    None,
    (("global", (SiteSpec("g_0", "improper"),)), (0, (SiteSpec("l0_0", "ordered"), SiteSpec("l0_1", "normal")))),
    factor=True,
    masked=True,
)


# ordered sites in three nested plates over masked data: the innermost site's Newton problem
# holds the imputed observation, unscored at the observed cells (its flat directions once
# sent 24 of 27 elements to their prior location; losses overflowed by the third step)
MASKED_SIBLING_SPEC = ModelSpec(
    (PlateSpec("p0", 3, -3), PlateSpec("p1", 3, -2), PlateSpec("p2", 3, -1)),
    None,
    (
        ("global", (SiteSpec("g_0", "beta"),)),
        (0, (SiteSpec("l0_0", "ordered"),)),
        (1, (SiteSpec("l1_0", "ordered"),)),
        (2, (SiteSpec("l2_0", "ordered"),)),
    ),
    masked=True,
)


# ---------------------------------------------------------------------------------------------
# random models
# ---------------------------------------------------------------------------------------------
@FEW
@example(spec=CROSSED_SPEC, encoding="auto")
@example(spec=FEATURES_SPEC, encoding="auto")
@example(spec=MASKED_SIBLING_SPEC, encoding="free")
@given(spec=model_specs(), encoding=st.sampled_from(["auto", "free"]))
def test_random_plate_structures(spec, encoding):
    model = build_model(spec)
    y = _data(spec)
    # init_to_feasible: numpyro's initialize_model under init_to_median is the costliest step
    # of setup; the dim=-3 and intrinsic-dim examples below keep the default init.
    guide, params, losses = _fit(model, (y,), encoding=encoding, init_loc_fn=init_to_feasible)
    # the guide read the structure the spec describes
    assert set(guide.structure.plates) == {p.name for p in spec.plates}
    for p in spec.plates:
        info = guide.structure.plates[p.name]
        assert (info.size, info.dim) == (p.size, p.dim)
        assert info.subsample_size == (p.subsample_size or p.size)
    expected = {s.name: spec.full_shape(level, s.kind) for level, s in spec.latent()}
    if spec.masked:
        expected["y_unobserved"] = spec.obs_shape()  # NumPyro imputes the masked cells
    assert set(guide.structure.latent) == set(expected)
    _check_guide(model, (y,), guide, params, losses, expected)


def test_spec_builder_is_consistent():
    """Guards the generator itself: a hand-written spec traces to the shapes it claims."""
    spec = CROSSED_SPEC
    y = _data(spec)
    assert y.shape == (2, 3, 2)
    tr = handlers.trace(handlers.seed(build_model(spec), 0)).get_trace(y)
    assert tr["l0_1"]["value"].shape == (2, 1, 3)  # subsampled p0, size-1 p1, event 3
    assert tr["l1_0"]["value"].shape == (2, 2, 2)
    assert tr["c_0"]["value"].shape == (2, 1, 1)
    assert tr["y"]["value"].shape == (2, 2, 2)
    assert spec.full_shape(0, "dirichlet") == (3, 1, 3)
    assert spec.full_shape("crossed", "beta") == (2, 1, 1)


# ---------------------------------------------------------------------------------------------
# fixed examples for the tricky features
# ---------------------------------------------------------------------------------------------
def lkj_model(y):
    L = numpyro.sample("L", dist.LKJCholesky(3, 2.0))
    with numpyro.plate("g", 4):
        z = numpyro.sample("z", dist.MultivariateNormal(jnp.zeros(3), scale_tril=L))
        numpyro.sample("y", dist.Normal(z, 1.0).to_event(1), obs=y)


def test_lkj_cholesky_and_multivariate_normal():
    y = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), dtype=jnp.float32)
    guide, params, losses = _fit(lkj_model, (y,), init_loc_fn=init_to_feasible)
    expected = {"L": (3, 3), "z": (4, 3)}
    _check_guide(lkj_model, (y,), guide, params, losses, expected)
    assert guide.structure.latent["L"].unconstrained_event_shape == (3,)


def dim3_model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", 4, dim=-3):
        theta = numpyro.sample("theta", dist.LogNormal(mu, 0.5))
        numpyro.sample("y", dist.Normal(theta, 1.0), obs=y)


def test_plate_at_dim_minus_3_leaves_inner_dims_unused():
    y = jnp.arange(4.0).reshape(4, 1, 1)
    guide, params, losses = _fit(dim3_model, (y,))
    assert guide.structure.plates["g"].dim == -3
    _check_guide(dim3_model, (y,), guide, params, losses, {"mu": (), "theta": (4, 1, 1)})
    # each element has its own posterior: the samples are not one value broadcast over g
    s = guide.sample_posterior(jax.random.PRNGKey(3), params, y, sample_shape=(2,))
    assert not np.allclose(s["theta"][:, 0], s["theta"][:, 1])


def intrinsic_model(y):
    with numpyro.plate("g", 5, dim=-2):
        # batch shape (5, 3): dim -1 is an intrinsic (non-plate) batch dim
        theta = numpyro.sample("theta", dist.Normal(jnp.zeros(3), 1.0))
        numpyro.sample("y", dist.Normal(theta, 0.5), obs=y)


@pytest.mark.filterwarnings("ignore:Missing a plate statement")
def test_intrinsic_batch_dim_inside_plate():
    y = jnp.asarray(np.random.default_rng(2).normal(size=(5, 3)), dtype=jnp.float32)
    guide, params, losses = _fit(intrinsic_model, (y,))
    site = guide.structure.latent["theta"]
    assert site.intrinsic_shape == (3,) and site.dim == 3
    _check_guide(intrinsic_model, (y,), guide, params, losses, {"theta": (5, 3)})


def test_guide_list_over_a_generated_model():
    """AutoPAVI on the plate sites and AutoNormal on the globals, in one AutoGuideList.

    The global is proper here: AutoGuideList's own setup samples the model from its prior;
    members must not expose deterministic sites (obs_mask adds one named "y")."""
    spec = dataclasses.replace(FEATURES_SPEC, sites=(("global", (SiteSpec("g_0", "normal"),)),) + FEATURES_SPEC.sites[1:])
    model = build_model(spec)
    y = _data(spec)
    guide = AutoGuideList(model)
    guide.append(AutoPAVI(handlers.block(model, hide=["g_0", "y"]), init_loc_fn=init_to_feasible, **GUIDE_KW))
    guide.append(AutoNormal(handlers.block(model, expose=["g_0"]), init_loc_fn=init_to_feasible))
    svi = SVI(model, guide, optax.adam(1e-2), Trace_ELBO())
    state = svi.init(jax.random.PRNGKey(0), y)
    losses = [float(svi.update(state, y)[1]) for _ in range(2)]
    expected = {s.name: spec.full_shape(level, s.kind) for level, s in spec.latent()}
    expected["y_unobserved"] = spec.obs_shape()
    _check_guide(model, (y,), guide, svi.get_params(state), losses, expected)
