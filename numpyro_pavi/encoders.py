"""Permutation-invariant set encoders for PAVI-E.

A plate element (e.g. one subject of a hierarchical model) owns a *set* of observations;
PAVI-E conditions the element's variational posterior on an encoding of that set. The
encoders here map a set of vectors ``(n, in_dim)`` to one vector ``(out_dim,)`` and are
invariant to the order of the set's elements.

Two families are provided through :class:`SetEncoder`:

* ``"deep_sets"`` -- ``rho(pool_i phi(x_i))`` (Zaheer et al., 2017).
* ``"set_transformer"`` -- linear embedding, ``num_blocks`` ISAB blocks, PMA with one seed,
  linear read-out (Lee et al., 2019).

Both add (by default) a linear read-out of the set's pooled first and second moments, the
sufficient statistics of Gaussian likelihoods (see ``SetEncoder.moments``).

Sets come in two storage formats:

* *padded*: ``x`` of shape ``(*batch, n, in_dim)`` plus a boolean ``mask`` of shape
  ``(*batch, n)``; masked entries have no influence whatsoever (their values are replaced by
  zeros before anything touches them, so even ``inf``/``nan`` padding is harmless);
* *ragged*: all elements stored flat, ``x`` of shape ``(n, in_dim)`` with ``segment_ids`` of
  shape ``(n,)``; :meth:`SetEncoder.segments` encodes every segment in ``O(n)`` memory using
  ``jax.ops.segment_sum``/``segment_max`` and never materialises a padded array.

Everything is pure JAX: parameters are nested dicts of arrays, all functions are pure, and
:class:`SetEncoder` is a frozen dataclass of plain hyperparameters (picklable, hashable, so it
can be a static argument of ``jax.jit``).

Parameter layouts
-----------------
* linear: ``{"w": (in, out), "b": (out,)}``
* MLP: ``{"0": linear, "1": linear, ...}`` (string keys so the pytree is a plain dict)
* MAB: ``{"wq", "wk", "wv", "wo": linear, "ff": MLP[, "ln0", "ln1": {"scale", "bias"}]}``
* ISAB: ``{"inducing": (m, d), "mab0": MAB, "mab1": MAB}``
* PMA: ``{"seeds": (k, d), "ff": MLP, "mab": MAB}``
* SetEncoder: deep sets ``{"phi": MLP, "rho": {"hidden": linear, "out": readout}}``, set
  transformer ``{"embed": linear,
  "blocks": {"0": ISAB, ...}, "pma": PMA, "out": readout}``, plus ``"moments": readout`` when
  ``moments=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "Params",
    "SetEncoder",
    "init_isab",
    "init_linear",
    "init_mab",
    "init_mlp",
    "init_pma",
    "init_readout",
    "init_sab",
    "isab",
    "isab_segments",
    "linear",
    "mab",
    "mab_segments",
    "mlp",
    "pma",
    "pma_segments",
    "readout",
    "sab",
    "segment_softmax",
]

Params = dict[str, Any]

_KINDS = ("deep_sets", "set_transformer")
_POOLS = ("mean", "sum")
# Scale of the read-out layer's initial weights: keeps the initial encodings near zero so the
# guide starts close to its encoder-free behaviour.
_FINAL_SCALE = 1e-2


# ----------------------------------------------------------------------------------------
# Linear layers and MLPs
# ----------------------------------------------------------------------------------------


def init_linear(rng_key: jax.Array, in_dim: int, out_dim: int, scale: float = 1.0) -> Params:
    """LeCun-normal weights (times ``scale``) and zero bias.

    :return: ``{"w": (in_dim, out_dim), "b": (out_dim,)}``.
    """
    w = jax.random.normal(rng_key, (in_dim, out_dim)) * (scale / math.sqrt(max(in_dim, 1)))
    return {"w": w, "b": jnp.zeros((out_dim,))}


def linear(params: Params, x: jax.Array) -> jax.Array:
    """``x @ w + b`` on the last axis: ``(..., in_dim) -> (..., out_dim)``."""
    return x @ params["w"] + params["b"]


def init_readout(rng_key: jax.Array, in_dim: int, out_dim: int, scale: float = 1.0) -> Params:
    """A read-out layer for :func:`readout`: the same initial function as
    :func:`init_linear` (LeCun-normal times ``scale``), stored ``in_dim`` times larger.

    :return: ``{"w": (in_dim, out_dim), "b": (out_dim,)}``.
    """
    w = jax.random.normal(rng_key, (in_dim, out_dim)) * (scale * math.sqrt(max(in_dim, 1)))
    return {"w": w, "b": jnp.zeros((out_dim,))}


def readout(params: Params, x: jax.Array) -> jax.Array:
    """``x @ w / in_dim + b``: a linear map whose output moves by about the learning rate
    per Adam step (Adam moves each of the ``in_dim`` weights by about the rate, whatever its
    gradient; without the ``1/in_dim`` factor the output could move ``in_dim`` times faster).
    Used for every layer whose output is an encoding."""
    return (x @ params["w"]) / max(x.shape[-1], 1) + params["b"]


def init_mlp(rng_key: jax.Array, sizes: Sequence[int], final_scale: float = 1.0) -> Params:
    """An MLP with layer widths ``sizes = (in_dim, h_1, ..., out_dim)``.

    :param final_scale: multiplies the initial weights of the last layer.
    :return: ``{"0": linear, ..., str(len(sizes) - 2): linear}``.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) < 2:
        raise ValueError(f"init_mlp needs at least an input and an output size, got {sizes}")
    keys = jax.random.split(rng_key, len(sizes) - 1)
    num_layers = len(sizes) - 1
    return {
        str(i): init_linear(keys[i], sizes[i], sizes[i + 1], final_scale if i == num_layers - 1 else 1.0)
        for i in range(num_layers)
    }


