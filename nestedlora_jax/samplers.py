"""Sampling densities ``p`` for the Monte Carlo inner products ``E_p[...]``.

Every sampler is a small frozen (hence hashable) dataclass, so it can be closed over in a jitted
function or passed as a static argument. Each has

- ``dim``: the dimension ``d`` of the points;
- ``sample(key, n, dtype=None) -> (n, d)``: ``n`` i.i.d. draws, in ``dtype`` (default: JAX's
  default float, float32 unless x64 is enabled);
- ``log_prob(x) -> ()``: ``log p(x)`` for ONE point ``x`` of shape ``(d,)`` (vmap for a batch),
  smooth enough to be differentiated twice where the density is smooth; computed in log space,
  never as ``log(exp(...))``, so it is finite far in the tails;
- ``num_uniforms`` and ``from_uniforms(u) -> (n, d)``: the inverse transform, which maps points
  ``u`` ``(n, num_uniforms)`` uniform on the unit cube to draws from ``p``. Lattice points
  (:mod:`nestedlora_jax.lattice`) go through it; ``sample`` does not (it keeps JAX's own draws).

The importance-weighted operators (``operators.py``) use ``u = log_prob / 2`` and
its first two derivatives; see each class for where its log-density is not smooth.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = [
    "Sampler",
    "GaussianSampler",
    "CorrelatedGaussianSampler",
    "LaplaceSampler",
    "UniformBoxSampler",
    "RadialExponentialMixture",
    "check_sampler_dim",
    "length_scale",
    "gaussian_mean_precision",
]


@runtime_checkable
class Sampler(Protocol):
    """What the operator and training code need from a sampling density."""

    dim: int

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:  # (n, dim)
        ...

    def log_prob(self, x: Array) -> Array:  # x (dim,) -> ()
        ...


# ---------------------------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------------------------


def _check_dim(dim: Any, cls: str) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"{cls}: dim must be a positive int; got {dim!r}.")


def _check_positive(value: Any, name: str, cls: str) -> None:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{cls}: {name} must be a finite number > 0; got {value!r}.")


def _as_tuple_or_float(value: Any, dim: int, name: str, cls: str):
    """A scalar stays a float; a sequence becomes a tuple of floats of length dim (hashable)."""
    if np.ndim(value) == 0:
        return float(value)
    values = tuple(float(v) for v in np.ravel(value))
    if len(values) != dim:
        raise ValueError(
            f"{cls}: {name} must be a scalar or have length dim={dim}; got {len(values)}."
        )
    return values


def _resolve_dtype(dtype: Any):
    # None -> the default float: float32, or float64 inside `with jax.enable_x64(True):`.
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64 if dtype is None else dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"sample: dtype must be a floating dtype; got {dtype}.")
    return dtype


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(
            f"sample: n must be a Python int >= 0 (it fixes an array shape); got {n!r}."
        )


def _check_uniforms(u: Array, k: int, cls: str) -> Array:
    u = jnp.asarray(u)
    if u.ndim != 2 or u.shape[1] != k:
        raise ValueError(f"{cls}.from_uniforms takes points of shape (n, {k}) in the unit cube; "
                         f"got shape {u.shape}.")
    if not jnp.issubdtype(u.dtype, jnp.floating):
        raise ValueError(f"{cls}.from_uniforms: u must be floating-point, got dtype {u.dtype}.")
    return u


class _OneUniformPerCoordinate:
    """For samplers whose inverse transform maps one uniform to each coordinate."""

    @property
    def num_uniforms(self) -> int:
        """Uniforms per point that ``from_uniforms`` takes: ``dim``."""
        return self.dim


def _check_point(x: Array, dim: int, cls: str) -> Array:
    x = jnp.asarray(x)
    if x.shape != (dim,):
        raise ValueError(
            f"{cls}.log_prob takes ONE point of shape ({dim},); got shape {x.shape}. "
            "vmap it over a batch."
        )
    return x


def check_sampler_dim(sampler: Any, dim: int) -> None:
    """Raises ValueError unless ``sampler`` is a :class:`Sampler` (``dim``, ``sample(key, n)``
    and ``log_prob(x)``) with ``sampler.dim == dim`` (e.g. a problem's dimension)."""
    if not isinstance(sampler, Sampler) or not callable(sampler.log_prob) \
            or not callable(sampler.sample):
        raise ValueError(
            f"expected a sampler with .dim, .sample(key, n) and .log_prob(x); got "
            f"{type(sampler).__name__}, which is not one."
        )
    if sampler.dim != dim:
        raise ValueError(
            f"sampler dimension mismatch: {type(sampler).__name__} draws points in {sampler.dim} "
            f"dimensions but the problem is {dim}-dimensional."
        )


def length_scale(sampler: Any) -> float:
    """The width of a sampler's density along its widest axis, for sizing grids that must cover
    where it puts its points: the ``scale`` of a :class:`GaussianSampler` or
    :class:`LaplaceSampler`; 1 for every other sampler (a problem that needs another grid
    overrides ``Problem.evaluation_radius``)."""
    if isinstance(sampler, (GaussianSampler, LaplaceSampler)):
        return float(np.max(sampler.scale))
    return 1.0


def gaussian_mean_precision(sampler: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(mean (d,), precision (d, d))`` of a Gaussian sampler (:class:`GaussianSampler`,
    :class:`CorrelatedGaussianSampler`), so that ``log p(x) = -(x - mean)^T precision
    (x - mean) / 2 + const``; ``None`` for every other sampler."""
    if isinstance(sampler, GaussianSampler):
        mean = np.broadcast_to(np.asarray(sampler.mean, np.float64), (sampler.dim,))
        return mean.copy(), np.eye(sampler.dim) / sampler.scale**2
    if isinstance(sampler, CorrelatedGaussianSampler):
        mean = np.broadcast_to(np.asarray(sampler.mean, np.float64), (sampler.dim,))
        inverse_chol = np.asarray(sampler._inverse_cholesky, np.float64)
        precision = inverse_chol.T @ inverse_chol
        return mean.copy(), (precision + precision.T) / 2
    return None


# ---------------------------------------------------------------------------------------------
# Product densities.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GaussianSampler(_OneUniformPerCoordinate):
    """Isotropic Gaussian ``N(mean, scale^2 I)`` in ``dim`` dimensions.

    ``log p(x) = -|x - mean|^2 / (2 scale^2) - d log(scale) - (d/2) log(2 pi)``.
    ``mean`` is a scalar (same in every coordinate) or a length-``dim`` sequence.
    """

    dim: int
    scale: float = 1.0
    mean: Any = 0.0

    def __post_init__(self):
        _check_dim(self.dim, "GaussianSampler")
        _check_positive(self.scale, "scale", "GaussianSampler")
        object.__setattr__(self, "scale", float(self.scale))
        mean = _as_tuple_or_float(self.mean, self.dim, "mean", "GaussianSampler")
        object.__setattr__(self, "mean", mean)

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:
        """``n`` draws, shape ``(n, dim)``."""
        _check_n(n)
        dtype = _resolve_dtype(dtype)
        z = jax.random.normal(key, (n, self.dim), dtype=dtype)
        return jnp.asarray(self.mean, dtype) + self.scale * z

    def from_uniforms(self, u: Array) -> Array:
        """``mean + scale * Phi^{-1}(u)``: ``u`` ``(n, dim)`` uniform on the cube -> draws
        ``(n, dim)`` (``Phi`` the standard normal CDF)."""
        u = _check_uniforms(u, self.num_uniforms, "GaussianSampler")
        return jnp.asarray(self.mean, u.dtype) + self.scale * jax.scipy.special.ndtri(u)

    def log_prob(self, x: Array) -> Array:
        """``log p(x)`` for one point ``x`` ``(dim,)``; returns a scalar."""
        x = _check_point(x, self.dim, "GaussianSampler")
        z = (x - jnp.asarray(self.mean, x.dtype)) / self.scale
        const = self.dim * (math.log(self.scale) + 0.5 * math.log(2 * math.pi))
        return -0.5 * jnp.sum(z * z) - const


def _symmetric_positive_definite(matrix: Any, dim: int, name: str, cls: str) -> np.ndarray:
    """``matrix`` as a float64 ``(dim, dim)`` array, after checking it is symmetric positive
    definite (ValueError saying which property fails otherwise)."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (dim, dim):
        raise ValueError(f"{cls}: {name} must have shape ({dim}, {dim}); got {m.shape}.")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{cls}: {name} has non-finite entries.")
    asym = np.max(np.abs(m - m.T))
    if asym > 1e-10 * max(1.0, np.max(np.abs(m))):
        raise ValueError(
            f"{cls}: {name} must be symmetric; max |M - M^T| = {asym:.3g}. "
            "Pass (M + M.T) / 2 if the asymmetry is round-off."
        )
    lowest = np.linalg.eigvalsh((m + m.T) / 2)[0]
    if lowest <= 0:
        raise ValueError(
            f"{cls}: {name} must be positive definite; its smallest eigenvalue is {lowest:.3g}."
        )
    return (m + m.T) / 2


def _as_matrix_tuple(m: np.ndarray) -> tuple:
    return tuple(tuple(float(v) for v in row) for row in m)


@dataclasses.dataclass(frozen=True)
class CorrelatedGaussianSampler(_OneUniformPerCoordinate):
    """Gaussian ``N(mean, Sigma)`` with a full covariance, ``x = mean + C z``, ``C C^T = Sigma``
    (Cholesky), ``z ~ N(0, I)``.

    ``log p(x) = -|C^{-1}(x - mean)|^2 / 2 - sum_i log C_ii - (d/2) log(2 pi)``.
    For anisotropic problems (e.g. a coupled oscillator) whose eigenfunctions decay at a
    different rate along each principal axis: matching ``Sigma`` to them keeps the variance of
    the importance-weighted estimates from growing exponentially with ``d``.
    """

    dim: int
    covariance: Any
    mean: Any = 0.0
    _cholesky: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)
    _inverse_cholesky: np.ndarray = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_dim(self.dim, "CorrelatedGaussianSampler")
        cov = _symmetric_positive_definite(
            self.covariance, self.dim, "covariance", "CorrelatedGaussianSampler"
        )
        object.__setattr__(self, "covariance", _as_matrix_tuple(cov))
        mean = _as_tuple_or_float(self.mean, self.dim, "mean", "CorrelatedGaussianSampler")
        object.__setattr__(self, "mean", mean)
        chol = np.linalg.cholesky(cov)
        object.__setattr__(self, "_cholesky", chol)
        object.__setattr__(self, "_inverse_cholesky", np.linalg.inv(chol))

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:
        """``n`` draws, shape ``(n, dim)``."""
        _check_n(n)
        dtype = _resolve_dtype(dtype)
        z = jax.random.normal(key, (n, self.dim), dtype=dtype)
        return jnp.asarray(self.mean, dtype) + z @ jnp.asarray(self._cholesky.T, dtype)

    def from_uniforms(self, u: Array) -> Array:
        """``mean + C Phi^{-1}(u)``: ``u`` ``(n, dim)`` uniform on the cube -> draws ``(n, dim)``."""
        u = _check_uniforms(u, self.num_uniforms, "CorrelatedGaussianSampler")
        z = jax.scipy.special.ndtri(u)
        return jnp.asarray(self.mean, u.dtype) + z @ jnp.asarray(self._cholesky.T, u.dtype)

    def log_prob(self, x: Array) -> Array:
        """``log p(x)`` for one point ``x`` ``(dim,)``; returns a scalar."""
        x = _check_point(x, self.dim, "CorrelatedGaussianSampler")
        z = jnp.asarray(self._inverse_cholesky, x.dtype) @ (x - jnp.asarray(self.mean, x.dtype))
        const = float(np.sum(np.log(np.diag(self._cholesky)))) + 0.5 * self.dim * math.log(2 * math.pi)
        return -0.5 * jnp.sum(z * z) - const


@dataclasses.dataclass(frozen=True)
class LaplaceSampler(_OneUniformPerCoordinate):
    """Product of centred 1-D Laplace densities, ``p(x) = prod_i exp(-|x_i| / b) / (2 b)``.

    ``log p(x) = -sum_i |x_i| / b - d log(2 b)``, ``b = scale``. Heavier (exponential) tails than
    a Gaussian. Caveat for importance weighting: ``sqrt(p)`` has a kink on every plane
    ``x_i = 0``; autodiff sees the Laplacian of ``u = log p / 2`` as zero there, i.e. it misses the
    surface delta ``-(1/b) delta(x_i)`` of the distributional Laplacian. The weighted operator
    is then exact only for functions ``psi = sqrt(p) f`` whose kink is physical; prefer a smooth
    density (Gaussian, uniform) for importance-weighted differential operators.
    """

    dim: int
    scale: float = 1.0

    def __post_init__(self):
        _check_dim(self.dim, "LaplaceSampler")
        _check_positive(self.scale, "scale", "LaplaceSampler")
        object.__setattr__(self, "scale", float(self.scale))

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:
        """``n`` draws, shape ``(n, dim)``."""
        _check_n(n)
        dtype = _resolve_dtype(dtype)
        return self.scale * jax.random.laplace(key, (n, self.dim), dtype=dtype)

    def from_uniforms(self, u: Array) -> Array:
        """The inverse CDF per coordinate, ``-b sign(u - 1/2) log(1 - 2 |u - 1/2|)``: ``u``
        ``(n, dim)`` uniform on the cube -> draws ``(n, dim)``."""
        u = _check_uniforms(u, self.num_uniforms, "LaplaceSampler")
        c = u - 0.5
        return -self.scale * jnp.sign(c) * jnp.log1p(-2.0 * jnp.abs(c))

    def log_prob(self, x: Array) -> Array:
        """``log p(x)`` for one point ``x`` ``(dim,)``; returns a scalar."""
        x = _check_point(x, self.dim, "LaplaceSampler")
        return -jnp.sum(jnp.abs(x)) / self.scale - self.dim * math.log(2 * self.scale)


@dataclasses.dataclass(frozen=True)
class UniformBoxSampler(_OneUniformPerCoordinate):
    """Uniform density on the box ``[low, high]^d``: ``log p = -d log(high - low)`` inside,
    ``-inf`` outside (so it integrates to one). Its log-density is constant on the box, so the
    importance-weighted operator equals the plain one there.
    """

    low: float
    high: float
    dim: int

    def __post_init__(self):
        _check_dim(self.dim, "UniformBoxSampler")
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise ValueError(
                "UniformBoxSampler: need finite low < high; "
                f"got low={self.low!r}, high={self.high!r}."
            )
        object.__setattr__(self, "low", float(self.low))
        object.__setattr__(self, "high", float(self.high))

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:
        """``n`` draws, shape ``(n, dim)``, in ``[low, high)``."""
        _check_n(n)
        dtype = _resolve_dtype(dtype)
        shape = (n, self.dim)
        return jax.random.uniform(key, shape, dtype=dtype, minval=self.low, maxval=self.high)

    def from_uniforms(self, u: Array) -> Array:
        """``low + (high - low) u``: ``u`` ``(n, dim)`` uniform on the cube -> draws ``(n, dim)``."""
        u = _check_uniforms(u, self.num_uniforms, "UniformBoxSampler")
        return self.low + (self.high - self.low) * u

    def log_prob(self, x: Array) -> Array:
        """``log p(x)`` for one point ``x`` ``(dim,)``; returns a scalar (``-inf`` off the box)."""
        x = _check_point(x, self.dim, "UniformBoxSampler")
        inside = jnp.all((x >= self.low) & (x <= self.high))
        value = -self.dim * math.log(self.high - self.low)
        return jnp.where(inside, jnp.asarray(value, x.dtype), -jnp.inf)


# ---------------------------------------------------------------------------------------------
# Radial mixture for Coulomb problems.
# ---------------------------------------------------------------------------------------------


def _sphere_area(dim: int) -> float:
    """Surface area of the unit sphere S^{d-1}: 2 pi^{d/2} / Gamma(d/2) (2 in 1-D)."""
    return 2.0 * math.pi ** (dim / 2) / math.gamma(dim / 2)


@dataclasses.dataclass(frozen=True)
class RadialExponentialMixture:
    """Radial mixture of exponentials (Gamma laws in ``r = |x|``) with uniform direction.

    The radius is drawn from ``sum_k pi_k Gamma(shape, a_k)``, i.e. with density
    ``rho(r) = sum_k pi_k r^{shape-1} exp(-r / a_k) / (Gamma(shape) a_k^shape)``, and the
    direction uniformly on the sphere, so

        p(x) = sum_k pi_k exp(-r / a_k) r^{shape-d} / (Gamma(shape) a_k^shape |S^{d-1}|),

    ``|S^{d-1}| = 2 pi^{d/2} / Gamma(d/2)`` (2 pi in 2-D, 4 pi in 3-D). The default
    ``shape = d - 1`` gives a density ``~ 1/r`` at the origin in every dimension; in 2-D this is
    ``p(x) = sum_k pi_k exp(-r/a_k) / (2 pi a_k r)`` (r ~ Exponential(a_k)), which keeps the
    variance of ``psi V psi / p`` bounded for a Coulomb ``V = -Z/r`` when the network represents
    ``psi`` itself. ``shape = d`` gives a density that is finite at the origin with a cusp,
    ``p(x) = sum_k pi_k exp(-r/a_k) / ((d-1)! a_k^d |S^{d-1}|)``, i.e. ``sqrt(p)`` behaves like
    a hydrogen orbital: this is the right choice when the network represents ``psi / sqrt(p)``
    (importance weighting) because then ``sqrt(p) f`` is a finite-energy function
    for every smooth ``f``; with ``shape < d`` and ``f(0) != 0``, ``sqrt(p) f ~ r^{(shape-d)/2}``
    has infinite kinetic energy and the estimate of ``<f, T_p f>`` has infinite mean.

    ``log_prob`` uses ``logsumexp`` over components. Sampling: pick a component, draw
    ``r ~ Gamma(shape, a_k)``, clamp ``r >= r_min = 1e-6 * min(a_k)`` (a float32 draw can be
    exactly 0; no sample may sit on the nucleus), multiply a uniform direction. So every sample
    is finite, has ``|x| >= r_min`` (up to rounding) and a finite ``log_prob``. Exponentials are
    drawn as ``-log(1 - U)``; in float32 the resolution of ``U`` caps each at ``~16.6 a_k`` (the
    mass beyond is ``e^{-16.6} ~ 6e-8``: negligible for training; use float64 for tail studies).

    Args:
      dim: dimension d >= 2.
      scales: the length scales ``a_k > 0``.
      weights: mixture weights ``pi_k >= 0`` (normalised here); default uniform.
      shape: Gamma shape, a number > 0; default ``dim - 1``.
    """

    dim: int
    scales: tuple = (1.0,)
    weights: Any = None
    shape: Any = None

    def __post_init__(self):
        cls = "RadialExponentialMixture"
        _check_dim(self.dim, cls)
        if self.dim < 2:
            raise ValueError(
                f"{cls}: dim must be >= 2 (a radial density in 1-D is a Laplace); got {self.dim}."
            )
        scales = tuple(float(a) for a in np.ravel(self.scales))
        if not scales or not all(np.isfinite(a) and a > 0 for a in scales):
            raise ValueError(
                f"{cls}: scales must be a non-empty sequence of finite numbers > 0; "
                f"got {self.scales!r}."
            )
        if self.weights is None:
            weights = tuple(1.0 / len(scales) for _ in scales)
        else:
            w = np.asarray(self.weights, dtype=np.float64).ravel()
            valid = np.all(np.isfinite(w)) and np.all(w >= 0) and w.sum() > 0
            if w.shape != (len(scales),) or not valid:
                raise ValueError(
                    f"{cls}: weights must be {len(scales)} finite numbers >= 0 with a positive sum "
                    f"(one per scale); got {self.weights!r}."
                )
            weights = tuple(float(v) for v in w / w.sum())
        shape = float(self.dim - 1 if self.shape is None else self.shape)
        _check_positive(shape, "shape", cls)
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "shape", shape)

    @property
    def r_min(self) -> float:
        """Smallest radius a sample can have (samples are clamped to it)."""
        return 1e-6 * min(self.scales)

    def sample(self, key: Array, n: int, dtype: Any = None) -> Array:
        """``n`` draws, shape ``(n, dim)``; every draw has ``|x| >= r_min``."""
        _check_n(n)
        dtype = _resolve_dtype(dtype)
        integer_shape = float(self.shape).is_integer() and self.shape <= 8
        k = int(self.shape) if integer_shape else 0
        m = 2 * ((self.dim + 1) // 2)  # uniforms for the Box-Muller normals of the direction
        # One uniform draw supplies everything (one PRNG kernel: cheap to compile): column 0 picks
        # the component (inverse CDF of the weights); for an integer shape k the next k give
        # Gamma(k, 1) = sum of k Exponential(1) = -sum log(1 - U); the last m give normals by
        # Box-Muller, normalised to a uniform direction.
        u = jax.random.uniform(key, (n, 1 + k + m), dtype=dtype)
        cum = jnp.asarray(np.cumsum(self.weights)[:-1], dtype)
        comp = jnp.sum(u[:, :1] >= cum[None, :], axis=-1)
        a = jnp.asarray(self.scales, dtype)[comp]
        if integer_shape:
            r = a * jnp.sum(-jnp.log1p(-u[:, 1 : 1 + k]), axis=-1)
        else:
            r = a * jax.random.gamma(jax.random.fold_in(key, 1), self.shape, (n,), dtype=dtype)
        # A float32 draw can be exactly 0: keep every sample off the nucleus.
        r = jnp.maximum(r, jnp.asarray(self.r_min, dtype))
        u1, u2 = u[:, 1 + k :: 2], u[:, 2 + k :: 2]
        radius = jnp.sqrt(-2.0 * jnp.log1p(-u1))  # 1 - U in (0, 1]: finite
        angle = 2.0 * jnp.pi * u2
        v = jnp.concatenate([radius * jnp.cos(angle), radius * jnp.sin(angle)], axis=-1)
        v = v[:, : self.dim]
        norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
        # v = 0 has probability ~0 (every u1 exactly 0), but guard anyway: use e_1 then.
        e1 = jnp.zeros((self.dim,), dtype).at[0].set(1)
        direction = jnp.where(norm > 0, v / jnp.where(norm > 0, norm, 1), e1)
        return r[:, None] * direction

    @property
    def num_uniforms(self) -> int:
        """Uniforms per point that :meth:`from_uniforms` takes: one for the radius, then the
        direction's: 1 in 2-D (the angle), 2 in 3-D, ``dim`` beyond (normal coordinates)."""
        return 1 + {2: 1, 3: 2}.get(self.dim, self.dim)

    def radial_survival(self, r: Array) -> Array:
        """``P(|x| > r) = sum_k pi_k Q(shape, r / a_k)`` (``Q`` the regularised upper incomplete
        gamma function), elementwise."""
        a = jnp.asarray(self.scales, r.dtype)
        w = jnp.asarray(self.weights, r.dtype)
        t = r[..., None] / a
        if float(self.shape).is_integer():
            # Q(k, t) = exp(-t) sum_{i < k} t^i / i!: a few flops where gammaincc iterates
            # (about 25x faster for a batch of moment samples).
            term, total = jnp.ones_like(t), jnp.ones_like(t)
            for i in range(1, int(self.shape)):
                term = term * t / i
                total = total + term
            q = jnp.exp(-t) * total
        else:
            q = jax.scipy.special.gammaincc(jnp.asarray(self.shape, r.dtype), t)
        return jnp.sum(w * q, -1)

    def from_uniforms(self, u: Array) -> Array:
        """The inverse transform: ``u`` ``(n, num_uniforms)`` uniform on the cube -> draws
        ``(n, dim)``, every one with ``|x| >= r_min``.

        The radius solves ``radial_survival(r) = 1 - u_0`` (bisection in ``log r`` to the
        dtype's precision; the mixture has no closed-form inverse). The direction: angle
        ``2 pi u_1`` in 2-D; ``cos theta = 1 - 2 u_1``, ``phi = 2 pi u_2`` in 3-D; beyond,
        the normalised ``Phi^{-1}(u_1..u_d)``. Unlike :meth:`sample`, one draw's radius depends
        smoothly on ``u_0``, which is what lattice points need.
        """
        u = _check_uniforms(u, self.num_uniforms, "RadialExponentialMixture")
        dtype = u.dtype
        target = 1.0 - u[:, 0]
        # Q(shape, shape + 50) < 1e-17: below any target a float64 uniform can give.
        lo = jnp.full(target.shape, math.log(self.r_min), dtype)
        hi = jnp.full(target.shape, math.log(max(self.scales) * (self.shape + 50.0)), dtype)
        iterations = jnp.finfo(dtype).nmant + 6  # the log-radius range is < 2^6 wide

        def bisect(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            beyond = self.radial_survival(jnp.exp(mid)) > target  # the root lies above mid
            return jnp.where(beyond, mid, lo), jnp.where(beyond, hi, mid)

        lo, hi = jax.lax.fori_loop(0, iterations, bisect, (lo, hi))
        r = jnp.maximum(jnp.exp(0.5 * (lo + hi)), jnp.asarray(self.r_min, dtype))
        if self.dim == 2:
            angle = 2.0 * jnp.pi * u[:, 1]
            direction = jnp.stack([jnp.cos(angle), jnp.sin(angle)], -1)
        elif self.dim == 3:
            c = 1.0 - 2.0 * u[:, 1]
            s = jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
            phi = 2.0 * jnp.pi * u[:, 2]
            direction = jnp.stack([s * jnp.cos(phi), s * jnp.sin(phi), c], -1)
        else:
            v = jax.scipy.special.ndtri(u[:, 1:])
            direction = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        return r[:, None] * direction

    def log_prob(self, x: Array) -> Array:
        """``log p(x)`` for one point ``x`` ``(dim,)``; returns a scalar.

        ``r`` is clamped below at ``r_min`` (so ``log p`` is finite and differentiable at the
        origin too); this only changes ``p`` on a ball no sample can reach.
        """
        x = _check_point(x, self.dim, "RadialExponentialMixture")
        r2 = jnp.sum(x * x)
        r2_min = jnp.asarray(self.r_min**2, x.dtype)
        # Double-where: the clamped branch has a zero (not NaN) gradient at the origin.
        r = jnp.sqrt(jnp.where(r2 > r2_min, r2, r2_min))
        log_w = np.log(np.asarray(self.weights)) - self.shape * np.log(np.asarray(self.scales))
        inv_a = 1.0 / np.asarray(self.scales)
        terms = jnp.asarray(log_w, x.dtype) - r * jnp.asarray(inv_a, x.dtype)
        const = math.lgamma(self.shape) + math.log(_sphere_area(self.dim))
        return jax.nn.logsumexp(terms) + (self.shape - self.dim) * jnp.log(r) - const
