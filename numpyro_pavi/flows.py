"""Conditional normalizing flows on one plate element's unconstrained value.

Each layer is a frozen dataclass (hashable, picklable) holding only sizes; its weights live
in an explicit parameter pytree created by ``init`` and passed to ``forward``. ``forward``
maps base noise towards the sample, ``z (..., d)`` with context ``c (..., C)`` to
``x (..., d)``, and returns ``log|det dx/dz|`` of shape ``(...)``. Leading dims are free, so
one set of weights serves every element of a plate: that sharing *is* plate amortization.

Sampling and scoring happen in one forward pass (inverse autoregressive direction).
``inverse`` and ``log_prob`` score a *given* value: the path-derivative ELBO estimator needs
them (the density at the sampled value with the weights held constant), and they let tests
check every log-determinant against ``slogdet(jacfwd(forward))``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ConditionalAffine",
    "ConditionalAutoregressive",
    "ConditionalCoupling",
    "ConditionalFlow",
    "SMALL_PRODUCT",
    "init_resnet",
    "linear",
    "resnet",
]

_LOG_2PI = math.log(2 * math.pi)


def _softplus_inv(y: float) -> float:
    return float(y + math.log(-math.expm1(-y)))


def _glorot(key, n_in: int, n_out: int) -> jax.Array:
    return jax.random.normal(key, (n_in, n_out)) * math.sqrt(2.0 / (n_in + n_out))


def init_resnet(key, n_in: int, n_out: int, hidden: tuple[int, ...], out_bias=None, skip=None) -> dict:
    """An MLP with a linear skip connection, output weights zero at init.

    The skip makes the output linear in the context from the start (the exact conditional
    for Gaussian hierarchies) while the hidden path adds non-linearity; zero output
    weights make the initial output equal ``out_bias + c @ skip``.

    :param skip: initial skip matrix ``(n_in, n_out)``; zeros when None.
    """
    keys = jax.random.split(key, len(hidden) + 1)
    layers, width = [], n_in
    for k, h in zip(keys, hidden):
        layers.append({"w": _glorot(k, width, h), "b": jnp.zeros(h)})
        width = h
    bias = jnp.zeros(n_out) if out_bias is None else jnp.asarray(out_bias, dtype=jnp.float32)
    return {
        "hidden": layers,
        "out": {"w": jnp.zeros((width, n_out)), "b": bias},
        "skip": jnp.zeros((n_in, n_out)) if skip is None else jnp.asarray(skip, dtype=jnp.float32),
    }


#: Largest product ``rows x n_in x n_out`` that :func:`linear` computes as a broadcast
#: multiply and a sum: below it a matrix product is a separate CPU kernel (a library call
#: costing microseconds) for a few hundred multiply-adds, where the elementwise form fuses
#: with the bias, the activation and its neighbours. A global site's conditioner (one row)
#: is all such products.
SMALL_PRODUCT = 4096


def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x (..., n_in) @ w (n_in, n_out) -> (..., n_out)``, elementwise where it is small
    (:data:`SMALL_PRODUCT`)."""
    if math.prod(x.shape) * w.shape[-1] > SMALL_PRODUCT:
        return x @ w
    return jnp.sum(x[..., :, None] * w, axis=-2)


def resnet(params: dict, c: jax.Array) -> jax.Array:
    """``c (..., n_in) -> (..., n_out)``.

    The hidden path's output is divided by the width of the last hidden layer (the
    maximal-update scaling for Adam): Adam moves every weight by about the learning rate per
    step whatever its gradient, so an unscaled sum over H hidden units can move the output by
    ~H times the rate in one step. On a sharp posterior (a global of a large data set, sd
    0.05) that is many posterior sds per step, and the fit leaves the optimum. With the
    ``1/H`` factor one step moves the output by about the rate, as for a mean-field location.
    """
    h = c
    for layer in params["hidden"]:
        h = jnp.tanh(linear(h, layer["w"]) + layer["b"])
    out = params["out"]["b"] + linear(c, params["skip"])
    if params["hidden"]:
        out = out + linear(h, params["out"]["w"]) / h.shape[-1]
    return out