def mlp(params: Params, x: jax.Array, activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu) -> jax.Array:
    """Apply the MLP row-wise: ``(..., in_dim) -> (..., out_dim)``; no activation on the output."""
    num_layers = len(params)
    for i in range(num_layers):
        x = linear(params[str(i)], x)
        if i < num_layers - 1:
            x = activation(x)
    return x


# ----------------------------------------------------------------------------------------
# Softmax variants
# ----------------------------------------------------------------------------------------


def segment_softmax(logits: jax.Array, segment_ids: jax.Array, num_segments: int) -> tuple[jax.Array, jax.Array]:
    """Unnormalised, stabilised softmax weights over the leading axis, per segment.

    :param logits: ``(n, ...)``.
    :param segment_ids: ``(n,)`` ints in ``[0, num_segments)``.
    :return: ``(e, denom)`` with ``e`` of shape ``(n, ...)`` and ``denom`` of shape
        ``(num_segments, ...)`` (0 for empty segments); the softmax weight of row ``i`` is
        ``e[i] / denom[segment_ids[i]]``. Returned unnormalised so callers can segment-sum
        ``e * values`` first and divide once per segment (``O(n)`` memory).
    """
    top = jax.ops.segment_max(logits, segment_ids, num_segments=num_segments)
    # Empty segments have max -inf; they receive no rows, so any finite shift will do.
    top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
    e = jnp.exp(logits - top[segment_ids])
    denom = jax.ops.segment_sum(e, segment_ids, num_segments=num_segments)
    return e, denom


# ----------------------------------------------------------------------------------------
# Multihead attention block (MAB) and its derived blocks
# ----------------------------------------------------------------------------------------


def _init_layer_norm(dim: int) -> Params:
    return {"scale": jnp.ones((dim,)), "bias": jnp.zeros((dim,))}


