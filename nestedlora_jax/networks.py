"""Eigenfunction networks (Flax NNX) and the bridge to pure functions.

A network maps ONE point ``x`` of shape ``(d,)`` to the values of the ``L`` learned functions,
shape ``(L,)``; batching is the caller's ``jax.vmap``. Two bodies:

* :class:`MLP`: one shared MLP with ``L`` outputs (joint nesting);
* :class:`ParallelMLPs`: ``L`` independent scalar MLPs whose parameters are stacked along a
  leading axis of size ``L`` and evaluated as one batched computation (sequential nesting).

Input and output options are small modules composed by :class:`EigenfunctionNetwork`::

    f(x) = body(features(x)) * envelope(x) * mask(x)

with ``features`` built by :class:`InputFeatures` (periodic embedding, frozen random Fourier
features, radial input ``|x|``), ``envelope`` an :class:`Envelope` ``exp(-|x| / a_i)`` (fixed or
learnable), and ``mask`` any callable ``x -> scalar`` (e.g. :func:`dirichlet_box_mask`).
:func:`eigenfunction_network` builds the usual combinations from a few keywords.

The core of the library is Flax-free. :func:`to_apply` is THE way to turn a module into a pure
function of a plain ``dict`` of its trainable parameters (only the ``nnx.Param`` leaves; frozen
features such as the Fourier matrix, stored as :class:`Frozen`, are closed over and never seen by
an optimizer); :func:`load_params` puts trained parameters back::

    net = eigenfunction_network(2, 9, architecture="parallel", radial_input=True, rngs=nnx.Rngs(0))
    apply, params = to_apply(net)               # apply(params, x): (d,) -> (L,), pure
    f = jax.vmap(apply, in_axes=(None, 0))      # (B, d) -> (B, L)
    params = train(f, params)                   # any jit/grad/optax code on the dict
    load_params(net, params)                    # net(x) now equals apply(params, x)

For :class:`ParallelMLPs` (and a learnable :class:`Envelope`) every parameter leaf has the
leading axis ``L``: leaf ``[i]`` belongs to function ``i`` alone, so re-initialising function i
is ``tree.map(lambda p, q: p.at[i].set(q[i]), params, fresh_params)`` with ``fresh_params``
from the same constructor called with another seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nestedlora_jax._checks import check_hidden_widths, check_input_options, check_positive_int
from nestedlora_jax.config import ARCHITECTURES, ENVELOPES

Array = jax.Array
Activation = Callable[[Array], Array]

__all__ = [
    "Frozen",
    "stable_radius",
    "PeriodicEmbedding",
    "RandomFourierFeatures",
    "InputFeatures",
    "MLP",
    "StackedLinear",
    "GaussianEnvelope",
    "gaussian_envelope_for_network",
    "ParallelMLPs",
    "readout_paths",
    "Envelope",
    "EigenfunctionNetwork",
    "dirichlet_box_mask",
    "eigenfunction_network",
    "to_apply",
    "load_params",
]

_RADIUS_EPS = 1e-12


class Frozen(nnx.Variable):
    """Non-trainable array state (random Fourier frequencies, fixed envelope lengths).

    Not an ``nnx.Param``: ``nnx.split(module, nnx.Param, ...)``, ``nnx.Optimizer(...,
    wrt=nnx.Param)`` and :func:`to_apply` leave it out of the trainable parameters.
    """


# --------------------------------------------------------------------------- validation


# The activations a configuration can name (config.ACTIVATIONS); any callable works in code.
ACTIVATION_FUNCTIONS: dict[str, Callable[[Array], Array]] = {
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "gelu": jax.nn.gelu,
}


def _check_activation(activation: Any) -> Activation:
    if not callable(activation):
        raise ValueError(f"activation must be callable, got {activation!r}")
    return activation


# --------------------------------------------------------------------------- input features


def stable_radius(x: Array, eps: float = _RADIUS_EPS) -> Array:
    """``sqrt(|x|^2 + eps)`` over the last axis: (..., d) -> (...).

    Plain ``|x|`` has a NaN gradient at 0 (0/0); with ``eps > 0`` every derivative is finite
    (gradient 0 at the origin, second derivative ``1/sqrt(eps)``), while for ``|x| >> sqrt(eps)``
    it is ``|x|`` to working precision, so the cusp of ``exp(-|x|)`` survives.
    """
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=-1) + eps)


class PeriodicEmbedding(nnx.Module):
    """``x -> [cos(2 pi x / P), sin(2 pi x / P)]``: (..., d) -> (..., 2d).

    Any function of the embedding is exactly ``P_i``-periodic in ``x_i``; ``period=2 pi`` is the
    box ``[-pi, pi]^d``. No parameters.
    """

    def __init__(self, in_features: int, period: float | Sequence[float] = 2 * math.pi):
        self.in_features = check_positive_int("in_features", in_features)
        periods = (
            (period,) * in_features if np.ndim(period) == 0 else tuple(np.ravel(period).tolist())
        )
        if len(periods) != in_features or any(not float(p) > 0 for p in periods):
            raise ValueError(
                f"period must be a positive number or {in_features} positive numbers, "
                f"got {period!r}"
            )
        # Static Python floats (hashable graph metadata), cast to x's dtype at call time.
        self.angular = tuple(2 * math.pi / float(p) for p in periods)
        self.out_features = 2 * in_features

    def __call__(self, x: Array) -> Array:
        z = x * jnp.asarray(self.angular, dtype=x.dtype)
        return jnp.concatenate([jnp.cos(z), jnp.sin(z)], axis=-1)


class RandomFourierFeatures(nnx.Module):
    """Frozen Gaussian random Fourier features: ``x -> [sin(B x), cos(B x)]``.

    (..., d) -> (..., 2 num_features), ``B`` of shape (num_features, d) with entries
    ``N(0, scale^2)`` drawn once at init and stored as :class:`Frozen` (never trained).
    """

    def __init__(
        self,
        in_features: int,
        num_features: int,
        scale: float = 1.0,
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        check_positive_int("fourier num_features", num_features)
        if not float(scale) > 0:
            raise ValueError(f"fourier scale must be positive, got {scale!r}")
        self.out_features = 2 * num_features
        self.frequencies = Frozen(
            float(scale)
            * jax.random.normal(rngs.params(), (num_features, in_features), param_dtype)
        )

    def __call__(self, x: Array) -> Array:
        z = jnp.einsum("...d,kd->...k", x, self.frequencies[...])
        return jnp.concatenate([jnp.sin(z), jnp.cos(z)], axis=-1)


def _per_axis(name: str, value, dim: int, default: float) -> tuple[float, ...]:
    """``value`` (None, a scalar or ``(dim,)``) as ``dim`` finite floats."""
    if value is None:
        return (float(default),) * dim
    v = np.broadcast_to(np.asarray(value, dtype=np.float64), (dim,)) if np.ndim(value) == 0 \
        else np.asarray(value, dtype=np.float64)
    if v.shape != (dim,) or not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be a finite number or {dim} finite numbers, got {value!r}")
    return tuple(float(t) for t in v)


class InputFeatures(nnx.Module):
    """Input pipeline ``(..., d) -> (..., out_features)``::

        z = (x - input_center) / input_scale    (identity by default)
        z = PeriodicEmbedding(z)            if periodic          (2d)
        z = RandomFourierFeatures(z)        if fourier_features  (2 num)
        z = concat(z, stable_radius(z))     if radial_input      (+1, of the standardised z)

    Args:
      in_features: d.
      periodic: ``False``/``None``, ``True`` (period 2 pi), or a period (scalar or (d,)).
      fourier_features: ``None`` or ``(num_features, scale)``.
      radial_input: append ``sqrt(|z|^2 + radial_eps)`` of the standardised input ``z`` (the
        radius about ``input_center`` in units of ``input_scale``; ``|x|`` without
        standardisation): lets the network represent a Coulomb cusp (a smooth MLP of ``x`` alone
        cannot). Not allowed together with ``periodic``.
      input_center, input_scale: standardise the input first (scalars or ``(d,)``; e.g. a
        problem's :meth:`~nestedlora_jax.problems.Problem.input_standardization`), so that the
        MLP sees coordinates of order one around zero whatever the domain.
    """

    def __init__(
        self,
        in_features: int,
        *,
        periodic: bool | float | Sequence[float] | None = False,
        fourier_features: tuple[int, float] | None = None,
        radial_input: bool = False,
        radial_eps: float = _RADIUS_EPS,
        input_center: float | Sequence[float] | None = None,
        input_scale: float | Sequence[float] | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.in_features = check_positive_int("in_features", in_features)
        # Static Python floats (hashable graph metadata), cast to x's dtype at call time.
        self.input_center = _per_axis("input_center", input_center, in_features, 0.0)
        self.input_scale = _per_axis("input_scale", input_scale, in_features, 1.0)
        if not all(v > 0 for v in self.input_scale):
            raise ValueError(f"input_scale must be positive, got {input_scale!r}")
        check_input_options(periodic=periodic, radial_input=radial_input, envelope=None)
        is_periodic = periodic is not None and periodic is not False
        n = in_features
        periodic_embedding = None
        if is_periodic:
            period = 2 * math.pi if periodic is True else periodic
            periodic_embedding = PeriodicEmbedding(n, period)
            n = periodic_embedding.out_features
        fourier_module = None
        if fourier_features is not None:
            try:
                num, scale = fourier_features
            except (TypeError, ValueError):
                raise ValueError(
                    f"fourier_features must be None or (num_features, scale), got {fourier_features!r}"
                ) from None
            fourier_module = RandomFourierFeatures(
                n, num, scale, param_dtype=param_dtype, rngs=rngs
            )
            n = fourier_module.out_features
        # Assigned once: an NNX attribute first set to None is static metadata.
        self.periodic = periodic_embedding
        self.fourier = fourier_module
        self.radial = bool(radial_input)
        if not radial_eps > 0:
            raise ValueError(f"radial_eps must be positive, got {radial_eps!r}")
        self.radial_eps = float(radial_eps)
        self.out_features = n + int(self.radial)

    def __call__(self, x: Array) -> Array:
        z = x
        if any(self.input_center) or any(v != 1.0 for v in self.input_scale):
            z = (z - jnp.asarray(self.input_center, x.dtype)) / jnp.asarray(self.input_scale, x.dtype)
        # Of the standardised coordinates: the radius must be on the same scale as the
        # coordinates it joins (hydrogen's n = 5 states reach r ~ 150).
        radius = stable_radius(z, self.radial_eps)[..., None] if self.radial else None
        if self.periodic is not None:
            z = self.periodic(z)
        if self.fourier is not None:
            z = self.fourier(z)
        if radius is not None:
            z = jnp.concatenate([z, radius], axis=-1)
        return z


# --------------------------------------------------------------------------- bodies


class MLP(nnx.Module):
    """Shared MLP ``(..., in_features) -> (..., out_features)`` (joint nesting).

    ``h_0 = x; h_{k+1} = act(W_k h_k + b_k); out = W_K h_K + b_K`` (linear last layer).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        hidden: Sequence[int] = (64, 64, 64),
        activation: Activation = jax.nn.softplus,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive_int("in_features", in_features)
        check_positive_int("out_features (number of functions L)", out_features)
        sizes = (in_features, *check_hidden_widths("hidden", hidden), out_features)
        self.activation = _check_activation(activation)
        self.layers = nnx.List(
            [
                nnx.Linear(a, b, param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: Array) -> Array:
        for layer in self.layers[:-1]:
            x = self.activation(layer(x))
        return self.layers[-1](x)


class StackedLinear(nnx.Module):
    """``num`` independent affine maps with stacked parameters.

    kernel (num, in, out), bias (num, out); each map ``y_l = x_l W_l + b_l``. Kernels use
    ``nnx.Linear``'s default LeCun-normal init per map (fan-in = ``in``), biases zero.
    """

    def __init__(
        self,
        num: int,
        in_features: int,
        out_features: int,
        *,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = jax.nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.kernel = nnx.Param(init(rngs.params(), (num, in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num, out_features), param_dtype))

    def __call__(self, x: Array, *, shared_input: bool = False) -> Array:
        """x: (..., in) shared by all maps if ``shared_input``, else (..., num, in).

        Returns (..., num, out).
        """
        spec = "...i,lio->...lo" if shared_input else "...li,lio->...lo"
        return jnp.einsum(spec, x, self.kernel[...]) + self.bias[...]


class ParallelMLPs(nnx.Module):
    """``L`` independent scalar MLPs in parallel: (..., in_features) -> (..., L).

    Every parameter has the leading axis L (:class:`StackedLinear`), so output i depends only
    on the slice ``[i]`` of each leaf (sequential nesting). One batched computation: the first
    layer is a single matmul of the shared input against ``L * width`` columns, the others are
    batched matmuls over L.
    """

    def __init__(
        self,
        in_features: int,
        L: int,
        *,
        hidden: Sequence[int] = (32, 32, 32),
        activation: Activation = jax.nn.softplus,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_positive_int("in_features", in_features)
        check_positive_int("L (the number of functions)", L)
        sizes = (in_features, *check_hidden_widths("hidden", hidden), 1)
        self.activation = _check_activation(activation)
        self.layers = nnx.List(
            [
                StackedLinear(L, a, b, param_dtype=param_dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:])
            ]
        )

    def __call__(self, x: Array) -> Array:
        h = self.activation(self.layers[0](x, shared_input=True))  # (..., L, width)
        for layer in self.layers[1:-1]:
            h = self.activation(layer(h))
        return self.layers[-1](h)[..., 0]


_LAYER_LEAF = re.compile(r"^(.*\['layers'\]\[(\d+)\])\['(kernel|bias)'\]$")


def readout_paths(params, L: int) -> tuple[str, str]:
    """The key paths (:func:`jax.tree_util.keystr`) of the readout of a :class:`ParallelMLPs`
    body: its last :class:`StackedLinear`'s kernel ``(L, width, 1)`` and bias ``(L, 1)``.

    Output ``i`` of the library's parallel networks is linear in row ``i`` of these two (the
    envelopes and masks of :class:`EigenfunctionNetwork` multiply the body's output), which is
    what choosing a readout by Rayleigh-Ritz needs
    (:func:`~nestedlora_jax.training.rayleigh_ritz_readout`). ValueError if ``params`` has no
    such layer."""
    layers: dict[str, dict[str, tuple[int, tuple]]] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        match = _LAYER_LEAF.match(jax.tree_util.keystr(path))
        if match:
            layers.setdefault(match.group(1), {})[match.group(3)] = (int(match.group(2)),
                                                                     tuple(np.shape(leaf)))
    stacks = {}
    for prefix, leaves in layers.items():
        if set(leaves) == {"kernel", "bias"}:
            stacks.setdefault(prefix.rsplit("[", 1)[0], []).append((leaves["kernel"][0], prefix))
    if len(stacks) == 1:
        prefix = max(next(iter(stacks.values())))[1]
        kernel, bias = layers[prefix]["kernel"][1], layers[prefix]["bias"][1]
        if len(kernel) == 3 and kernel[0] == L and kernel[2] == 1 and bias == (L, 1):
            return prefix + "['kernel']", prefix + "['bias']"
    raise ValueError(
        f"no readout layer of {L} parallel scalar networks (a last layer with kernel (L, width, "
        "1) and bias (L, 1), as ParallelMLPs has) found in the parameters: a Rayleigh-Ritz "
        "readout needs the library's parallel networks (architecture 'parallel').")


# --------------------------------------------------------------------------- outputs


def _inverse_softplus(y: Array) -> Array:
    # log(expm1(y)) written to stay finite for large y.
    return y + jnp.log(-jnp.expm1(-y))


def _decay_lengths(decay_length: Any, L: int) -> np.ndarray:
    """Validated envelope lengths a_i as a NumPy (L,) array."""
    try:
        lengths = np.asarray(decay_length, dtype=float)
    except (TypeError, ValueError):
        lengths = np.full((0,), np.nan)
    if lengths.ndim == 0:
        lengths = np.full((L,), float(lengths))
    if lengths.shape != (L,) or not np.all(lengths > 0):
        raise ValueError(
            f"envelope_decay must be a positive number or {L} positive numbers, "
            f"got {decay_length!r}"
        )
    return lengths


class Envelope(nnx.Module):
    """Per-output envelope ``e_i(x) = exp(-r / a_i)``, r = stable_radius(x): (..., d) -> (..., L).

    Fixed: the lengths ``a_i`` are :class:`Frozen`. Learnable: the rate ``1/a_i =
    softplus(rho_i)`` with ``rho`` an ``nnx.Param`` of shape (L,), initialised at the given
    lengths; the softplus keeps the rate positive (the function stays bounded) and a rate near 0
    is a flat envelope rather than a division by zero. On hydrogen the learnable version has
    trapped functions near the nucleus, where fixed envelopes did not.
    """

    def __init__(
        self,
        L: int,
        decay_length: float | Sequence[float] = 1.0,
        *,
        learnable: bool = False,
        radial_eps: float = _RADIUS_EPS,
        param_dtype: Any = jnp.float32,
    ):
        check_positive_int("L", L)
        lengths = _decay_lengths(decay_length, L)
        self.learnable = bool(learnable)
        self.radial_eps = float(radial_eps)
        if self.learnable:
            self.raw_rate = nnx.Param(_inverse_softplus(jnp.asarray(1.0 / lengths, param_dtype)))
        else:
            self.length = Frozen(jnp.asarray(lengths, param_dtype))

    def rates(self) -> Array:
        """(L,) decay rates ``1 / a_i``."""
        return jax.nn.softplus(self.raw_rate[...]) if self.learnable else 1.0 / self.length[...]

    def __call__(self, x: Array) -> Array:
        r = stable_radius(x, self.radial_eps)[..., None]
        return jnp.exp(-r * self.rates())


class GaussianEnvelope(nnx.Module):
    """``e(x) = exp(-x^T M x / 2 + b^T x)``, shared by every output: (..., d) -> (..., 1).

    Fixed (``M`` and ``b`` are :class:`Frozen`): the Gaussian decay of harmonically confined
    states, which a softplus MLP represents poorly, so that the MLPs learn only the polynomial
    factors. Build ``(M, b)`` with :func:`gaussian_envelope_for_network`.
    """

    def __init__(self, quadratic: Any, linear: Any, *, param_dtype: Any = jnp.float32):
        m = np.asarray(quadratic, np.float64)
        b = np.asarray(linear, np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1] or b.shape != (m.shape[0],) \
                or not (np.all(np.isfinite(m)) and np.all(np.isfinite(b))):
            raise ValueError(f"GaussianEnvelope needs a finite (d, d) matrix and a finite (d,) "
                             f"vector; got shapes {m.shape} and {b.shape}.")
        self.quadratic = Frozen(jnp.asarray((m + m.T) / 2, param_dtype))
        self.linear = Frozen(jnp.asarray(b, param_dtype))

    def __call__(self, x: Array) -> Array:
        m, b = self.quadratic[...], self.linear[...]
        exponent = -0.5 * jnp.einsum("...i,ij,...j->...", x, m, x) + x @ b
        return jnp.exp(exponent)[..., None]


def gaussian_envelope_for_network(center: Any, precision: Any, sampler: Any = None
                                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(M, b)`` of the :class:`GaussianEnvelope` of a network whose states decay like
    ``exp(-(x - c)^T A (x - c) / 2)`` (``center`` c, ``precision`` A, e.g. from
    :meth:`~nestedlora_jax.problems.Problem.gaussian_envelope`).

    Without ``sampler`` the network represents ``psi`` itself: ``M = A``, ``b = A c``. With the
    Gaussian ``sampler`` ``p = N(mu, P^{-1})`` of an importance-weighted operator the network
    represents ``psi / sqrt(p)``, whose factor is ``exp(-(x - c)^T A (x - c) / 2 + (x - mu)^T P
    (x - mu) / 4)``: ``M = A - P / 2``, ``b = A c - P mu / 2`` (constants dropped: the envelope
    is 1 at the origin).

    Raises:
      ValueError: shapes that do not match, an ``A`` that is not symmetric positive definite, a
        sampler that is not Gaussian, or one narrower than ``psi^2`` along some direction
        (``M`` not positive semidefinite: ``psi / sqrt(p)`` would grow without bound and every
        Monte Carlo estimate would have infinite variance).
    """
    from nestedlora_jax.samplers import _symmetric_positive_definite, gaussian_mean_precision

    c = np.asarray(center, np.float64)
    a = np.asarray(precision, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or c.shape != (a.shape[0],):
        raise ValueError(f"a Gaussian envelope needs center (d,) and precision (d, d); got "
                         f"shapes {c.shape} and {a.shape}.")
    if not np.all(np.isfinite(c)):
        raise ValueError("gaussian_envelope: center has non-finite entries.")
    a = _symmetric_positive_definite(a, c.shape[0], "precision", "gaussian_envelope")
    if sampler is None:
        return a, a @ c
    moments = gaussian_mean_precision(sampler)
    if moments is None:
        raise ValueError(
            f"the problem's Gaussian envelope is written for a Gaussian sampler, but the network "
            f"represents psi / sqrt(p) for a {type(sampler).__name__}: use a GaussianSampler or "
            "CorrelatedGaussianSampler, or turn the envelope off "
            "(NetworkConfig(gaussian_envelope=False)).")
    mu, p = moments
    if mu.shape != c.shape:
        raise ValueError(f"the sampler is {mu.shape[0]}-dimensional but the envelope "
                         f"{c.shape[0]}-dimensional.")
    m = a - p / 2
    lowest = np.linalg.eigvalsh(m).min()
    if lowest < -1e-9 * np.abs(a).max():
        raise ValueError(
            "the sampler is narrower than psi^2 along some direction (its precision exceeds "
            "twice the states' Gaussian precision there): psi / sqrt(p) would grow without bound "
            "and Monte Carlo estimates would have infinite variance. Widen the sampler (a "
            "covariance of at least (2 A)^{-1}, A the envelope's precision), or turn the envelope off "
            "(NetworkConfig(gaussian_envelope=False)).")
    return m, a @ c - p @ mu / 2


def dirichlet_box_mask(lower: float | Sequence[float], upper: float | Sequence[float]):
    """Callable ``x -> prod_i (x_i - lo_i)(hi_i - x_i) / ((hi_i - lo_i) / 2)^2``: (d,) -> ().

    Zero on the faces of the box ``[lo, hi]``, 1 at its centre: multiplying the network output
    by it imposes Dirichlet boundary conditions exactly.
    """
    try:
        lo_arr, hi_arr = np.broadcast_arrays(
            np.atleast_1d(np.asarray(lower, dtype=float)),
            np.atleast_1d(np.asarray(upper, dtype=float)),
        )
    except ValueError:
        raise ValueError(f"lower and upper must broadcast, got {lower!r} and {upper!r}") from None
    if lo_arr.ndim != 1 or not np.all(hi_arr > lo_arr):
        raise ValueError(
            f"need 1-D bounds with upper > lower in every coordinate, got {lower!r} and {upper!r}"
        )
    lo, hi = tuple(lo_arr.tolist()), tuple(hi_arr.tolist())

    def mask(x: Array) -> Array:
        l = jnp.asarray(lo, dtype=x.dtype)
        h = jnp.asarray(hi, dtype=x.dtype)
        return jnp.prod((x - l) * (h - x) / jnp.square((h - l) / 2), axis=-1)

    return mask


class EigenfunctionNetwork(nnx.Module):
    """``f(x) = body(features(x)) * envelope(x) * mask(x)``: (d,) -> (L,).

    Args:
      body: a module (..., F) -> (..., L), e.g. :class:`MLP` or :class:`ParallelMLPs`.
      features: optional module (..., d) -> (..., F) (:class:`InputFeatures`); identity if None.
      envelope: optional module (..., d) -> (..., L) (:class:`Envelope`).
      gaussian_envelope: optional module (..., d) -> (..., 1) (:class:`GaussianEnvelope`).
      boundary_mask: optional callable ``x (d,) -> scalar`` multiplying every output (a Dirichlet
        box: :func:`dirichlet_box_mask`). It is static (part of the graph, not of the params).
    """

    def __init__(
        self,
        body: nnx.Module,
        *,
        features: nnx.Module | None = None,
        envelope: nnx.Module | None = None,
        gaussian_envelope: nnx.Module | None = None,
        boundary_mask: Callable[[Array], Array] | None = None,
    ):
        if boundary_mask is not None and not callable(boundary_mask):
            raise ValueError(
                f"boundary_mask must be None or a callable x -> scalar, got {boundary_mask!r}"
            )
        self.body = body
        self.features = features
        self.envelope = envelope
        self.gaussian_envelope = gaussian_envelope
        self.boundary_mask = boundary_mask

    def __call__(self, x: Array) -> Array:
        out = self.body(x if self.features is None else self.features(x))
        if self.envelope is not None:
            out = out * self.envelope(x)
        if self.gaussian_envelope is not None:
            out = out * self.gaussian_envelope(x)
        if self.boundary_mask is not None:
            # The mask is written per point; vectorize lets a (B, d) input work too.
            mask = jnp.vectorize(self.boundary_mask, signature="(d)->()")(x)
            out = out * mask[..., None]
        return out


def eigenfunction_network(
    dim: int,
    L: int,
    *,
    architecture: str = "parallel",
    hidden: Sequence[int] | None = None,
    activation: Activation = jax.nn.softplus,
    fourier_features: tuple[int, float] | None = None,
    radial_input: bool = False,
    periodic: bool | float | Sequence[float] = False,
    envelope: str | None = None,
    envelope_decay: float | Sequence[float] = 1.0,
    gaussian_envelope: tuple[Any, Any] | None = None,
    boundary_mask: Callable[[Array], Array] | None = None,
    input_center: float | Sequence[float] | None = None,
    input_scale: float | Sequence[float] | None = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> EigenfunctionNetwork:
    """Build the usual eigenfunction network: (dim,) -> (L,).

    Args:
      dim: input dimension d.
      L: L.
      architecture: ``"parallel"`` (L independent MLPs, default hidden (32, 32, 32); sequential nesting)
        or ``"shared"`` (one MLP with L outputs, default hidden (64, 64, 64); joint nesting).
      hidden: hidden layer widths.
      fourier_features: ``None`` or ``(num, scale)``: frozen ``[sin(Bx), cos(Bx)]``,
        ``B ~ N(0, scale^2)`` of shape (num, d).
      radial_input: append the radius (stable at 0) to the features (Coulomb cusp); of the
        standardised input when ``input_scale``/``input_center`` are given.
      periodic: ``True`` (period 2 pi), a period, or per-axis periods: embed x as (cos, sin).
      envelope: ``None``, ``"fixed"`` or ``"learnable"``: multiply output i by ``exp(-|x|/a_i)``.
      envelope_decay: the length(s) ``a_i`` (scalar or (L,)); initial value if learnable.
      gaussian_envelope: ``None`` or ``(M, b)``: multiply every output by
        ``exp(-x^T M x / 2 + b^T x)`` (:func:`gaussian_envelope_for_network`).
      boundary_mask: callable ``x -> scalar`` multiplying all outputs (Dirichlet problems).
      input_center, input_scale: the MLP sees ``(x - input_center) / input_scale``.
      param_dtype: dtype of parameters and frozen features (float64 needs ``jax.enable_x64``).
      rngs: ``nnx.Rngs``; parameters and Fourier frequencies use its ``params`` stream.

    Raises:
      ValueError: on an unknown ``architecture``/``envelope``, non-positive sizes, or an envelope /
        radial input combined with periodic inputs.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}: expected one of {ARCHITECTURES}")
    if envelope not in ENVELOPES:
        raise ValueError(f"unknown envelope {envelope!r}: expected one of {ENVELOPES}")
    check_positive_int("dim", dim)
    check_positive_int("L (the number of functions)", L)
    # Validate everything before building anything (building draws random numbers).
    if hidden is None:
        hidden = (32, 32, 32) if architecture == "parallel" else (64, 64, 64)
    hidden = check_hidden_widths("hidden", hidden)
    _check_activation(activation)
    check_input_options(periodic=periodic, radial_input=radial_input, envelope=envelope)
    if envelope is not None:
        _decay_lengths(envelope_decay, L)
    if boundary_mask is not None and not callable(boundary_mask):
        raise ValueError(
            f"boundary_mask must be None or a callable x -> scalar, got {boundary_mask!r}"
        )
    if gaussian_envelope is not None and (
            len(gaussian_envelope) != 2 or np.shape(gaussian_envelope[0]) != (dim, dim)
            or np.shape(gaussian_envelope[1]) != (dim,)):
        raise ValueError(f"gaussian_envelope must be (M (d, d), b (d,)) with d = {dim}; got "
                         f"shapes {[np.shape(v) for v in gaussian_envelope]}.")
    features = InputFeatures(
        dim,
        periodic=periodic,
        fourier_features=fourier_features,
        radial_input=radial_input,
        input_center=input_center,
        input_scale=input_scale,
        param_dtype=param_dtype,
        rngs=rngs,
    )
    if architecture == "parallel":
        body = ParallelMLPs(
            features.out_features,
            L,
            hidden=hidden,
            activation=activation,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    else:
        body = MLP(
            features.out_features,
            L,
            hidden=hidden,
            activation=activation,
            param_dtype=param_dtype,
            rngs=rngs,
        )
    env = None
    if envelope is not None:
        env = Envelope(
            L,
            envelope_decay,
            learnable=envelope == "learnable",
            param_dtype=param_dtype,
        )
    gaussian = None
    if gaussian_envelope is not None:
        gaussian = GaussianEnvelope(*gaussian_envelope, param_dtype=param_dtype)
    return EigenfunctionNetwork(body, features=features, envelope=env, gaussian_envelope=gaussian,
                                boundary_mask=boundary_mask)


# --------------------------------------------------------------------------- pure-function bridge


def to_apply(module: nnx.Module) -> tuple[Callable[[Any, Array], Array], dict]:
    """Turn a module into ``(apply, params)`` with ``apply(params, x) == module(x)``.

    ``params`` is a plain nested ``dict`` of the module's ``nnx.Param`` arrays (a copy of their
    current values). Everything else (graph structure, :class:`Frozen` features, static
    callables) is captured by ``apply`` as constants, so gradients and optimizers only ever see
    the trainable parameters. ``apply`` is pure: it rebuilds the module from ``params`` at trace
    time (``nnx.merge``), so it composes with ``jit``, ``grad``, ``jvp`` and ``vmap`` (over x or
    over stacked params). ``apply`` holds a snapshot: later changes to ``module`` (its params
    or frozen state) do not affect it; use :func:`load_params` to write ``params`` back into
    the module.
    """
    # Split a clone: nnx.split shares Variable objects with the module, so without the copy an
    # in-place change to the module's frozen state would leak into apply (and only until jit
    # caches a trace).
    graphdef, param_state, rest = nnx.split(nnx.clone(module), nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)

    def apply(params: dict, x: Array) -> Array:
        return nnx.merge(graphdef, params, rest)(x)

    return apply, params


def load_params(module: nnx.Module, params: dict) -> nnx.Module:
    """Write a params dict from :func:`to_apply` back into ``module`` (in place); returns it."""
    nnx.update(module, params)
    return module