def _positive(raw: jax.Array, at_zero: float) -> jax.Array:
    # softplus keeps scales positive without exp's blow-ups; the offset sets the scale at raw=0
    return jax.nn.softplus(raw + _softplus_inv(at_zero)) + 1e-6


#: Bound on the log-scale of the inner (autoregressive and coupling) layers: they act on
#: standardized noise, where a factor beyond e^3 is never needed and an unbounded one is how
#: a single bad step turns into a loss explosion.
INNER_LOG_SCALE_BOUND = 3.0


def _bounded_log_scale(raw: jax.Array) -> jax.Array:
    # a smooth clamp to (-B, B) with slope 1 at 0, so identity init and its gradients are kept
    return INNER_LOG_SCALE_BOUND * jnp.tanh(raw / INNER_LOG_SCALE_BOUND)


@dataclass(frozen=True)
class ConditionalAffine:
    """``x = shift(c) + scale(c) * z`` with diagonal scale.

    :param dim: d, size of the element.
    :param context_dim: C, size of the context.
    :param hidden: hidden widths of the conditioner.
    :param bilinear: when > 0, the context splits into its first ``bilinear`` coordinates
        (the element's encoding) and the rest (its parents); a bilinear term
        ``enc^T T_k parents`` is added to every output. It gives each element its own
        coupling to its parents (e.g. a per-group regression of slope on intercept in the
        posterior), which a shared linear skip cannot express. Zero at init.
    """

    dim: int
    context_dim: int
    hidden: tuple[int, ...] = (32,)
    bilinear: int = 0

    def init(self, key, loc=None, skip=None) -> dict:
        """Initial shift ``loc + c @ skip[:, :d]`` and raw scale ``c @ skip[:, d:]`` (the scale
        at raw 0 is set in ``forward``)."""
        loc = jnp.zeros(self.dim) if loc is None else jnp.reshape(jnp.asarray(loc), (self.dim,))
        bias = jnp.concatenate([loc, jnp.zeros(self.dim)])
        # with no context the hidden path is a constant the bias already is: its weights would
        # never get a gradient (a global's flow had 96 such parameters of 98)
        hidden = self.hidden if self.context_dim else ()
        params = {"net": init_resnet(key, self.context_dim, 2 * self.dim, hidden, bias, skip)}
        if 0 < self.bilinear < self.context_dim:
            params["bilinear"] = jnp.zeros((self.bilinear, self.context_dim - self.bilinear, 2 * self.dim))
        return params

    def _shift_scale(self, params: dict, c: jax.Array, init_scale: float):
        out = resnet(params["net"], c)
        if "bilinear" in params:
            k = self.bilinear
            enc, parents, t = c[..., :k], c[..., k:], params["bilinear"]
            if math.prod(c.shape[:-1]) * t.size > SMALL_PRODUCT:
                out = out + jnp.einsum("...i,...j,ijk->...k", enc, parents, t)
            else:  # elementwise, as in `linear`: it fuses where a product would be a library call
                out = out + jnp.sum(enc[..., :, None, None] * parents[..., None, :, None] * t, axis=(-3, -2))
        shift, raw = out[..., : self.dim], out[..., self.dim :]
        # init_scale is static (not trained): it is the scale when the conditioner outputs 0
        return shift, _positive(raw, init_scale)

    def forward(self, params: dict, z: jax.Array, c: jax.Array, init_scale: float = 1.0):
        """``z (..., d), c (..., C) -> x (..., d), log|det dx/dz| (...)``."""
        shift, scale = self._shift_scale(params, c, init_scale)
        return shift + scale * z, jnp.sum(jnp.log(scale), -1)

    def inverse(self, params: dict, x: jax.Array, c: jax.Array, init_scale: float = 1.0):
        """``x (..., d), c (..., C) -> z (..., d), log|det dx/dz| (...)`` (forward's log-det)."""
        shift, scale = self._shift_scale(params, c, init_scale)
        return (x - shift) / scale, jnp.sum(jnp.log(scale), -1)