def _layer_norm(params: Params, x: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def init_mab(
    rng_key: jax.Array,
    dim: int,
    dim_kv: int | None = None,
    num_heads: int = 2,
    layer_norm: bool = False,
) -> Params:
    """Parameters of ``MAB(X, Y)`` with queries ``X: (..., nq, dim)``, keys ``Y: (..., nk, dim_kv)``.

    The residual connection is on ``X`` itself, so the query width equals the block width.
    Whether layer norm is used is recorded by the presence of ``"ln0"``/``"ln1"`` in the
    returned dict (so :func:`mab` cannot disagree with the parameters).
    """
    if dim % num_heads != 0:
        raise ValueError(f"MAB width dim={dim} must be divisible by num_heads={num_heads}")
    dim_kv = dim if dim_kv is None else dim_kv
    kq, kk, kv, ko, kf = jax.random.split(rng_key, 5)
    params: Params = {
        "wq": init_linear(kq, dim, dim),
        "wk": init_linear(kk, dim_kv, dim),
        "wv": init_linear(kv, dim_kv, dim),
        "wo": init_linear(ko, dim, dim),
        "ff": init_mlp(kf, (dim, dim, dim)),
    }
    if layer_norm:
        params["ln0"] = _init_layer_norm(dim)
        params["ln1"] = _init_layer_norm(dim)
    return params


def _split_heads(t: jax.Array, num_heads: int) -> jax.Array:
    """``(..., d) -> (..., num_heads, d // num_heads)``."""
    d = t.shape[-1]
    if d % num_heads != 0:
        raise ValueError(f"width {d} is not divisible by num_heads={num_heads}")
    return t.reshape(t.shape[:-1] + (num_heads, d // num_heads))


def _mab_output(params: Params, x: jax.Array, attended: jax.Array) -> jax.Array:
    """``H = X + Wo(attended)``, ``out = H + rFF(H)`` with optional post layer norms.

    Shared by the padded and the segmented MAB so both compute the same function.
    """
    h = x + linear(params["wo"], attended)
    if "ln0" in params:
        h = _layer_norm(params["ln0"], h)
    out = h + mlp(params["ff"], h)
    if "ln1" in params:
        out = _layer_norm(params["ln1"], out)
    return out


def mab(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    num_heads: int,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Multihead attention block ``MAB(X, Y) = H + rFF(H)``, ``H = X + Multihead(X, Y, Y)``.

    :param x: queries ``(*batch, nq, dim)``.
    :param y: keys/values ``(*batch, nk, dim_kv)``; batch dims must broadcast with ``x``'s.
    :param mask: key mask ``(*batch, nk)`` bool or None; masked keys are ignored. A query
        with no unmasked key attends to nothing (attention output 0).
    :return: ``(*batch, nq, dim)``.
    """
    q = _split_heads(linear(params["wq"], x), num_heads)  # (*b, nq, h, dh)
    k = _split_heads(linear(params["wk"], y), num_heads)  # (*b, nk, h, dh)
    v = _split_heads(linear(params["wv"], y), num_heads)
    batch = jnp.broadcast_shapes(q.shape[:-3], k.shape[:-3])
    if mask is not None:
        batch = jnp.broadcast_shapes(batch, mask.shape[:-1])
        # A zero weight times an inf/nan value is nan, so masked values must be removed too;
        # a query with every key masked then averages zeros: attention output 0.
        v = jnp.where(mask[..., :, None, None], v, 0.0)
    # jax.nn.dot_product_attention takes one batch axis: flatten ours
    flat = lambda t: jnp.reshape(jnp.broadcast_to(t, batch + t.shape[-3:]), (-1,) + t.shape[-3:])
    key_mask = (
        None if mask is None else jnp.reshape(jnp.broadcast_to(mask, batch + mask.shape[-1:]), (-1, 1, 1, k.shape[-3]))
    )
    attended = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=key_mask)
    # the width spelled out: a -1 cannot be inferred where a batch dim is 0
    attended = jnp.reshape(attended, batch + attended.shape[-3:-2] + (attended.shape[-2] * attended.shape[-1],))
    return _mab_output(params, x, attended)


def mab_segments(
    params: Params,
    x: jax.Array,
    y: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    num_heads: int,
) -> jax.Array:
    """``MAB(X_s, Y_s)`` for every segment ``s`` of a ragged key set, in ``O(n * nq)`` memory.

    :param x: per-segment queries ``(num_segments, nq, dim)`` or shared queries ``(nq, dim)``.
    :param y: flat keys/values ``(n, dim_kv)``.
    :param segment_ids: ``(n,)`` ints in ``[0, num_segments)``; any order.
    :return: ``(num_segments, nq, dim)``; an empty segment gives the no-key result, equal to
        :func:`mab` with an all-False mask.
    """
    if x.ndim == 2:
        x = jnp.broadcast_to(x, (num_segments,) + x.shape)
    q = _split_heads(linear(params["wq"], x), num_heads)  # (S, nq, h, dh)
    k = _split_heads(linear(params["wk"], y), num_heads)  # (n, h, dh)
    v = _split_heads(linear(params["wv"], y), num_heads)
    logits = jnp.einsum("nqhd,nhd->nhq", q[segment_ids], k) / math.sqrt(q.shape[-1])
    e, denom = segment_softmax(logits, segment_ids, num_segments)  # (n, h, nq), (S, h, nq)
    num = jax.ops.segment_sum(e[..., None] * v[:, :, None, :], segment_ids, num_segments=num_segments)  # (S, h, nq, dh)
    attended = num / jnp.where(denom > 0, denom, 1.0)[..., None]
    attended = jnp.swapaxes(attended, -3, -2)  # (S, nq, h, dh)
    attended = attended.reshape(attended.shape[:-2] + (-1,))
    return _mab_output(params, x, attended)


def init_sab(rng_key: jax.Array, dim: int, num_heads: int = 2, layer_norm: bool = False) -> Params:
    """Parameters of ``SAB(X) = MAB(X, X)`` (same layout as :func:`init_mab`)."""
    return init_mab(rng_key, dim, dim, num_heads, layer_norm)


def sab(params: Params, x: jax.Array, num_heads: int, mask: jax.Array | None = None) -> jax.Array:
    """Set attention block ``SAB(X) = MAB(X, X)``; permutation equivariant.

    :param x: ``(*batch, n, dim)``; :param mask: ``(*batch, n)`` or None.
    :return: ``(*batch, n, dim)``; rows of masked elements are meaningless (but finite).
    """
    return mab(params, x, x, num_heads, mask)


def init_isab(
    rng_key: jax.Array,
    dim: int,
    num_inducing: int,
    num_heads: int = 2,
    layer_norm: bool = False,
) -> Params:
    """Parameters of ``ISAB(X) = MAB(X, MAB(I, X))`` with ``num_inducing`` learned points."""
    ki, k0, k1 = jax.random.split(rng_key, 3)
    return {
        "inducing": jax.random.normal(ki, (num_inducing, dim)),
        "mab0": init_mab(k0, dim, dim, num_heads, layer_norm),
        "mab1": init_mab(k1, dim, dim, num_heads, layer_norm),
    }


def isab(params: Params, x: jax.Array, num_heads: int, mask: jax.Array | None = None) -> jax.Array:
    """Induced set attention block; permutation equivariant, ``O(n * m)`` instead of ``O(n^2)``.

    :param x: ``(*batch, n, dim)``; :param mask: ``(*batch, n)`` or None (masked elements
        are invisible to the inducing points).
    :return: ``(*batch, n, dim)``; rows of masked elements are meaningless (but finite).
    """
    inducing = params["inducing"]
    inducing = jnp.broadcast_to(inducing, x.shape[:-2] + inducing.shape)
    h = mab(params["mab0"], inducing, x, num_heads, mask)  # (*batch, m, dim)
    return mab(params["mab1"], x, h, num_heads)


def isab_segments(
    params: Params,
    x: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    num_heads: int,
) -> jax.Array:
    """:func:`isab` applied to each segment of a flat ragged set: ``(n, dim) -> (n, dim)``.

    The inducing points attend within each segment (segmented softmax); each element then
    attends only to its own segment's ``m`` inducing outputs, so memory is ``O(n * m)``.
    """
    h = mab_segments(params["mab0"], params["inducing"], x, segment_ids, num_segments, num_heads)
    # A query set of size one per element: row i attends to h[segment_ids[i]] only.
    out = mab(params["mab1"], x[:, None, :], h[segment_ids], num_heads)
    return out[:, 0, :]


def init_pma(
    rng_key: jax.Array,
    dim: int,
    num_seeds: int = 1,
    num_heads: int = 2,
    layer_norm: bool = False,
) -> Params:
    """Parameters of ``PMA(Z) = MAB(S, rFF(Z))`` with ``num_seeds`` learned seed vectors."""
    ks, kf, km = jax.random.split(rng_key, 3)
    return {
        "seeds": jax.random.normal(ks, (num_seeds, dim)),
        "ff": init_mlp(kf, (dim, dim, dim)),
        "mab": init_mab(km, dim, dim, num_heads, layer_norm),
    }


def pma(params: Params, x: jax.Array, num_heads: int, mask: jax.Array | None = None) -> jax.Array:
    """Pooling by multihead attention; permutation invariant.

    :param x: ``(*batch, n, dim)``; :param mask: ``(*batch, n)`` or None.
    :return: ``(*batch, num_seeds, dim)``.
    """
    seeds = params["seeds"]
    seeds = jnp.broadcast_to(seeds, x.shape[:-2] + seeds.shape)
    return mab(params["mab"], seeds, mlp(params["ff"], x), num_heads, mask)


def pma_segments(
    params: Params,
    x: jax.Array,
    segment_ids: jax.Array,
    num_segments: int,
    num_heads: int,
) -> jax.Array:
    """:func:`pma` for each segment of a flat ragged set: ``(n, dim) -> (num_segments, num_seeds, dim)``."""
    return mab_segments(params["mab"], params["seeds"], mlp(params["ff"], x), segment_ids, num_segments, num_heads)


# ----------------------------------------------------------------------------------------
# The encoder
# ----------------------------------------------------------------------------------------


_MAX_CROSS_MOMENTS = 8


def _num_moments(in_dim: int) -> int:
    if in_dim > _MAX_CROSS_MOMENTS:
        return 2 * in_dim
    return in_dim + in_dim * (in_dim + 1) // 2


def _moment_features(x: jax.Array) -> jax.Array:
    """``(..., k) -> (..., num_moments(k))``: ``x`` then ``x_i x_j`` for ``i <= j`` (squares
    only when ``k > 8``, to keep the read-out small)."""
    k = x.shape[-1]
    if k > _MAX_CROSS_MOMENTS:
        return jnp.concatenate([x, x * x], -1)
    i, j = jnp.triu_indices(k)
    return jnp.concatenate([x, x[..., i] * x[..., j]], -1)


def _rho(params: Params, pooled: jax.Array) -> jax.Array:
    """Deep sets' output network: one hidden layer, then a :func:`readout`."""
    return readout(params["out"], jax.nn.gelu(linear(params["hidden"], pooled)))


@dataclass(frozen=True)
class SetEncoder:
    """A permutation-invariant map from a set of vectors ``(n, in_dim)`` to one vector ``(out_dim,)``.

    :param kind: ``"deep_sets"`` (default, as :class:`~numpyro_pavi.AutoPAVI`'s) or
        ``"set_transformer"``.
    :param out_dim: width of the encoding (inside AutoPAVI: its ``encoding_dim``).
    :param hidden_dim: embedding width (divisible by ``num_heads`` for the set transformer).
    :param num_heads: attention heads (set transformer).
    :param num_inducing: inducing points per ISAB block (set transformer).
    :param num_blocks: ISAB blocks (set transformer) / number of layers of ``phi`` (deep sets).
    :param pool: deep sets pooling, ``"mean"`` or ``"sum"``.
    :param layer_norm: post layer norms inside every MAB (set transformer); off by default.
    :param moments: add a linear read-out of the pooled first and second moments of the
        set (``x`` and the products ``x_i x_j``; squares only when ``in_dim > 8``), pooled
        like deep sets (mean, or sum with ``pool="sum"``). These are the sufficient
        statistics of Gaussian likelihoods, so a Gaussian hierarchy's exact posterior needs
        nothing the network has to approximate; the network adds everything else.

    The read-out layer is initialised with small weights, so initial encodings are close to 0.
    Instances hold hyperparameters only; parameters are the pytree returned by :meth:`init`.
    """

    kind: str = "deep_sets"
    out_dim: int = 8
    hidden_dim: int = 32
    num_heads: int = 2
    num_inducing: int = 8
    num_blocks: int = 2
    pool: str = "mean"
    layer_norm: bool = False
    moments: bool = True

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Unknown SetEncoder kind {self.kind!r}; expected one of {', '.join(map(repr, _KINDS))}.")
        if self.pool not in _POOLS:
            raise ValueError(f"Unknown SetEncoder pool {self.pool!r}; expected one of {', '.join(map(repr, _POOLS))}.")
        for name in ("out_dim", "hidden_dim", "num_heads", "num_inducing", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SetEncoder.{name} must be a positive int, got {value!r}.")
        if self.kind == "set_transformer" and self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"SetEncoder.hidden_dim={self.hidden_dim} must be divisible by "
                f"num_heads={self.num_heads} for the set transformer."
            )

    # -- parameters ---------------------------------------------------------------------

    def init(self, rng_key: jax.Array, in_dim: int) -> Params:
        """Initial parameters for sets of ``in_dim``-vectors (a nested dict of arrays)."""
        d = self.hidden_dim
        k_net, k_mom = jax.random.split(rng_key)
        if self.kind == "deep_sets":
            k_phi, k_rho = jax.random.split(k_net)
            params = {
                "phi": init_mlp(k_phi, (in_dim,) + (d,) * self.num_blocks),
                "rho": {
                    "hidden": init_linear(k_rho, d, d),
                    "out": init_readout(jax.random.fold_in(k_rho, 1), d, self.out_dim, _FINAL_SCALE),
                },
            }
        else:
            k_embed, k_blocks, k_pma, k_out = jax.random.split(k_net, 4)
            block_keys = jax.random.split(k_blocks, self.num_blocks)
            params = {
                "embed": init_linear(k_embed, in_dim, d),
                "blocks": {
                    str(i): init_isab(block_keys[i], d, self.num_inducing, self.num_heads, self.layer_norm)
                    for i in range(self.num_blocks)
                },
                "pma": init_pma(k_pma, d, 1, self.num_heads, self.layer_norm),
                "out": init_readout(k_out, d, self.out_dim, scale=_FINAL_SCALE),
            }
        if self.moments:
            params["moments"] = init_readout(k_mom, _num_moments(in_dim), self.out_dim, scale=_FINAL_SCALE)
        return params

    def num_params(self, in_dim: int) -> int:
        """Number of scalar parameters for sets of ``in_dim``-vectors (computed without FLOPs)."""
        shapes = jax.eval_shape(functools.partial(self.init, in_dim=in_dim), jax.random.key(0))
        return int(sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)))

    # -- padded sets --------------------------------------------------------------------

    def __call__(self, params: Params, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Encode padded sets.

        :param x: ``(*batch, n, in_dim)``.
        :param mask: ``(*batch, n)`` bool or None (all valid). Masked entries have no
            influence at all, whatever their values; an all-masked set gives a finite output.
        :return: ``(*batch, out_dim)``.
        """
        x = jnp.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"SetEncoder expects x of shape (*batch, n, in_dim), got {x.shape}")
        if mask is not None:
            mask = jnp.broadcast_to(jnp.asarray(mask, dtype=bool), x.shape[:-1])
            # Zeroing (rather than only masking attention/pooling) keeps inf/nan padding out
            # of every product, including 0 * inf in the forward pass and in gradients.
            x = jnp.where(mask[..., None], x, 0.0)
        out = self._moments_padded(params, x, mask)
        if self.kind == "deep_sets":
            return out + _rho(params["rho"], self._pool_padded(mlp(params["phi"], x), mask))

        h = linear(params["embed"], x)
        for i in range(self.num_blocks):
            h = isab(params["blocks"][str(i)], h, self.num_heads, mask)
            if mask is not None:
                # Padded rows are never attended to, but keeping them at zero guarantees they
                # stay finite across many blocks (0 * inf would leak through the attention).
                h = jnp.where(mask[..., None], h, 0.0)
        pooled = pma(params["pma"], h, self.num_heads, mask)[..., 0, :]
        return out + readout(params["out"], pooled)

    def _pool_padded(self, feats: jax.Array, mask: jax.Array | None) -> jax.Array:
        """Deep-sets pooling ``(*batch, n, k) -> (*batch, k)``."""
        if mask is None:
            pooled = jnp.sum(feats, axis=-2)
            count = jnp.asarray(feats.shape[-2], feats.dtype)
        else:
            pooled = jnp.sum(jnp.where(mask[..., None], feats, 0.0), axis=-2)
            count = jnp.sum(mask, axis=-1, keepdims=True).astype(feats.dtype)
        return pooled / jnp.maximum(count, 1.0) if self.pool == "mean" else pooled

    def _moments_padded(self, params: Params, x: jax.Array, mask: jax.Array | None) -> jax.Array | float:
        if "moments" not in params:
            return 0.0
        return readout(params["moments"], self._pool_padded(_moment_features(x), mask))

    def _pool_segments(self, feats: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
        pooled = jax.ops.segment_sum(feats, segment_ids, num_segments=num_segments)
        if self.pool == "mean":
            count = jax.ops.segment_sum(
                jnp.ones(segment_ids.shape, feats.dtype), segment_ids, num_segments=num_segments
            )
            pooled = pooled / jnp.maximum(count, 1.0)[:, None]
        return pooled

    # -- ragged sets --------------------------------------------------------------------

    def segments(self, params: Params, x: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
        """Encode ragged sets stored flat, in ``O(n)`` memory.

        :param x: ``(n, in_dim)``.
        :param segment_ids: ``(n,)`` ints in ``[0, num_segments)`` (need not be sorted).
        :param num_segments: static number of sets.
        :return: ``(num_segments, out_dim)``; row ``s`` equals ``self(params, x[segment_ids == s])``
            up to float tolerance, and an empty segment equals an all-masked call.
        """
        x = jnp.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"SetEncoder.segments expects flat x of shape (n, in_dim), got {x.shape}")
        segment_ids = jnp.asarray(segment_ids)
        out = 0.0
        if "moments" in params:
            out = readout(params["moments"], self._pool_segments(_moment_features(x), segment_ids, num_segments))
        if self.kind == "deep_sets":
            return out + _rho(params["rho"], self._pool_segments(mlp(params["phi"], x), segment_ids, num_segments))

        h = linear(params["embed"], x)
        for i in range(self.num_blocks):
            h = isab_segments(params["blocks"][str(i)], h, segment_ids, num_segments, self.num_heads)
        pooled = pma_segments(params["pma"], h, segment_ids, num_segments, self.num_heads)[:, 0, :]
        return out + readout(params["out"], pooled)
