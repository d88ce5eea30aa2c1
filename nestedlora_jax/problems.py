"""Schrödinger problems with exact answers.

Every problem is a frozen dataclass deriving from ``Problem``; its Hamiltonian is
``H = -kinetic * Lap + V`` with ``kinetic = 1`` (no 1/2, as in the paper). A problem provides

- ``dim``; ``potential(x) -> ()`` for one point ``x`` ``(dim,)``;
- ``energies(L) -> np.ndarray (L,)``: the exact ``L`` lowest energies, ascending, float64
  (``NotImplementedError`` where the spectrum is unknown; ``known_energies(L)`` is then ``None``);
- ``degenerate_blocks(L)``: half-open ``(start, stop)`` index ranges of the degenerate levels among
  the first ``L`` states (the last one truncated at ``L``);
- ``eigenfunctions(x, L) -> (L,)``: the exact real eigenfunctions, normalised in ``L2(dx)``, at
  one point, in the order of ``energies`` (``NotImplementedError`` where there is no closed form;
  ``has_eigenfunctions(L)`` says which);
- ``default_sampler(L)`` and ``operator_scaling(L) -> (scale, shift)``: the recommended sampling
  density and the scaling of ``T = scale * (-H) + shift`` for learning the ``L`` lowest states
  (they become ``T``'s top positive eigenvalues ``t_i = shift - scale * E_i``, ``t_1 = 1``);
- ``boundary_mask``: ``None``, or (Dirichlet problems) a function of one point, smooth, positive
  inside the domain and zero on its boundary, that the network output is multiplied by;
- ``periodic``: whether the domain is a periodic box (then the network must be periodic);
  ``box``: ``(low, high)`` of the box ``[low, high]^d`` (well, cosine) or ``None`` on ``R^d``;
- ``network_hints()``: what the default network needs to know (:class:`NetworkHints`: radial
  input, periodic inputs, the boundary mask, the input standardization, the Gaussian envelope);
- ``gaussian_envelope()``: ``None``, or ``(center, precision)`` when every wanted state decays
  like ``exp(-(x - center)^T precision (x - center) / 2)`` times a polynomial (harmonic
  confinement): the default network then carries that factor and learns only the rest;
- ``quadrature_grid(L, num, sampler=None)`` (d <= 2) and ``evaluation_radius(L)``: the grid
  evaluation integrates on;
- ``grid_radius(L)``, ``slice_plane(L)``, ``describe()``: the finite-difference box, the plotted
  slice and the one-line description the benchmarks use.

Each capability has a default in ``Problem``; a problem overrides what it knows better. The
generic modules (``operators``, ``evaluation``, ``solver``, ``grid_baseline``) only call these
methods: none of them names a concrete problem class or looks for an attribute by ``getattr``.

Adding a problem: subclass ``Problem`` as a frozen dataclass and implement ``potential``,
``default_sampler``, and ``energies`` / ``eigenfunctions`` if known (``_lowest_states`` does the
bookkeeping for separable problems); override the other methods where the defaults do not fit.
An object that is not a ``Problem`` is refused by the generic entry points with a ValueError
(:func:`check_problem`) rather than half-used.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax._checks import check_choice, check_num_states, check_positive_float
from nestedlora_jax.samplers import (
    CorrelatedGaussianSampler,
    GaussianSampler,
    RadialExponentialMixture,
    UniformBoxSampler,
    _as_matrix_tuple,
    _symmetric_positive_definite,
    length_scale,
)

Array = jax.Array

__all__ = [
    "Problem",
    "NetworkHints",
    "check_problem",
    "HarmonicOscillator",
    "CoupledOscillator",
    "Hydrogen",
    "hydrogen_tail_radius",
    "InfiniteWell",
    "CosinePotential",
    "HAN_LU_ZHOU_COEFFICIENTS",
    "HAN_LU_ZHOU_COEFFICIENTS_5D",
    "HAN_LU_ZHOU_COEFFICIENTS_10D",
]

HAN_LU_ZHOU_COEFFICIENTS = (0.814723686393179, 0.905791937075619)
# Han, Lu, Zhou (J. Comput. Phys. 2020) in d = 5 and 10, as in the public NeuralSVD code; exact
# ground energies -0.054018930536326 and -0.098087448866409.
HAN_LU_ZHOU_COEFFICIENTS_5D = (
    0.162944737278636, 0.181158387415124, 0.025397363258701, 0.182675171227804, 0.126471849245082,
)
HAN_LU_ZHOU_COEFFICIENTS_10D = HAN_LU_ZHOU_COEFFICIENTS_5D + (
    0.019508080999882, 0.055699643773410, 0.109376303840997, 0.191501367086860, 0.192977707039855,
)

# Two energies closer than this (relative to max(1, |E|)) belong to one degenerate level.
_DEGENERACY_RTOL = 1e-10


# ---------------------------------------------------------------------------------------------
# Shared helpers.
# ---------------------------------------------------------------------------------------------


def _check_dim(dim: Any, cls: str, allowed: tuple[int, ...] | None = None) -> None:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"{cls}: dim must be a positive int; got {dim!r}.")
    if allowed is not None:
        check_choice(f"{cls}: dim", dim, allowed)


def _check_point(x: Array, dim: int, cls: str) -> Array:
    x = jnp.asarray(x)
    if x.shape != (dim,):
        raise ValueError(
            f"{cls} takes ONE point of shape ({dim},); got shape {x.shape}. vmap over a batch."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{cls}: x must be floating (float32 or float64); got {x.dtype}.")
    return x


def _safe_radius(x: Array) -> Array:
    """``|x|`` clamped below at ``sqrt(finfo.tiny)`` (1e-19 in float32, 1e-154 in float64).

    Finite and with a finite (zero) gradient at the origin, so ``exp(-k r)`` and polynomials in
    ``r`` are smooth there, and exact wherever ``|x|^2`` is a normal number. NaN stays NaN (the
    clamp must not turn a broken input into a valid-looking point). Not for ``1 / r``: see
    ``Hydrogen.potential``.
    """
    r2 = jnp.sum(x * x)
    floor = jnp.asarray(jnp.finfo(x.dtype).tiny, x.dtype)
    # Double-where: the clamped branch is constant, so its gradient is 0 rather than NaN.
    return jnp.sqrt(jnp.where(r2 < floor, floor, r2))


def _blocks_from_energies(energies: np.ndarray) -> list[tuple[int, int]]:
    blocks, start = [], 0
    for i in range(1, len(energies) + 1):
        if i == len(energies) or abs(energies[i] - energies[i - 1]) > _DEGENERACY_RTOL * max(
            1.0, abs(energies[i - 1])
        ):
            blocks.append((start, i))
            start = i
    return blocks


def _lowest_states(spectrum: Callable[[int, int], np.ndarray], dim: int, L: int):
    """The ``L`` lowest sums ``sum_k s_k[m_k]`` of ``dim`` sorted 1-D spectra (separable problems).

    ``spectrum(k, count)`` returns the lowest ``count`` 1-D values of coordinate ``k`` (ascending,
    strictly increasing); it may return fewer if no more are available (then a ValueError is
    raised if more could be needed). Integer spectra give exact ties. Ties are ordered by the
    multi-index, lexicographically. Returns ``(values (L,), indices (L, dim) int)``.

    Coordinates are added one at a time, keeping only the partial sums up to the ``L``-th
    lowest (and its ties): a partial sum with ``L`` lower ones cannot start one of the ``L``
    lowest totals, since each of the lower ones completes the same way to a lower total. For
    the same reason no coordinate uses a mode beyond its ``L``-th. Cost ``O(d L^2 log L)``, so
    d = 100 is as cheap as d = 2 (enumerating a tensor grid of modes would be ``c^d``).
    """
    axes = [np.asarray(spectrum(k, L), dtype=np.float64) for k in range(dim)]
    values = np.zeros(1)
    index = np.zeros((1, 0), dtype=int)
    for s in axes:
        cand = (values[:, None] + s[None, :]).ravel()
        cidx = np.concatenate(
            [np.repeat(index, len(s), axis=0), np.tile(np.arange(len(s)), len(values))[:, None]],
            axis=1,
        )
        if len(cand) > L:
            bound = np.partition(cand, L - 1)[L - 1]
            keep = cand <= bound + 1e-12 * max(1.0, abs(float(bound)))  # float spectra: near-ties
            cand, cidx = cand[keep], cidx[keep]
        values, index = cand, cidx
    if len(values) < L:
        raise ValueError(
            f"L={L} exceeds the number of states this problem can compute accurately "
            f"(its exact eigenvalue list is finite)."
        )
    # lexsort: last key is primary -> sort by value, ties by the multi-index (first coordinate
    # most significant).
    order = np.lexsort(tuple(index[:, k] for k in reversed(range(dim))) + (values,))[:L]
    values, index = values[order], index[order]
    bound = values[-1]
    lows = sum(s[0] for s in axes)
    for k, s in enumerate(axes):
        # A mode beyond the available ones exceeds s[-1]: it could belong among the L lowest
        # only if s[-1] (with the other coordinates at their ground modes) is not above the bound.
        if len(s) < L and s[-1] + (lows - s[0]) <= bound:
            raise ValueError(
                f"L={L} exceeds the number of states this problem can compute accurately."
            )
    return values, index


def _tensor_gauss_legendre(lo, hi, num: int) -> tuple[np.ndarray, np.ndarray]:
    """Tensor Gauss-Legendre rule on the box ``prod_k [lo_k, hi_k]`` with ``num`` nodes per
    axis: ``(points (num^d, d), dx-weights (num^d,))``, C order (last axis fastest)."""
    nodes, weights = np.polynomial.legendre.leggauss(num)
    axes = [0.5 * (h - l) * (nodes + 1.0) + l for l, h in zip(lo, hi)]
    ws = [0.5 * (h - l) * weights for l, h in zip(lo, hi)]
    grids = np.meshgrid(*axes, indexing="ij")
    points = np.stack([g.reshape(-1) for g in grids], axis=-1)
    w = ws[0]
    for extra in ws[1:]:
        w = np.outer(w, extra).reshape(-1)
    return points, w


@dataclasses.dataclass(frozen=True)
class NetworkHints:
    """What a problem asks of the network that represents its eigenfunctions
    (:func:`~nestedlora_jax.solver.default_network` uses it where ``NetworkConfig`` leaves a
    choice open).

    Attributes:
      radial_input: feed ``|x|`` to the network beside ``x`` (Coulomb problems: the cusp at
        the nucleus is a function of the radius).
      periodic: the domain is a periodic box, so the network's inputs must be periodic.
      boundary_mask: ``None``, or a function of one point, zero on the boundary, that the
        network output is multiplied by (Dirichlet problems).
      input_standardization: ``None``, or ``(center, scale)``, each ``(d,)``: the network sees
        ``(x - center) / scale``.
      gaussian_envelope: ``None``, or ``(center (d,), precision (d, d))``: the states decay
        like ``exp(-(x - center)^T precision (x - center) / 2)`` times a polynomial, and the
        network's output is multiplied by that factor
        (:func:`~nestedlora_jax.networks.gaussian_envelope_for_network` turns it into the factor
        of ``psi / sqrt(p)`` for an importance-weighted network).
    """

    radial_input: bool = False
    periodic: bool = False
    boundary_mask: Callable[[Array], Array] | None = None
    input_standardization: tuple[np.ndarray, np.ndarray] | None = None
    gaussian_envelope: tuple[np.ndarray, np.ndarray] | None = None


def check_problem(problem: Any, where: str = "this function") -> None:
    """Raises ValueError unless ``problem`` is a :class:`Problem` (an instance of a subclass).

    The generic modules call the problem's methods (``network_hints``, ``quadrature_grid``,
    ``known_energies``, ...), whose defaults live in ``Problem``: an object that merely looks
    like a problem would fail later, at whichever method it lacks."""
    if not isinstance(problem, Problem):
        raise ValueError(
            f"{where} takes a nestedlora_jax.problems.Problem; got {type(problem).__name__}, "
            "which does not derive from it. Subclass Problem (a frozen dataclass with dim, "
            "potential(x), default_sampler(L) and, if known, energies(L) / eigenfunctions(x, L)): "
            "it supplies the defaults of every other capability."
        )


class Problem:
    """Base class of the problems; see the module docstring for the interface.

    Subclasses are frozen dataclasses with a ``dim`` field and implement ``potential``,
    ``default_sampler`` and, where known, ``energies`` and ``eigenfunctions``. Every other
    capability the library asks of a problem is a method here with a default that a subclass
    overrides where it knows better:

    - ``known_energies(L)``: the exact energies, or ``None`` (``energies`` raising
      ``NotImplementedError``): then ``solve`` estimates the operator's scaling and evaluation
      reports no errors;
    - ``has_eigenfunctions(L)``: whether ``eigenfunctions(x, L)`` works (default: whether it
      traces without ``NotImplementedError``);
    - ``network_hints()``: a :class:`NetworkHints` built from ``periodic``, ``boundary_mask``
      and ``input_standardization()`` (no radial input);
    - ``quadrature_grid(L, num, sampler=None)`` and ``evaluation_radius(L)``: the box's tensor
      Gauss-Legendre rule, else one on ``[-R, R]^d`` (d <= 2);
    - ``grid_radius(L)``, ``slice_plane(L)``, ``describe()``: for the benchmarks.

    The generic code takes only ``Problem`` instances (:func:`check_problem`): a duck-typed
    object is refused with a ValueError that says to subclass ``Problem``, rather than used
    until the first method it lacks.
    """

    dim: int
    kinetic: ClassVar[float] = 1.0
    periodic: ClassVar[bool] = False
    boundary_mask: ClassVar[Callable[[Array], Array] | None] = None

    @property
    def box(self) -> tuple[float, float] | None:
        """``(low, high)`` when the domain is the box ``[low, high]^d`` (Dirichlet or periodic);
        ``None`` for ``R^d``."""
        return None

    def potential(self, x: Array) -> Array:
        raise NotImplementedError

    def energies(self, L: int) -> np.ndarray:
        raise NotImplementedError(f"{type(self).__name__} has no known spectrum.")

    def known_energies(self, L: int) -> np.ndarray | None:
        """``energies(L)`` as float64, or ``None`` when the spectrum is unknown (``energies``
        raises ``NotImplementedError``). A bad ``L`` still raises (ValueError)."""
        try:
            return np.asarray(self.energies(L), np.float64)
        except NotImplementedError:
            check_num_states(L)
            return None

    def eigenfunctions(self, x: Array, L: int) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form eigenfunctions.")

    def has_eigenfunctions(self, L: int) -> bool:
        """Whether ``eigenfunctions(x, L)`` is available for these ``L`` states: it traces (an
        abstract evaluation on one point, nothing computed) without ``NotImplementedError``."""
        try:
            jax.eval_shape(lambda x: self.eigenfunctions(x, L),
                           jax.ShapeDtypeStruct((self.dim,), jnp.float32))
        except NotImplementedError:
            return False
        return True

    def default_sampler(self, L: int):
        raise NotImplementedError

    def degenerate_blocks(self, L: int) -> list[tuple[int, int]]:
        """Half-open ``(start, stop)`` ranges of equal energies among the ``L`` lowest states."""
        return _blocks_from_energies(self.energies(L))

    def input_standardization(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(center, scale)``, each ``(d,)``: the network sees ``(x - center) / scale``;
        ``None`` (the default) leaves ``x`` as it is. A problem whose domain is far from
        ``[-1, 1]^d`` around the origin says so here."""
        return None

    def gaussian_envelope(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(center (d,), precision (d, d))`` when every eigenfunction is
        ``exp(-(x - center)^T precision (x - center) / 2)`` times a polynomial, as under a
        harmonic confinement ``V ~ x^T K x`` (``precision = K^{1/2}``); ``None`` (the
        default) otherwise. The default network multiplies its output by this factor (the
        decay an MLP represents poorly; it is the ground state itself for a purely harmonic
        potential), so that the MLPs learn only the polynomial factors."""
        return None

    def network_hints(self) -> NetworkHints:
        """What the default network must know about this problem: ``periodic``,
        ``boundary_mask``, ``input_standardization()`` and ``gaussian_envelope()``; no radial
        input (``Hydrogen`` asks for it)."""
        return NetworkHints(radial_input=False, periodic=bool(self.periodic),
                            boundary_mask=self.boundary_mask,
                            input_standardization=self.input_standardization(),
                            gaussian_envelope=self.gaussian_envelope())

    def operator_scaling(self, L: int) -> tuple[float, float]:
        """``(scale, shift)`` so that ``T = scale * (-H) + shift`` has the ``L`` lowest states as
        its top eigenvalues, all in ``[1/2, 1]``: :func:`~nestedlora_jax.operators.scaling_from_energies`
        of the exact energies (its docstring gives the rule and why)."""
        from nestedlora_jax.operators import scaling_from_energies

        return scaling_from_energies(self.energies(L))

    def evaluation_radius(self, L: int) -> float | None:
        """Half-width ``R`` of the evaluation grid ``[-R, R]^d`` on ``R^d`` for the ``L`` lowest
        states; ``None`` (the default): ``8`` times the sampler's length scale
        (:func:`~nestedlora_jax.samplers.length_scale`)."""
        return None

    def quadrature_grid(self, L: int, num: int = 200, *, sampler=None) -> tuple[np.ndarray, np.ndarray]:
        """A quadrature grid ``(points (N, d), dx-weights (N,))`` covering the first L states
        (d <= 2; :func:`~nestedlora_jax.evaluation.quadrature_grid` is the public entry).

        * boxes (``box``): tensor Gauss-Legendre with ``num`` nodes per axis;
        * otherwise: tensor Gauss-Legendre on ``[-R, R]^d`` with ``R = evaluation_radius(L)``,
          or, where that is ``None``, ``8`` times the length scale of ``sampler`` (default: the
          problem's default sampler).
        """
        dim = self.dim
        if dim > 2:
            raise ValueError(
                f"quadrature grids are provided for d <= 2 (got d = {dim}); evaluate on a Monte "
                "Carlo sample instead (evaluate(..., points=None))."
            )
        if self.box is not None:
            lo, hi = (np.full(dim, float(b)) for b in self.box)
            return _tensor_gauss_legendre(lo, hi, num)
        R = self.evaluation_radius(L)
        if R is None:
            sampler = self.default_sampler(L) if sampler is None else sampler
            R = 8.0 * length_scale(sampler)
        R = float(R)
        return _tensor_gauss_legendre(np.full(dim, -R), np.full(dim, R), num)

    def grid_radius(self, L: int) -> float | None:
        """Half-width of a finite-difference box ``[-R, R]^d`` on ``R^d`` where the slowest of
        the ``L`` states has decayed far below the grid's own error (``None`` on boxes). Default
        ``6``: a unit-frequency oscillator's ``exp(-x^2 / 2) * poly`` covers its low levels."""
        return None if self.box is not None else 6.0

    def slice_plane(self, L: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """``(centre, u, v, half_width)`` of a 2-D slice to plot the ``L`` states on: the first
        two axes through ``centre``, which is offset along the others so that states odd along
        them (zero on a plane through the middle) still show. Needs ``dim >= 2``."""
        d = self.dim
        e = np.eye(d)
        off = np.arange(d) >= 2
        if self.box is not None:
            lo, hi = self.box
            centre = lo + (hi - lo) * np.where(off, 0.3, 0.5)
            return centre, e[0], e[1], 0.5 * (hi - lo)
        return np.where(off, 1.5, 0.0), e[0], e[1], self.grid_radius(L) * 0.6

    def describe(self) -> str:
        """A one-line description for reports (default: ``repr``)."""
        return repr(self)


# ---------------------------------------------------------------------------------------------
# Harmonic oscillator.
# ---------------------------------------------------------------------------------------------


def _hermite_functions(x: Array, n_max: int) -> Array:
    """Normalised Hermite functions ``h_0..h_{n_max}`` at ``x``: shape ``(n_max+1, *x.shape)``.

    ``h_n(x) = H_n(x) exp(-x^2/2) / sqrt(2^n n! sqrt(pi))`` by the stable three-term recurrence
    ``h_{n+1} = sqrt(2/(n+1)) x h_n - sqrt(n/(n+1)) h_{n-1}`` (no large H_n or n! ever formed).
    """
    h = [jnp.exp(-0.5 * x * x) * math.pi**-0.25]
    if n_max >= 1:
        h.append(math.sqrt(2.0) * x * h[0])
    for n in range(1, n_max):
        h.append(math.sqrt(2.0 / (n + 1)) * x * h[n] - math.sqrt(n / (n + 1)) * h[n - 1])
    return jnp.stack(h)


@dataclasses.dataclass(frozen=True)
class HarmonicOscillator(Problem):
    """``H = -Lap + |x|^2`` on ``R^d``.

    Energies ``2 n + d`` (``n`` the total degree), degeneracy ``C(n+d-1, n)``. Eigenfunctions
    ``prod_i h_{m_i}(x_i)`` with the Hermite functions ``h_m``; ordered by total degree, then by
    the multi-index ``m`` lexicographically (e.g. 2-D: (0,0), (0,1), (1,0), (0,2), (1,1), ...).

    Default sampler ``N(0, I)``: ``psi^2 ~ poly * exp(-|x|^2)`` so ``f = psi / sqrt(p) ~ poly *
    exp(-|x|^2 / 4)`` stays bounded and ``E_p[f^4] = int psi^4 / p`` is finite (any std above
    ``1/sqrt(2)`` would do; 1 covers the first levels without wasting samples in the tails).
    """

    dim: int = 1

    def __post_init__(self):
        _check_dim(self.dim, "HarmonicOscillator")

    def potential(self, x: Array) -> Array:
        x = _check_point(x, self.dim, "HarmonicOscillator.potential")
        return jnp.sum(x * x)

    def _states(self, L: int):
        values, index = _lowest_states(lambda k, c: np.arange(c), self.dim, L)
        return values, index

    def energies(self, L: int) -> np.ndarray:
        L = check_num_states(L)
        degree, _ = self._states(L)
        return (2.0 * degree + self.dim).astype(np.float64)

    def multi_indices(self, L: int) -> np.ndarray:
        """``(L, dim)`` Hermite degrees of the ``L`` lowest states, in order."""
        return self._states(check_num_states(L))[1]

    def eigenfunctions(self, x: Array, L: int) -> Array:
        """``(L,)``: ``psi_i(x) = prod_k h_{m_ik}(x_k)``."""
        x = _check_point(x, self.dim, "HarmonicOscillator.eigenfunctions")
        index = self.multi_indices(L)
        h = _hermite_functions(x, int(index.max()))  # (n_max + 1, dim)
        return jnp.prod(h[index, np.arange(self.dim)], axis=-1)

    def default_sampler(self, L: int) -> GaussianSampler:
        check_num_states(L)
        return GaussianSampler(self.dim, scale=1.0)


@dataclasses.dataclass(frozen=True)
class CoupledOscillator(Problem):
    """``H = -Lap + x^T K x`` on ``R^d`` with ``K = Q diag(w^2) Q^T`` symmetric positive definite.

    In the rotated coordinates ``y = Q^T x`` it separates into ``-d^2/dy_k^2 + w_k^2 y_k^2``,
    whose levels are ``w_k (2 n + 1)`` with eigenfunctions ``w_k^{1/4} h_n(sqrt(w_k) y_k)``
    (``h_n`` the normalised Hermite functions). So

        E = sum_k w_k (2 n_k + 1),   psi = prod_k w_k^{1/4} h_{n_k}(sqrt(w_k) (Q^T x)_k),

    ordered by energy, ties by the multi-index ``n``. With a random rotation and distinct
    frequencies the problem is not separable in ``x`` and its low spectrum is non-degenerate
    (up to accidental near-ties), the test case for many excited states in high dimension.

    Args:
      dim: dimension d.
      K: the ``(d, d)`` matrix, symmetric positive definite; ``None`` draws
        ``K = Q diag(w^2) Q^T`` from ``seed``: ``Q`` a Haar-random rotation, ``w`` uniform
        on ``frequency_range``, sorted.
      seed, frequency_range: used only when ``K`` is ``None``.

    Default sampler: ``N(0, Sigma)`` with ``Sigma = Q diag(3 / (4 w)) Q^T``, 1.5 times the
    variance of the ground state's ``psi^2`` along each axis. Per axis, the ground state's
    ``E_p[f^4] = int psi^4 / p`` is ``1.06`` there (1 is the minimum, at ``p = psi^2``, which
    would leave excited states ``f = psi / sqrt(p)`` unbounded); the product over axes is what
    the variance of every Monte Carlo estimate scales with: ``1.06^50 = 19`` in d = 50, against
    ``1.155^50 = 1350`` for the unit-width Gaussian at ``w = 1``.
    """

    dim: int = 2
    K: Any = None
    seed: int = 0
    frequency_range: tuple[float, float] = (1.0, 2.0)
    frequencies: tuple = dataclasses.field(init=False, repr=False, compare=False)
    rotation: tuple = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self):
        _check_dim(self.dim, "CoupledOscillator")
        if self.K is None:
            try:
                lo, hi = (float(v) for v in self.frequency_range)
            except (TypeError, ValueError):  # not two numbers: the ValueError below
                lo = hi = math.nan
            if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo <= hi):
                raise ValueError(
                    "CoupledOscillator: frequency_range must be (low, high) with "
                    f"0 < low <= high; got {self.frequency_range!r}."
                )
            object.__setattr__(self, "frequency_range", (lo, hi))  # hashable (jit static)
            rng = np.random.default_rng(self.seed)
            q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
            q = q * np.sign(np.diag(r))[None, :]  # Haar measure (QR sign convention fixed)
            w = np.sort(rng.uniform(lo, hi, self.dim))
            K = (q * w**2) @ q.T
            # Exactly symmetric, so that CoupledOscillator(K=problem.K) is the same problem
            # bit for bit (a run folder records K, not the draw).
            K = (K + K.T) / 2
        else:
            K = _symmetric_positive_definite(self.K, self.dim, "K", "CoupledOscillator")
        w2, q = np.linalg.eigh(K)
        object.__setattr__(self, "K", _as_matrix_tuple(K))
        object.__setattr__(self, "frequencies", tuple(float(v) for v in np.sqrt(w2)))
        object.__setattr__(self, "rotation", _as_matrix_tuple(q))

    def potential(self, x: Array) -> Array:
        x = _check_point(x, self.dim, "CoupledOscillator.potential")
        return x @ (jnp.asarray(self.K, x.dtype) @ x)

    def _states(self, L: int):
        w = np.asarray(self.frequencies)
        return _lowest_states(lambda k, c: w[k] * (2.0 * np.arange(c) + 1.0), self.dim, L)

    def energies(self, L: int) -> np.ndarray:
        return self._states(check_num_states(L))[0].astype(np.float64)

    def multi_indices(self, L: int) -> np.ndarray:
        """``(L, dim)`` quantum numbers ``n_k`` (along the rotated axes) of the ``L`` lowest
        states, in order."""
        return self._states(check_num_states(L))[1]

    def eigenfunctions(self, x: Array, L: int) -> Array:
        """``(L,)``: ``psi_i(x) = prod_k w_k^{1/4} h_{n_ik}(sqrt(w_k) (Q^T x)_k)``."""
        x = _check_point(x, self.dim, "CoupledOscillator.eigenfunctions")
        index = self.multi_indices(L)
        w = np.asarray(self.frequencies)
        y = jnp.asarray(self.rotation, x.dtype).T @ x
        h = _hermite_functions(jnp.asarray(np.sqrt(w), x.dtype) * y, int(index.max()))
        h = h * jnp.asarray(w**0.25, x.dtype)[None, :]  # (n_max + 1, dim)
        return jnp.prod(h[index, np.arange(self.dim)], axis=-1)

    def default_sampler(self, L: int) -> CorrelatedGaussianSampler:
        check_num_states(L)
        q, w = np.asarray(self.rotation), np.asarray(self.frequencies)
        return CorrelatedGaussianSampler(self.dim, (q * (0.75 / w)) @ q.T)

    def gaussian_envelope(self) -> tuple[np.ndarray, np.ndarray]:
        """Every eigenfunction is ``exp(-y^T diag(w) y / 2)``, ``y = Q^T x``, times a product of
        Hermite polynomials: centre 0, precision ``K^{1/2} = Q diag(w) Q^T``."""
        q, w = np.asarray(self.rotation), np.asarray(self.frequencies)
        precision = (q * w) @ q.T
        return np.zeros(self.dim), (precision + precision.T) / 2

    def grid_radius(self, L: int) -> float:
        """``6 / sqrt(w_min)``: along the softest axis ``psi ~ exp(-w y^2 / 2) * poly``."""
        return 6.0 / np.sqrt(min(self.frequencies))

    def slice_plane(self, L: int):
        """The two softest axes (``rotation[:, 0]``, ``[:, 1]``) span the slice, through a centre
        offset by ``0.6 / sqrt(w_k)`` along every other axis ``k``; half-width
        ``4 / sqrt(w_min)``."""
        q, w = np.asarray(self.rotation), np.asarray(self.frequencies)
        centre = q[:, 2:] @ (0.6 / np.sqrt(w[2:]))
        return centre, q[:, 0], q[:, 1], 4.0 / np.sqrt(w[0])

    def describe(self) -> str:
        """The seed and the frequencies (``K`` itself is ``d^2`` numbers)."""
        return (f"CoupledOscillator(dim={self.dim}, seed={self.seed}), "
                f"frequencies {list(self.frequencies)}")


# ---------------------------------------------------------------------------------------------
# Hydrogen.
# ---------------------------------------------------------------------------------------------


def _laguerre_vector(alpha: Array, degree: np.ndarray, x: Array, xp=jnp) -> Array:
    """Generalised Laguerre polynomials ``L_{degree_i}^{alpha_i}(x_i)`` for vectors ``alpha``,
    ``x`` and ``degree`` (static ints), by the three-term recurrence
    ``(k+1) L_{k+1} = (2k + 1 + alpha - x) L_k - (k + alpha) L_{k-1}`` run once to
    ``max(degree)``, each entry read off at its own degree. ``xp`` is ``jnp`` (traced, the
    eigenfunctions) or ``np`` (float64 host arithmetic, ``hydrogen_tail_radius``)."""
    prev, cur = xp.ones_like(x), 1.0 + alpha - x
    out = xp.where(xp.asarray(degree == 0), prev, cur)
    for k in range(1, int(np.max(degree))):
        prev, cur = cur, ((2 * k + 1 + alpha - x) * cur - (k + alpha) * prev) / (k + 1)
        out = xp.where(xp.asarray(degree == k + 1), cur, out)
    return out


def _real_solid_harmonics(x: Array, l_max: int) -> list[list[Array]]:
    """Real solid harmonics ``r^l Y_lm(x / r)``, ``Y_lm`` orthonormal on the unit sphere, as
    polynomials in ``(x, y, z)`` for ``l <= 3``; ``[l][m + l]`` for ``m = -l..l`` (the usual
    real ordering: ``m < 0`` sine-like, ``m > 0`` cosine-like, e.g. ``l = 1``: y, z, x)."""
    if l_max > 3:
        raise NotImplementedError("real spherical harmonics are tabulated for l <= 3 only.")
    X, Y, Zc = x[0], x[1], x[2]
    r2 = X * X + Y * Y + Zc * Zc
    pi = math.pi
    table = [[0.5 / math.sqrt(pi) * jnp.ones_like(X)]]
    c1 = math.sqrt(3 / (4 * pi))
    table.append([c1 * Y, c1 * Zc, c1 * X])
    c2, c20, c22 = 0.5 * math.sqrt(15 / pi), 0.25 * math.sqrt(5 / pi), 0.25 * math.sqrt(15 / pi)
    table.append(
        [c2 * X * Y, c2 * Y * Zc, c20 * (3 * Zc * Zc - r2), c2 * X * Zc, c22 * (X * X - Y * Y)]
    )
    c33, c32 = 0.25 * math.sqrt(35 / (2 * pi)), 0.5 * math.sqrt(105 / pi)
    c31, c30 = 0.25 * math.sqrt(21 / (2 * pi)), 0.25 * math.sqrt(7 / pi)
    c32b = 0.25 * math.sqrt(105 / pi)
    table.append([
        c33 * Y * (3 * X * X - Y * Y),
        c32 * X * Y * Zc,
        c31 * Y * (5 * Zc * Zc - r2),
        c30 * Zc * (5 * Zc * Zc - 3 * r2),
        c31 * X * (5 * Zc * Zc - r2),
        c32b * Zc * (X * X - Y * Y),
        c33 * X * (X * X - 3 * Y * Y),
    ])
    return table[: l_max + 1]


def hydrogen_tail_radius(dim: int, n: int, l: int, Z: float = 1.0, tail: float = 1e-10) -> float:
    """The radius ``R`` beyond which the hydrogen state ``(n, l)`` (2-D or 3-D, charge ``Z``)
    holds a fraction ``tail`` of its norm: ``int_{r > R} psi^2 = tail``.

    In ``rho = 2 kappa r`` the radial density is ``g(rho) e^{-rho}`` with the polynomial
    ``g = rho^(2l + dim - 1) (L_k^alpha(rho))^2`` (2-D ``k = n - l``, ``alpha = 2l``; 3-D
    ``k = n - l - 1``, ``alpha = 2l + 1``), so the tail fraction
    ``int_a^inf g e^{-rho} / int_0^inf g e^{-rho} = e^{-a} sum_i w_i g(a + t_i) / sum_i w_i g(t_i)``
    is exact with 64-node Gauss-Laguerre (``deg g < 128``); it decreases in ``a``, which is
    found by bisection.
    """
    if not 0 < tail < 1:
        raise ValueError(f"hydrogen_tail_radius: tail must be in (0, 1); got {tail!r}.")
    _check_dim(dim, "hydrogen_tail_radius", allowed=(2, 3))
    n_min = 0 if dim == 2 else 1
    if not (n >= n_min and 0 <= l <= n - (dim - 2)):
        raise ValueError(f"hydrogen_tail_radius: no {dim}-D state with n={n}, l={l} (2-D: "
                         "n >= 0, 0 <= l <= n; 3-D: n >= 1, 0 <= l < n).")
    k, alpha = (n - l, 2 * l) if dim == 2 else (n - l - 1, 2 * l + 1)
    kappa = Z / (2 * n + 1) if dim == 2 else Z / (2 * n)
    t, w = np.polynomial.laguerre.laggauss(64)

    def log_g(x):
        lag = _laguerre_vector(float(alpha), np.asarray(k), x, xp=np)
        return (2 * l + dim - 1) * np.log(x) + 2 * np.log(np.abs(lag) + 1e-300)

    def log_integral(a):  # log int_a^inf g e^{-rho}, shifted by its largest term (no overflow)
        lg = log_g(a + t)
        return -a + lg.max() + np.log(np.sum(w * np.exp(lg - lg.max())))

    total = log_integral(0.0)
    log_tail = lambda a: log_integral(a) - total
    lo, hi = 0.0, 1.0
    while log_tail(hi) > math.log(tail):
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if log_tail(mid) > math.log(tail) else (lo, mid)
    return float(hi / (2 * kappa))


@dataclasses.dataclass(frozen=True)
class Hydrogen(Problem):
    """``H = -Lap - Z / |x|`` in 2-D or 3-D (bound states).

    2-D: ``E_n = -Z^2 / (4 (n + 1/2)^2)``, ``n >= 0``, degeneracy ``2n + 1``; with
    ``kappa = Z / (2n + 1)`` (``E = -kappa^2``), ``rho = 2 kappa r`` and ``0 <= l <= n``,

        psi = N_nl rho^l exp(-rho / 2) L_{n-l}^{2l}(rho) {1; cos(l theta), sin(l theta)},
        N_nl^2 = (2 kappa)^2 (n - l)! / ((n + l)! (2n + 1) A_l),  A_0 = 2 pi, A_l = pi,

    from ``int_0^inf rho^{2l+1} e^{-rho} (L_{n-l}^{2l})^2 = (n+l)! (2n+1) / (n-l)!``. Within a
    level: ``l = 0``, then cos, sin for ``l = 1, 2, ...``. ``rho^l {cos, sin}(l theta)`` is
    evaluated as ``(2 kappa)^l {Re, Im}((x + i y)^l)``, a polynomial (smooth at the origin).

    3-D: ``E_n = -Z^2 / (4 n^2)``, ``n >= 1``, degeneracy ``n^2``; ``kappa = Z / (2n)``,

        psi = N_nl exp(-rho / 2) L_{n-l-1}^{2l+1}(rho) (2 kappa)^l S_lm(x),
        N_nl^2 = (2 kappa)^3 (n - l - 1)! / ((n + l)! 2n),

    ``S_lm = r^l Y_lm`` the real solid harmonics; order ``l = 0..n-1``, then ``m = -l..l``.
    Eigenfunctions are implemented for ``n <= 4`` (``l <= 3``, 30 states); energies for any n.

    The eigenfunctions clamp the radius below at ``sqrt(finfo.tiny)`` (``_safe_radius``), so they
    and their derivatives are finite at every point, the origin included; the potential is
    exact (``-inf`` at the nucleus, see ``potential``).

    ``network_length`` (``None``: raw coordinates): the default network sees ``x Z / a`` and its
    radius (:meth:`input_standardization`). The states spread over radii from ``1 / Z`` to
    ``~100 / Z`` (2-D n = 5), and on raw coordinates a freshly initialised softplus MLP is
    nearly piecewise linear over the outer ones. Measured with ``a = 10``: a supervised fit of
    ``psi / sqrt(p)`` under the 36-state sampler (5000 Adam steps, the 32-32-32 network) gives
    relative L2 errors for the n = 5 states of 0.17 mean, 0.23 worst, against 0.42 and 0.91 on
    raw coordinates (n = 3: 1.6e-2 against 5.2e-2; ground state 5.1e-3 against 1.1e-2). In
    36-state training (seed 0) 40k steps bring the n = 3 and 4 levels to 1.9e-3 and 3.4e-2,
    near what raw coordinates reach in 100k (5.8e-4 and 2.0e-2). On 16 states (100k steps)
    seed 1 ended at 1.6e-4 mean (3.7e-4 on raw coordinates), but seed 2 at 9.6e-4 (2.4e-4)
    and seed 0 at 1.4e-2 (4.4e-4): two of its functions stayed mixed between an n = 2 and
    an n = 3 state. On 9 states (40k steps) it made no difference beyond the spread between
    seeds (5.2e-4 against 4.2e-4). So it is not the default here; the hydrogen benchmark uses
    ``a = 10`` beyond 16 states, with moment samples: on 36 states (seed 0, 100k steps) every
    state formed, mean relative error 6.8e-3, n <= 4 at or below 3.7e-4.

    Default sampler (``L`` states, levels up to ``n_max``): ``RadialExponentialMixture`` with
    ``shape = dim`` (density finite, with a cusp, at the nucleus), one component per level with
    ``a_n = c / kappa_n`` and uniform weights; ``c = 1.5`` in 2-D, ``1`` in 3-D. Then ``p``
    decays no faster than ``|psi_n|`` (not like ``psi_n^2``), so ``f = psi / sqrt(p)`` decays and
    ``E_p[f^4] = int psi^4 / p`` is finite for every state. ``c`` minimises the worst relative
    variance ``Var_p(f_i^2)`` of the Gram estimate over the states (measured, 2^18 samples:
    2-D L = 16: 11 at c = 1.5, against 52 at c = 1, 17 at c = 2 and 259 for the paper's
    ``N(0, 16^2 I)``; 3-D L = 14: 6.4 at c = 1). ``shape = dim`` rather than the ``~1/r``
    density: with importance weighting the network represents ``f = psi / sqrt(p)``, and for
    ``p ~ 1/r`` a smooth ``f`` with ``f(0) != 0`` makes ``sqrt(p) f ~ r^{-1/2}``, whose
    estimated ``<f, T_p f>`` has infinite mean (measured for ``f = exp(-|x|^2 / 20)``: 5e3 at
    1e4 samples, 4e4 at 1e6, growing without bound; 0.086 +- 0.0004 with ``shape = 2``); see
    ``RadialExponentialMixture``.
    """

    dim: int = 2
    Z: float = 1.0
    network_length: float | None = None

    _MAX_EIGENFUNCTION_LEVEL_3D: ClassVar[int] = 4

    def __post_init__(self):
        _check_dim(self.dim, "Hydrogen", allowed=(2, 3))
        if not (np.isfinite(self.Z) and self.Z > 0):
            raise ValueError(f"Hydrogen: Z must be a finite number > 0; got {self.Z!r}.")
        object.__setattr__(self, "Z", float(self.Z))
        if self.network_length is not None:
            object.__setattr__(self, "network_length", check_positive_float(
                "Hydrogen.network_length (None, or a length in Bohr radii at Z = 1)",
                self.network_length))

    def potential(self, x: Array) -> Array:
        """``V(x) = -Z / |x|``, exactly: ``-inf`` at the nucleus, NaN for a NaN input.

        Clamping ``r`` would turn a point at (or rounded onto) the nucleus into a huge finite
        value (-9e18 in float32) that looks valid; unclamped, such a point is seen for what it
        is: training skips a batch holding it and evaluation leaves it out and says so
        (:func:`~nestedlora_jax.operators.valid_points`, which also rejects values beyond
        ``MAX_ABS_OPERATOR_VALUE``, e.g. from ``r ~ 1e-19``).
        """
        x = _check_point(x, self.dim, "Hydrogen.potential")
        r2 = jnp.sum(x * x)
        # Double-where: a finite gradient wherever r > 0 (the r = 0 branch never differentiates
        # sqrt at 0); written with == so that NaN takes the sqrt branch and stays NaN.
        r = jnp.where(r2 == 0, 0, jnp.sqrt(jnp.where(r2 == 0, 1, r2)))
        return -self.Z / r

    def states(self, L: int) -> list[tuple]:
        """Quantum numbers of the ``L`` lowest states: 2-D ``(n, l, 'c' | 's')``, 3-D
        ``(n, l, m)``."""
        L = check_num_states(L)
        out = []
        n = 0 if self.dim == 2 else 1
        while len(out) < L:
            if self.dim == 2:
                out.append((n, 0, "c"))
                for l in range(1, n + 1):
                    out += [(n, l, "c"), (n, l, "s")]
            else:
                out += [(n, l, m) for l in range(n) for m in range(-l, l + 1)]
            n += 1
        return out[:L]

    def _kappa(self, n: int) -> float:
        return self.Z / (2 * n + 1) if self.dim == 2 else self.Z / (2 * n)

    def energies(self, L: int) -> np.ndarray:
        return np.array([-self._kappa(s[0]) ** 2 for s in self.states(L)], dtype=np.float64)

    def eigenfunctions(self, x: Array, L: int) -> Array:
        """``(L,)`` real, L2-normalised bound states at one point, in the order of ``states``.

        Vectorised over the states (one Laguerre recurrence for all of them), so the traced
        graph grows with ``n_max``, not with ``L``: this keeps compile times of Laplacians small.
        """
        x = _check_point(x, self.dim, "Hydrogen.eigenfunctions")
        states = self.states(L)
        n_max = states[-1][0]
        if self.dim == 3 and n_max > self._MAX_EIGENFUNCTION_LEVEL_3D:
            raise NotImplementedError(
                "3-D hydrogen eigenfunctions are implemented for "
                f"n <= {self._MAX_EIGENFUNCTION_LEVEL_3D} (L <= 30); L={L} needs n = {n_max}."
            )
        n = np.array([s[0] for s in states])
        l = np.array([s[1] for s in states])
        kappa = np.array([self._kappa(k) for k in n])
        fact = np.vectorize(math.factorial, otypes=[float])
        if self.dim == 2:
            alpha, degree = 2 * l, n - l
            area = np.where(l == 0, 2 * math.pi, math.pi)
            norm2 = (2 * kappa) ** 2 * fact(n - l) / (fact(n + l) * (2 * n + 1) * area)
            # (Re, Im) of (x + i y)^l = r^l (cos, sin)(l theta): polynomials, smooth at 0.
            powers = [(jnp.ones_like(x[0]), jnp.zeros_like(x[0]))]
            for _ in range(n_max):
                c, s = powers[-1]
                powers.append((c * x[0] - s * x[1], c * x[1] + s * x[0]))
            table = jnp.stack([jnp.stack(p) for p in powers])  # (n_max + 1, 2)
            angular = table[l, np.array([0 if s[2] == "c" else 1 for s in states])]
        else:
            alpha, degree = 2 * l + 1, n - l - 1
            norm2 = (2 * kappa) ** 3 * fact(n - l - 1) / (fact(n + l) * 2 * n)
            harmonics = _real_solid_harmonics(x, int(l.max()))
            table = jnp.stack([h for row in harmonics for h in row])  # index l^2 + l + m
            angular = table[l * l + l + np.array([s[2] for s in states])]
        coef = np.sqrt(norm2) * (2 * kappa) ** l
        rho = jnp.asarray(2 * kappa, x.dtype) * _safe_radius(x)
        laguerre = _laguerre_vector(jnp.asarray(alpha, x.dtype), degree, rho)
        return jnp.asarray(coef, x.dtype) * jnp.exp(-0.5 * rho) * laguerre * angular

    def default_sampler(self, L: int) -> RadialExponentialMixture:
        states = self.states(L)
        levels = range(states[0][0], states[-1][0] + 1)
        c = 1.5 if self.dim == 2 else 1.0  # see the class docstring
        return RadialExponentialMixture(
            self.dim, scales=tuple(c / self._kappa(n) for n in levels), shape=self.dim
        )

    def network_hints(self) -> NetworkHints:
        """Radial input: the cusp of every state at the nucleus is a function of ``|x|``."""
        return dataclasses.replace(super().network_hints(), radial_input=True)

    def input_standardization(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``None`` (raw coordinates) by default; with ``network_length`` ``a``: centre 0 (the
        nucleus) and scale ``a / Z`` on every axis, so the network sees ``x Z / a`` and the
        radius of that (see the class docstring for what it changes)."""
        if self.network_length is None:
            return None
        return np.zeros(self.dim), np.full(self.dim, self.network_length / self.Z)

    def _max_level(self, L: int) -> int:
        return max(s[0] for s in self.states(L))

    # Fraction of every state's norm the evaluation grid may leave outside its radius.
    EVALUATION_TAIL: ClassVar[float] = 1e-10

    def evaluation_radius(self, L: int) -> float:
        """The radius outside which each of the ``L`` states has less than ``EVALUATION_TAIL``
        (1e-10) of its norm, computed from the radial densities (``hydrogen_tail_radius``):
        2-D 13, 49, 95, 153, 221, 298 for ``n_max = 0..5``. The excited states reach far: the
        rule of thumb ``12 (n_max + 1/2) + 20`` used before left 2.3% of the n = 3 states'
        norm outside (62 for 16 states) and 69% of the n = 5 states' (86 for 36)."""
        return max(hydrogen_tail_radius(self.dim, n, l, self.Z, self.EVALUATION_TAIL)
                   for n, l in {s[:2] for s in self.states(L)})

    def quadrature_grid(self, L: int, num: int = 200, *, sampler=None):
        """2-D: a polar grid, Gauss-Legendre in ``r`` on ``[0, R]`` (``R = evaluation_radius(L)``)
        and ``num`` equispaced angles (exact for the trigonometric angular parts); ``sampler`` is
        not used. 3-D: none (``Problem.quadrature_grid``'s ValueError)."""
        if self.dim != 2:
            return super().quadrature_grid(L, num, sampler=sampler)
        R = self.evaluation_radius(L)
        r, wr = np.polynomial.legendre.leggauss(num)
        r = 0.5 * R * (r + 1.0)
        wr = 0.5 * R * wr * r
        theta = 2 * np.pi * np.arange(num) / num
        wt = np.full(num, 2 * np.pi / num)
        rr, tt = np.meshgrid(r, theta, indexing="ij")
        points = np.stack([rr * np.cos(tt), rr * np.sin(tt)], axis=-1).reshape(-1, 2)
        return points, np.outer(wr, wt).reshape(-1)

    def grid_radius(self, L: int) -> float:
        """``8 n_max + 8`` for the finite-difference box."""
        return 8.0 * self._max_level(L) + 8.0

    def operator_scaling(self, L: int) -> tuple[float, float]:
        """``T = scale * (-H + c)``, ``c = 1.5 |E_L|``, ``scale = 1 / (|E_1| + c)`` (so t_1 = 1).

        A positive shift of about ``1.5 |E_L|`` brings ``t_1 / t_L`` from 49 down to about 20
        for 16 states, which removed component collapse there. A larger shift is not used because
        ``-H + c`` has continuous spectrum up to ``c``, with the bound states above ``E_L``
        accumulating just below: ``t_L`` must stay well clear of it relative to ``t_1``.
        """
        energies = self.energies(L)
        c = 1.5 * abs(energies[-1])
        scale = 1.0 / (c - energies[0])
        return float(scale), float(scale * c)


# ---------------------------------------------------------------------------------------------
# Infinite square well.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class InfiniteWell(Problem):
    """``H = -Lap`` on the box ``[0, a]^d`` with Dirichlet boundary conditions.

    Energies ``pi^2 sum_i n_i^2 / a^2`` (``n_i >= 1``), eigenfunctions
    ``prod_i sqrt(2/a) sin(n_i pi x_i / a)``, ordered by energy then multi-index. The network
    output must be multiplied by ``boundary_mask(x) = prod_i x_i (a - x_i) / (a/2)^2`` (1 at the
    centre, 0 on the boundary). Default sampler: uniform on the box (``log p`` constant, so the
    importance-weighted operator is the plain one and ``f = a^{d/2} psi``).
    """

    dim: int = 2
    length: float = 1.0

    def __post_init__(self):
        _check_dim(self.dim, "InfiniteWell")
        if not (np.isfinite(self.length) and self.length > 0):
            raise ValueError(
                f"InfiniteWell: length must be a finite number > 0; got {self.length!r}."
            )
        object.__setattr__(self, "length", float(self.length))

    @property
    def box(self) -> tuple[float, float]:
        return (0.0, self.length)

    def potential(self, x: Array) -> Array:
        """Zero inside the box (the boundary condition is imposed by ``boundary_mask``)."""
        x = _check_point(x, self.dim, "InfiniteWell.potential")
        return jnp.zeros((), x.dtype)

    def boundary_mask(self, x: Array) -> Array:  # type: ignore[override]
        """``prod_i x_i (a - x_i) / (a/2)^2``: smooth, in ``(0, 1]`` inside, 0 on the boundary."""
        x = _check_point(x, self.dim, "InfiniteWell.boundary_mask")
        a = self.length
        return jnp.prod(x * (a - x)) / (a / 2) ** (2 * self.dim)

    def input_standardization(self) -> tuple[np.ndarray, np.ndarray]:
        """Centre ``a / 2`` and the uniform distribution's standard deviation ``a / sqrt(12)``
        per axis: the network sees coordinates of mean 0 and variance 1. On raw coordinates
        in ``[0, a]^d`` a freshly initialised MLP is nearly constant over the box, and a
        constant times the polynomial mask is already within 1.3% of each level per axis, so
        the correction the network must learn gives a weak signal; standardised, the box
        trains about ten times more accurately in the same steps
        (``benchmarks/results/high_dim/README.md``)."""
        a = self.length
        return np.full(self.dim, a / 2), np.full(self.dim, a / math.sqrt(12.0))

    def multi_indices(self, L: int) -> np.ndarray:
        """``(L, dim)`` quantum numbers ``n_i >= 1`` of the ``L`` lowest states, in order."""
        L = check_num_states(L)
        # Integer 1-D spectrum n^2 (exact ties), index m -> n = m + 1.
        return _lowest_states(lambda k, c: np.arange(1, c + 1) ** 2, self.dim, L)[1] + 1

    def energies(self, L: int) -> np.ndarray:
        n = self.multi_indices(L)
        return (math.pi / self.length) ** 2 * np.sum(n**2, axis=-1).astype(np.float64)

    def eigenfunctions(self, x: Array, L: int) -> Array:
        x = _check_point(x, self.dim, "InfiniteWell.eigenfunctions")
        n = self.multi_indices(L)
        a = self.length
        waves = jnp.sin(jnp.asarray(n * (math.pi / a), x.dtype) * x)  # (L, dim)
        return (2.0 / a) ** (self.dim / 2) * jnp.prod(waves, axis=-1)

    def default_sampler(self, L: int) -> UniformBoxSampler:
        check_num_states(L)
        return UniformBoxSampler(0.0, self.length, self.dim)


# ---------------------------------------------------------------------------------------------
# Han-Lu-Zhou cosine potential.
# ---------------------------------------------------------------------------------------------

# Fourier cut-off of the 1-D eigenproblem and how many of its modes are trusted. A mode with
# wavenumber ~k has coefficients decaying like prod_j (c/2) / (j^2 - k^2) beyond k, so the lowest
# _COSINE_MODES modes (k <= 32) are exact to machine precision with |k| <= _COSINE_CUTOFF.
_COSINE_CUTOFF = 96
_COSINE_MODES = 64


@functools.lru_cache(maxsize=32)
def _cosine_1d(c: float):
    """Eigenpairs of ``-d^2/dx^2 + c cos x`` on the periodic interval ``[-pi, pi]``.

    Diagonalised separately in the orthonormal even basis ``{1/sqrt(2pi), cos(kx)/sqrt(pi)}`` and
    odd basis ``{sin(kx)/sqrt(pi)}``, ``k <= _COSINE_CUTOFF`` (equivalent to the ``e^{ikx}`` basis
    with diagonal ``k^2`` and off-diagonals ``c/2``, but with real eigenvectors). Matrix elements:
    ``k^2`` on the diagonal, ``c/2`` between ``k`` and ``k+1``, except ``c/sqrt(2)`` between the
    constant and ``cos x``. Returns the lowest ``_COSINE_MODES`` modes as ``(values (M,), parity
    (M,) 0 = even / 1 = odd, coefficients (M, K+1))`` (odd: coefficient k of ``sin(kx)/sqrt(pi)``,
    entry 0 unused).
    """
    K = _COSINE_CUTOFF
    k = np.arange(K + 1, dtype=np.float64)
    even = np.diag(k**2) + np.diag(np.full(K, c / 2), 1) + np.diag(np.full(K, c / 2), -1)
    even[0, 1] = even[1, 0] = c / math.sqrt(2)
    off = np.full(K - 1, c / 2)
    odd = np.diag(k[1:] ** 2) + np.diag(off, 1) + np.diag(off, -1)
    ev, vec_e = np.linalg.eigh(even)
    ov, vec_o = np.linalg.eigh(odd)
    values = np.concatenate([ev, ov])
    parity = np.concatenate([np.zeros(K + 1, int), np.ones(K, int)])
    coefs = np.zeros((2 * K + 1, K + 1))
    coefs[: K + 1] = vec_e.T
    coefs[K + 1 :, 1:] = vec_o.T
    # Fix the sign: the largest coefficient positive (deterministic eigenfunctions).
    big = np.argmax(np.abs(coefs), axis=1)
    coefs *= np.sign(coefs[np.arange(len(coefs)), big])[:, None]
    order = np.argsort(values, kind="stable")[:_COSINE_MODES]
    return values[order], parity[order], coefs[order]


@dataclasses.dataclass(frozen=True)
class CosinePotential(Problem):
    """``H = -Lap + sum_i c_i cos(x_i)`` on the periodic box ``[-pi, pi]^d`` (Han, Lu, Zhou).

    Separable: energies are sums of 1-D periodic eigenvalues, computed to machine precision in a
    truncated Fourier basis (``_cosine_1d``; ``|k| <= 96``, lowest 64 1-D modes trusted), and
    eigenfunctions are products of the real 1-D eigenvectors ``sum_k a_k cos(kx)`` /
    ``sum_k b_k sin(kx)``, ordered by energy then multi-index. The default coefficients give the
    reference's d = 2 values -0.5916245, 0.6233656, 0.6628879, 0.8915460, ...

    Periodicity: the eigenfunctions are ``2 pi``-periodic, so the network must be too (e.g. take
    ``cos x_i, sin x_i`` as input features); ``periodic = True`` flags this. Default sampler:
    uniform on ``[-pi, pi]^d`` (``log p`` constant: the weighted operator is the plain one).

    Args:
      dim: dimension d.
      coefficients: ``c_i``, one per dimension (a single value is broadcast); default
        (``None``) the Han-Lu-Zhou coefficients of that dimension, tabulated for d = 2, 5
        and 10 (:data:`HAN_LU_ZHOU_COEFFICIENTS`, ``_5D``, ``_10D``).

    In d = 5 and 10 the coefficients are small (<= 0.19), so above the ground state lie ``2d``
    nearly degenerate states (one quantum ``e^{+-i x_k}`` in one coordinate, energies near 1):
    learn ``L = 1 + 2d`` (the whole cluster) rather than a number that cuts through it.
    """

    dim: int = 2
    coefficients: Any = None

    periodic: ClassVar[bool] = True

    def __post_init__(self):
        _check_dim(self.dim, "CosinePotential")
        if self.coefficients is None:
            table = {2: HAN_LU_ZHOU_COEFFICIENTS, 5: HAN_LU_ZHOU_COEFFICIENTS_5D,
                     10: HAN_LU_ZHOU_COEFFICIENTS_10D}
            if self.dim not in table:
                raise ValueError(
                    f"CosinePotential: the Han-Lu-Zhou coefficients are tabulated for d = 2, 5 "
                    f"and 10, not d = {self.dim}; pass coefficients=(c_1, ..., c_d)."
                )
            object.__setattr__(self, "coefficients", table[self.dim])
        coefs = tuple(float(c) for c in np.ravel(self.coefficients))
        if len(coefs) == 1:
            coefs = coefs * self.dim
        if len(coefs) != self.dim or not all(np.isfinite(coefs)):
            raise ValueError(
                f"CosinePotential: coefficients must be {self.dim} finite numbers (one per "
                f"dimension) or a single one; got {self.coefficients!r}."
            )
        object.__setattr__(self, "coefficients", coefs)

    @property
    def box(self) -> tuple[float, float]:
        return (-math.pi, math.pi)

    def potential(self, x: Array) -> Array:
        x = _check_point(x, self.dim, "CosinePotential.potential")
        return jnp.sum(jnp.asarray(self.coefficients, x.dtype) * jnp.cos(x))

    def multi_indices(self, L: int) -> np.ndarray:
        """``(L, dim)`` indices of the 1-D modes (ascending order per coordinate) of each state."""
        return self._states(check_num_states(L))[1]

    def _states(self, L: int):
        spectra = [_cosine_1d(c)[0] for c in self.coefficients]
        return _lowest_states(lambda k, count: spectra[k][:count], self.dim, L)

    def energies(self, L: int) -> np.ndarray:
        return self._states(check_num_states(L))[0].astype(np.float64)

    def eigenfunctions(self, x: Array, L: int) -> Array:
        x = _check_point(x, self.dim, "CosinePotential.eigenfunctions")
        index = self.multi_indices(L)
        m_max = int(index.max()) + 1
        # Only Fourier terms with non-negligible weight in the used modes (speed, not accuracy).
        k = np.arange(_COSINE_CUTOFF + 1)
        factors = []
        for dim_k, c in enumerate(self.coefficients):
            _, parity, coefs = _cosine_1d(c)
            parity, coefs = parity[:m_max], coefs[:m_max]
            used = np.nonzero(np.any(np.abs(coefs) > 1e-15, axis=0))[0]
            kk = k[: used.max() + 1]
            coefs = coefs[:, : len(kk)]
            # Orthonormal basis at x_k: even 1/sqrt(2pi), cos(kx)/sqrt(pi); odd sin(kx)/sqrt(pi).
            theta = jnp.asarray(kk, x.dtype) * x[dim_k]
            cos_b = jnp.cos(theta) / math.sqrt(math.pi)
            cos_b = cos_b.at[0].set(1.0 / math.sqrt(2 * math.pi))
            sin_b = jnp.sin(theta) / math.sqrt(math.pi)
            even = jnp.asarray(coefs, x.dtype) @ cos_b
            odd = jnp.asarray(coefs, x.dtype) @ sin_b
            modes = jnp.where(jnp.asarray(parity == 1), odd, even)  # (m_max,)
            factors.append(modes[index[:, dim_k]])
        return jnp.prod(jnp.stack(factors, axis=-1), axis=-1)

    def default_sampler(self, L: int) -> UniformBoxSampler:
        check_num_states(L)
        return UniformBoxSampler(-math.pi, math.pi, self.dim)