def _made_masks(dim: int, hidden: tuple[int, ...]):
    """MADE masks for degrees 1..d: output i only sees inputs of degree < i. Static (NumPy):
    the weights store only the entries a mask lets through (see :func:`_masked`)."""
    degrees_in = np.arange(1, dim + 1)
    masks, prev = [], degrees_in
    for h in hidden:
        deg = np.arange(h) % max(dim - 1, 1) + 1
        masks.append(deg[None, :] >= prev[:, None])
        prev = deg
    out = degrees_in[None, :] > prev[:, None]
    return masks, np.concatenate([out, out], 1)  # shift and log-scale columns


def _masked(flat: jax.Array, mask: np.ndarray) -> jax.Array:
    """The weight matrix of ``mask``'s shape from its stored entries ``flat`` (row-major over
    the entries the mask lets through; zeros elsewhere). Stored whole, the masked-out entries
    were parameters that never get a gradient (half of a 2-d site's MADE weights)."""
    return jnp.zeros(mask.shape, flat.dtype).at[np.nonzero(mask)].set(flat)


@dataclass(frozen=True)
class ConditionalAutoregressive:
    """Inverse autoregressive affine layer with a MADE conditioner that also sees ``c``.

    ``x_i = shift_i(z_<i, c) + scale_i(z_<i, c) * z_i`` (order reversed when ``reverse``),
    a triangular Jacobian, so the log-det is the sum of log scales. The context enters the
    first hidden layer, so the first coordinate in the order (which no hidden unit sees) and,
    with ``hidden=()``, every coordinate get a shift and scale that do not depend on ``c``:
    the final affine layer of :class:`ConditionalFlow` conditions them. Identity at init; the
    log-scales are smoothly bounded to ``(-3, 3)`` (:data:`INNER_LOG_SCALE_BOUND`).
    Sampling is one pass; :meth:`inverse` takes ``d`` passes (cheap for plate elements).
    """

    dim: int
    context_dim: int
    hidden: tuple[int, ...] = (32,)
    reverse: bool = False

    def init(self, key, **_) -> dict:
        """Weights ``w`` hold only the entries their MADE mask lets through (flat)."""
        masks, out_mask = _made_masks(self.dim, self.hidden)
        keys = jax.random.split(key, len(self.hidden) + 1)
        layers, width = [], self.dim
        for i, (k, h, m) in enumerate(zip(keys, self.hidden, masks)):
            kz, kc = jax.random.split(k)
            layer = {"w": _glorot(kz, width, h)[np.nonzero(m)], "b": jnp.zeros(h)}
            if i == 0:
                layer["wc"] = _glorot(kc, self.context_dim, h)
            layers.append(layer)
            width = h
        return {"hidden": layers, "out": {"w": jnp.zeros(int(out_mask.sum())), "b": jnp.zeros(2 * self.dim)}}

    def _shift_log_scale(self, params: dict, z: jax.Array, c: jax.Array):
        """Conditioner outputs for (non-reversed) input ``z``: output i sees ``z_<i`` only."""
        masks, out_mask = _made_masks(self.dim, self.hidden)
        h = z
        for i, (layer, m) in enumerate(zip(params["hidden"], masks)):
            pre = linear(h, _masked(layer["w"], m)) + layer["b"]
            if i == 0:
                pre = pre + linear(c, layer["wc"])
            h = jnp.tanh(pre)
        h = h / h.shape[-1]  # maximal-update output scaling, see resnet
        out = linear(h, _masked(params["out"]["w"], out_mask)) + params["out"]["b"]
        return out[..., : self.dim], _bounded_log_scale(out[..., self.dim :])

    def forward(self, params: dict, z: jax.Array, c: jax.Array):
        """``z (..., d), c (..., C) -> x (..., d), log|det dx/dz| (...)``."""
        if self.reverse:
            x, logdet = dataclasses.replace(self, reverse=False).forward(params, z[..., ::-1], c)
            return x[..., ::-1], logdet
        shift, log_scale = self._shift_log_scale(params, z, c)
        return shift + jnp.exp(log_scale) * z, jnp.sum(log_scale, -1)

    def inverse(self, params: dict, x: jax.Array, c: jax.Array):
        """``x (..., d), c (..., C) -> z (..., d), log|det dx/dz| (...)``: ``d`` fixed-point
        passes, each fixing one more coordinate (exact after ``d``)."""
        if self.reverse:
            z, logdet = dataclasses.replace(self, reverse=False).inverse(params, x[..., ::-1], c)
            return z[..., ::-1], logdet

        def body(_, z):
            shift, log_scale = self._shift_log_scale(params, z, c)
            return (x - shift) * jnp.exp(-log_scale)

        z = jax.lax.fori_loop(0, self.dim, body, jnp.zeros_like(x))
        _, log_scale = self._shift_log_scale(params, z, c)
        return z, jnp.sum(log_scale, -1)


@dataclass(frozen=True)
class ConditionalCoupling:
    """Affine coupling: half of the coordinates (alternating by ``parity``) pass through and,
    with ``c``, set the shift and scale of the other half. Identity at init; log-scales
    smoothly bounded like :class:`ConditionalAutoregressive`'s. Inverts in one pass."""

    dim: int
    context_dim: int
    hidden: tuple[int, ...] = (32,)
    parity: int = 0

    def _mask(self) -> jax.Array:
        return ((jnp.arange(self.dim) + self.parity) % 2).astype(jnp.float32)

    def init(self, key, **_) -> dict:
        return {"net": init_resnet(key, self.dim + self.context_dim, 2 * self.dim, self.hidden)}

    def _shift_log_scale(self, params: dict, kept: jax.Array, c: jax.Array):
        keep = self._mask()
        c = jnp.broadcast_to(c, jnp.shape(kept)[:-1] + jnp.shape(c)[-1:])  # a context shared by all rows
        out = resnet(params["net"], jnp.concatenate([kept, c], -1))
        shift, raw = out[..., : self.dim], out[..., self.dim :]
        return (1 - keep) * shift, (1 - keep) * _bounded_log_scale(raw)

    def forward(self, params: dict, z: jax.Array, c: jax.Array):
        """``z (..., d), c (..., C) -> x (..., d), log|det dx/dz| (...)``."""
        shift, log_scale = self._shift_log_scale(params, z * self._mask(), c)
        return shift + jnp.exp(log_scale) * z, jnp.sum(log_scale, -1)

    def inverse(self, params: dict, x: jax.Array, c: jax.Array):
        """``x (..., d), c (..., C) -> z (..., d), log|det dx/dz| (...)``."""
        shift, log_scale = self._shift_log_scale(params, x * self._mask(), c)
        return (x - shift) * jnp.exp(-log_scale), jnp.sum(log_scale, -1)


_LAYER_KINDS = {"autoregressive": ConditionalAutoregressive, "coupling": ConditionalCoupling}


@dataclass(frozen=True)
class ConditionalFlow:
    """Standard normal base, ``num_layers`` autoregressive or coupling layers (only when
    ``dim > 1``: in one dimension they would add nothing), then a conditional affine layer.

    The inner layers act on standardized noise and start as the identity: they add
    correlations and non-Gaussian shape. The affine layer comes last and alone sets each
    element's location and scale, so no inner layer ever rescales a value far from zero
    (which would turn a small weight change into a shift of many posterior sds).

    :param dim: d, size of the element.
    :param context_dim: C, size of the context.
    :param num_layers: number of autoregressive/coupling layers.
    :param layer: ``"autoregressive"`` or ``"coupling"``.
    :param hidden: hidden widths of every conditioner.
    :param init_scale: scale of every coordinate at initialization (in unconstrained space).
    :param bilinear: see :class:`ConditionalAffine`.
    """

    dim: int
    context_dim: int
    num_layers: int = 1
    layer: str = "autoregressive"
    hidden: tuple[int, ...] = (32,)
    init_scale: float = 0.1
    bilinear: int = 0

    def __post_init__(self):
        if self.layer not in _LAYER_KINDS:
            raise ValueError(f"Unknown flow layer {self.layer!r}; use one of {sorted(_LAYER_KINDS)}.")

    @property
    def layers(self) -> tuple:
        """The layers in the order they are applied to the noise; the affine layer is last."""
        inner = ()
        if self.dim > 1:
            # alternate the order (or the kept half) so every coordinate gets transformed:
            # with one coupling layer (num_flows=1) the kept half is left to the affine layer
            make = {
                "autoregressive": lambda i: ConditionalAutoregressive(self.dim, self.context_dim, self.hidden, i % 2 == 1),
                "coupling": lambda i: ConditionalCoupling(self.dim, self.context_dim, self.hidden, i % 2),
            }[self.layer]
            inner = tuple(make(i) for i in range(self.num_layers))
        return inner + (ConditionalAffine(self.dim, self.context_dim, self.hidden, self.bilinear),)

    def init(self, key, loc=None, skip=None) -> list:
        """Parameters whose initial distribution is ``N(loc, init_scale^2 I)`` for a zero
        context; ``skip (C, 2d)`` sets how the context moves the final affine layer at init."""
        keys = jax.random.split(key, len(self.layers))
        params = [layer.init(k) for layer, k in zip(self.layers[:-1], keys)]
        return params + [self.layers[-1].init(keys[-1], loc=loc, skip=skip)]

    def forward(self, params: list, z: jax.Array, c: jax.Array):
        """``z (..., d), c (..., C) -> x (..., d), log|det dx/dz| (...)``."""
        x, logdet = z, jnp.zeros(jnp.shape(z)[:-1])
        for layer, p in zip(self.layers[:-1], params[:-1]):
            x, ld = layer.forward(p, x, c)
            logdet = logdet + ld
        x, ld = self.layers[-1].forward(params[-1], x, c, self.init_scale)
        return x, logdet + ld

    def inverse(self, params: list, x: jax.Array, c: jax.Array):
        """``x (..., d), c (..., C) -> z (..., d), log|det dx/dz| (...)`` (forward's log-det)."""
        z, logdet = self.layers[-1].inverse(params[-1], x, c, self.init_scale)
        for layer, p in zip(self.layers[-2::-1], params[-2::-1]):
            z, ld = layer.inverse(p, z, c)
            logdet = logdet + ld
        return z, logdet

    def _log_base(self, noise: jax.Array) -> jax.Array:
        return -0.5 * jnp.sum(noise**2, -1) - 0.5 * self.dim * _LOG_2PI

    def sample_and_log_prob(self, params: list, noise: jax.Array, c: jax.Array):
        """Push standard normal ``noise (..., d)`` through the flow.

        :return: ``x (..., d)`` and ``log q(x | c)`` of shape ``(...)``.
        """
        x, logdet = self.forward(params, noise, c)
        return x, self._log_base(noise) - logdet

    def log_prob(self, params: list, x: jax.Array, c: jax.Array) -> jax.Array:
        """``log q(x | c)`` of shape ``(...)`` for ``x (..., d)``, by inverting the flow."""
        z, logdet = self.inverse(params, x, c)
        return self._log_base(z) - logdet
