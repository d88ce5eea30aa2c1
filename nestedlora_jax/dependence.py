"""The canonical dependence kernel (CDK) of paired data: operator, data samplers, exact cases.

For a joint law ``p(x, y)`` with marginals ``p(x)``, ``p(y)`` (Xu & Zheng 2023), the CDK is::

    k(x, y) = p(x, y) / (p(x) p(y)) - 1,     (K g)(x) = E[g(Y) | X = x] - E[g(Y)]

an operator ``L2(p_y) -> L2(p_x)`` with adjoint ``(K* f)(y) = E[f(X) | Y = y] - E[f(X)]``. Its
singular functions are the maximally correlated features of X and Y (the nonlinear
generalisation of CCA; for jointly Gaussian pairs they are Hermite polynomials of the canonical
variates, with the products of canonical correlations as singular values, see
:class:`GaussianPairs`), and ``f(x)^T g(y)`` with ``f_i = sqrt(s_i) phi_i``,
``g_i = sqrt(s_i) psi_i`` is the best rank-L approximation of ``k``.

**Learning it from pairs.** NestedLoRA needs ``<f_i, K g_i>`` and the second moments
``<f_i, f_j>_{p_x}``, ``<g_i, g_j>_{p_y}``. From a batch of pairs ``(x_b, y_b) ~ p(x, y)``,
``g(y_b) - E g`` is an unbiased single-sample estimate of ``(K g)(x_b)`` (``y_b`` is a draw from
``p(y | x_b)``). :func:`dependence_kernel_operator` uses ``Tg_b = g_b - mean_{b' != b} g_b'`` (the
leave-one-out mean), so that ``mean_b f_b . Tg_b = mean f g - (1 / (B (B - 1))) sum_{b != b'}
f_b g_b'`` is unbiased for ``E_{p(x,y)}[f g] - E f E g``, and its derivative in ``f_b`` is
``Tg_b / B``, as the objective's closed-form gradient assumes. The quadratic term multiplies a
moment of the x's of one batch half with a moment of the y's of the other half (the objective's
``split_batch``): different pairs, so independent, so the product is unbiased too.

**The constant mode.** ``p(x, y) / (p(x) p(y))`` without the ``- 1`` has the constant functions
as its top singular pair (singular value 1). The public reference (jongharyu/neural-svd,
``NestedLoRAForCDK``) keeps that kernel and prepends the fixed constant function to both
families; in its nested gradient the constant's cross term ``<1, f_j> <1, g_j>`` turns the
linear term's ``g_j`` into ``g_j - E g_j``, exactly the gradient here. We subtract the constant
mode from the kernel instead: the same updates, with every learned function a wanted one (no
padding, L outputs mean L singular pairs), and with the two biased estimates of the reference
replaced by unbiased ones (the reference estimates ``E f E g`` and both second moments from the
same pairs).

**Data.** :class:`PairedData` draws minibatches of aligned pairs ``(N, dx)``, ``(N, dy)`` from
memory (or an ``.npz`` file); :class:`ClassPairedData` draws class-level pairs,
``p(x, y) = E_c[p(x | c) p(y | c)]`` (x and y independent given a shared label), as for
cross-view retrieval. :func:`discrete_dependence_operator` is the exact (population) CDK of a
finite joint distribution (correspondence analysis), for tests and for categorical data.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax import metrics as M
from nestedlora_jax._checks import check_num_states, check_positive_int
from nestedlora_jax.objectives import OperatorOutput
from nestedlora_jax.operators import BatchOperator, matrix_operator

Array = jax.Array

__all__ = [
    "ClassPairedData",
    "GaussianPairs",
    "PairedData",
    "centred_leave_one_out",
    "dependence_kernel_operator",
    "discrete_dependence_operator",
    "discrete_dependence_singular_values",
    "pair_metrics",
]


# ----------------------------------------------------------------- operators


def dependence_kernel_operator() -> BatchOperator:
    """The CDK ``K`` on a batch of pairs, as a two-sided :class:`~nestedlora_jax.operators.BatchOperator`.

    ``apply((f_fn, g_fn), (xs, ys))`` with ``xs`` ``(B, dx)``, ``ys`` ``(B, dy)`` drawn as pairs
    gives ``OperatorOutput(f, Tg, g, Tadj_f)`` with ``f = f_fn(xs)``, ``g = g_fn(ys)`` and::

        Tg_b     = g_b - (sum_{b'} g_b' - g_b) / (B - 1)     (unbiased for (K g)(x_b))
        Tadj_f_b = f_b - (sum_{b'} f_b' - f_b) / (B - 1)     (unbiased for (K* f)(y_b))

    (module docstring). Train with :func:`~nestedlora_jax.objectives.nested_lora_objective`
    (either nesting); with ``split_batch`` (the default) every estimate in the objective is
    unbiased.
    """

    def apply(functions, batch, key=None):
        f_fn, g_fn = _two_functions(functions)
        xs, ys = _pair_batch(batch)
        f, g = jax.vmap(f_fn)(xs), jax.vmap(g_fn)(ys)
        return OperatorOutput(f, centred_leave_one_out(g), g, centred_leave_one_out(f))

    return BatchOperator(apply, two_sided=True, name="canonical dependence kernel")


def centred_leave_one_out(h):
    """``h_b - mean_{b' != b} h_b'`` for ``h`` ``(B, L)`` (numpy or jax): on paired samples, the
    unbiased single-pair estimate of the dependence kernel applied to the other family."""
    return h - (h.sum(axis=0) - h) / (h.shape[0] - 1)


def discrete_dependence_operator(joint) -> BatchOperator:
    """The exact CDK of a finite joint distribution ``P`` ``(nx, ny)`` (population expectations).

    The functions are evaluated at the category indices ``i = 0..nx-1`` and ``j = 0..ny-1``
    (passed as points of shape ``(1,)``, e.g. ``apply(table, i) = table[i[0].astype(int)]`` for
    free parameter tables); the batch is not used. With ``p_x``, ``p_y`` the marginals, the
    vectors ``sqrt(p_x) f`` and ``sqrt(p_y) g`` see the Euclidean operator
    ``P / sqrt(p_x p_y^T) - sqrt(p_x) sqrt(p_y)^T`` (the kernel ``P / (p_x p_y^T) - 1`` in those
    coordinates), applied by :func:`~nestedlora_jax.operators.matrix_operator`: batch means are
    the exact ``p``-expectations, with or without ``split_batch``. Its singular values are those
    of ``P / sqrt(p_x p_y^T)`` without the top one (1): see
    :func:`discrete_dependence_singular_values`.
    """
    P = _check_joint(joint)
    sqrt_px, sqrt_py = np.sqrt(P.sum(axis=1)), np.sqrt(P.sum(axis=0))
    euclidean = matrix_operator(_centred_table(P))

    def weighted(fn, sqrt_p):
        def point(i):
            value = fn(i)
            return jnp.asarray(sqrt_p, value.dtype)[i[0].astype(jnp.int32)] * value

        return point

    def apply(functions, batch=None, key=None):
        f_fn, g_fn = _two_functions(functions)
        return euclidean.apply((weighted(f_fn, sqrt_px), weighted(g_fn, sqrt_py)))

    return BatchOperator(apply, two_sided=True, name="discrete dependence kernel")


def discrete_dependence_singular_values(joint) -> np.ndarray:
    """Singular values of the CDK of ``P`` ``(nx, ny)``: those of ``P / sqrt(p_x p_y^T)`` after
    the top one (which is 1, the constant mode), descending, ``min(nx, ny) - 1`` of them."""
    P = _check_joint(joint)
    return np.linalg.svd(_centred_table(P), compute_uv=False)[: min(P.shape) - 1]


def _centred_table(P: np.ndarray) -> np.ndarray:
    """``P / sqrt(p_x p_y^T) - sqrt(p_x) sqrt(p_y)^T``: the normalised joint table without its
    constant mode (whose singular vectors are ``sqrt(p_x)``, ``sqrt(p_y)``, singular value 1)."""
    sqrt_px, sqrt_py = np.sqrt(P.sum(axis=1)), np.sqrt(P.sum(axis=0))
    return P / np.outer(sqrt_px, sqrt_py) - np.outer(sqrt_px, sqrt_py)


def _check_joint(joint) -> np.ndarray:
    P = np.asarray(joint, dtype=np.float64)
    if P.ndim != 2 or min(P.shape) < 2:
        raise ValueError(f"the joint distribution must be a (nx, ny) table with nx, ny >= 2, got "
                         f"shape {P.shape}.")
    if not np.all(np.isfinite(P)) or np.any(P < 0) or not P.sum() > 0:
        raise ValueError("the joint distribution must be finite and non-negative with a positive sum.")
    P = P / P.sum()
    if np.any(P.sum(axis=1) == 0) or np.any(P.sum(axis=0) == 0):
        raise ValueError("every category needs positive marginal probability (drop empty rows or "
                         "columns of the joint table).")
    return P


def _two_functions(functions):
    if not (isinstance(functions, tuple) and len(functions) == 2):
        raise ValueError("the dependence kernel is two-sided: it takes a pair of networks (f, g), "
                         "e.g. fit(apply=(apply_f, apply_g), params=(params_f, params_g), ...).")
    return functions


def _pair_batch(batch):
    if not (isinstance(batch, tuple) and len(batch) == 2):
        raise ValueError("the dependence kernel takes a batch of pairs (xs, ys), e.g. from "
                         f"PairedData; got {type(batch).__name__}.")
    xs, ys = batch
    if xs.ndim != 2 or ys.ndim != 2 or xs.shape[0] != ys.shape[0]:
        raise ValueError(f"a batch of pairs needs xs (B, dx) and ys (B, dy) with the same B; got "
                         f"shapes {xs.shape} and {ys.shape}.")
    if xs.shape[0] < 2:
        raise ValueError(f"the dependence kernel needs at least 2 pairs per batch, got {xs.shape[0]}.")
    return xs, ys


# ----------------------------------------------------------------- data


def _as_data(name: str, a, dtype) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as exc:  # noqa: BLE001 - re-raised with what to pass
        raise ValueError(f"{name} must be an array of shape (N, d); got {type(a).__name__}.") from exc
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (N, d) (one row per sample), got shape {arr.shape}.")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}): it needs at least 2 samples of "
                         "dimension >= 1.")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}.")
    arr = arr.astype(dtype)
    bad = ~np.all(np.isfinite(arr), axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has {bad.sum()} rows with non-finite values (first: row "
                         f"{rows[0]}): remove or impute them before training.")
    return arr


@dataclasses.dataclass(frozen=True, eq=False)
class PairedData:
    """Aligned pairs ``(x_n, y_n)``, ``n < N``, held in memory: a sampler of pair batches.

    ``sample(key, B)`` draws ``B`` pairs independently and uniformly (with replacement), inside
    the compiled step: independent draws from the empirical distribution keep every estimate of
    the objective unbiased for it (the two batch halves are independent samples, and the
    leave-one-out means average independent draws), and cost ``O(B)`` whatever ``N``. (A random
    permutation per step, for draws without replacement, costs a sort of all ``N`` indices: 15
    ms per step at ``N = 20000`` on a CPU, more than the training step itself.)

    Attributes:
      x: ``(N, dx)`` (a ``(N,)`` array is one feature).
      y: ``(N, dy)``.
      dtype: the dtype samples are drawn in (default float32).
    """

    x: Any
    y: Any
    dtype: Any = np.float32

    def __post_init__(self):
        x = _as_data("x", self.x, self.dtype)
        y = _as_data("y", self.y, self.dtype)
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"paired data needs one y per x: got {x.shape[0]} x's and {y.shape[0]} "
                             "y's (for class-level pairs, use ClassPairedData with labels).")
        if x.shape[0] < 2:
            raise ValueError(f"paired data needs at least 2 pairs, got {x.shape[0]}.")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @classmethod
    def from_npz(cls, path: str | os.PathLike, x: str = "x", y: str = "y", **kwargs) -> "PairedData":
        """Pairs from the arrays ``x`` and ``y`` (names of the entries) of an ``.npz`` file."""
        with np.load(os.fspath(path)) as data:
            missing = [k for k in (x, y) if k not in data.files]
            if missing:
                raise ValueError(f"{os.fspath(path)} has no array(s) {missing}; it holds "
                                 f"{data.files}: pass x=..., y=... to name them.")
            return cls(data[x], data[y], **kwargs)

    @property
    def dim(self) -> tuple[int, int]:
        """``(dx, dy)``."""
        return (self.x.shape[1], self.y.shape[1])

    @property
    def num_pairs(self) -> int:
        return self.x.shape[0]

    def sample(self, key: Array, n: int):
        """``(xs (n, dx), ys (n, dy))``: ``n`` pairs drawn independently and uniformly."""
        check_positive_int("batch size", n)
        idx = jax.random.randint(key, (n,), 0, self.num_pairs)
        return jnp.asarray(self.x)[idx], jnp.asarray(self.y)[idx]


@dataclasses.dataclass(frozen=True, eq=False)
class ClassPairedData:
    """Class-level pairs: ``p(x, y) = E_c[p(x | c) p(y | c)]``.

    ``sample(key, B)`` draws ``B`` x's independently and uniformly, then for each an independent
    y uniformly among the y's with the same label (x and y need not be aligned, and their counts
    may differ). Every label of an x must occur among the y's.

    Attributes:
      x, x_labels: ``(Nx, dx)`` and ``(Nx,)`` integer labels.
      y, y_labels: ``(Ny, dy)`` and ``(Ny,)``.
    """

    x: Any
    x_labels: Any
    y: Any
    y_labels: Any
    dtype: Any = np.float32

    def __post_init__(self):
        x = _as_data("x", self.x, self.dtype)
        y = _as_data("y", self.y, self.dtype)
        lx = self._labels("x_labels", self.x_labels, x.shape[0])
        ly = self._labels("y_labels", self.y_labels, y.shape[0])
        classes = np.unique(ly)
        missing = np.setdiff1d(np.unique(lx), classes)
        if missing.size:
            raise ValueError(f"labels {missing[:5].tolist()} of x have no y with the same label: "
                             "every class needs samples on both sides.")
        if x.shape[0] < 2:
            raise ValueError(f"class-level pairs need at least 2 x's, got {x.shape[0]}.")
        order = np.argsort(ly, kind="stable")
        ly_sorted = ly[order]
        # y's of class c are y[order][start[c] : start[c] + count[c]].
        class_index = np.searchsorted(classes, lx)
        start = np.searchsorted(ly_sorted, classes, side="left")
        count = np.searchsorted(ly_sorted, classes, side="right") - start
        for name, value in (("x", x), ("y", y[order]), ("x_labels", lx)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "y_labels", ly_sorted)
        object.__setattr__(self, "_class_of_x", class_index.astype(np.int32))
        object.__setattr__(self, "_start", start.astype(np.int32))
        object.__setattr__(self, "_count", count.astype(np.int32))

    @staticmethod
    def _labels(name, labels, n):
        lab = np.asarray(labels)
        if lab.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), one label per sample, got {lab.shape}.")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{name} must be integers (class ids), got dtype {lab.dtype}.")
        return lab

    @property
    def dim(self) -> tuple[int, int]:
        return (self.x.shape[1], self.y.shape[1])

    def sample(self, key: Array, n: int):
        """``(xs (n, dx), ys (n, dy))``: random x's, each with a random y of its class."""
        check_positive_int("batch size", n)
        kx, ky = jax.random.split(key)
        ix = jax.random.randint(kx, (n,), 0, self.x.shape[0])
        c = jnp.asarray(self._class_of_x)[ix]
        start, count = jnp.asarray(self._start)[c], jnp.asarray(self._count)[c]
        offset = jnp.floor(jax.random.uniform(ky, (n,)) * count).astype(jnp.int32)
        iy = start + jnp.minimum(offset, count - 1)
        return jnp.asarray(self.x)[ix], jnp.asarray(self.y)[iy]


# ----------------------------------------------------------------- exact Gaussian pairs


def _hermite_normalised(z, k_max: int):
    """``He_k(z) / sqrt(k!)``, ``k = 0..k_max``, stacked on the last axis (probabilists')."""
    out = [jnp.ones_like(z), z]
    for k in range(1, k_max):
        out.append(z * out[k] - k * out[k - 1])
    h = jnp.stack(out[: k_max + 1], axis=-1)
    norms = jnp.sqrt(jnp.asarray([math.factorial(k) for k in range(k_max + 1)], h.dtype))
    return h / norms


@dataclasses.dataclass(frozen=True)
class GaussianPairs:
    """Jointly Gaussian ``(X, Y)``, ``X in R^dx``, ``Y in R^dy``, with canonical correlations
    ``rho_1 > ... > 0``: a CDK with exact singular values and functions (Mehler's formula).

    In canonical variates ``u = A_x^{-1} x``, ``v = A_y^{-1} y`` (standard normal, ``corr(u_i,
    v_i) = rho_i``, all other pairs independent) the CDK's singular pairs are
    ``prod_i He_{k_i}(u_i) / sqrt(k_i!)`` and ``prod_i He_{k_i}(v_i) / sqrt(k_i!)`` with singular
    value ``prod_i rho_i^{k_i}``, over multi-indices ``k`` with ``k != 0`` (the constant mode is
    not in ``k - 1``). With ``mix=True`` the maps ``A_x``, ``A_y`` are random well-conditioned
    matrices (from ``seed``), so the wanted features are not aligned with the coordinates;
    otherwise the identity.

    Attributes:
      correlations: the canonical correlations, in ``(0, 1)``, at most ``min(dx, dy)``.
      dx, dy: the dimensions (default: the number of correlations).
    """

    correlations: tuple = (0.8,)
    dx: int | None = None
    dy: int | None = None
    mix: bool = False
    seed: int = 0

    def __post_init__(self):
        rho = tuple(float(r) for r in np.atleast_1d(np.asarray(self.correlations, np.float64)))
        if not rho or not all(0.0 < r < 1.0 for r in rho):
            raise ValueError(f"correlations must be in (0, 1), got {self.correlations!r}.")
        object.__setattr__(self, "correlations", rho)
        for name in ("dx", "dy"):
            value = getattr(self, name)
            value = len(rho) if value is None else check_positive_int(name, value)
            if value < len(rho):
                raise ValueError(f"{name} = {value} is smaller than the {len(rho)} canonical "
                                 "correlations.")
            object.__setattr__(self, name, value)

    @property
    def dim(self) -> tuple[int, int]:
        return (self.dx, self.dy)

    def _mixing(self, side: int, d: int) -> np.ndarray:
        if not self.mix:
            return np.eye(d)
        rng = np.random.default_rng([self.seed, side])
        q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        return q * rng.uniform(0.5, 2.0, size=d)[None, :]  # rotation times axis scales

    @property
    def mixing(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A_x, A_y)``: ``x = A_x u``, ``y = A_y v``."""
        return self._mixing(0, self.dx), self._mixing(1, self.dy)

    def sample(self, key: Array, n: int, dtype=jnp.float32):
        """``n`` independent pairs ``(xs (n, dx), ys (n, dy))``."""
        ku, ke = jax.random.split(key)
        u = jax.random.normal(ku, (n, self.dx), dtype)
        e = jax.random.normal(ke, (n, self.dy), dtype)
        return self._pairs_from_latent(u, e, jnp)

    def _pairs_from_latent(self, u, e, xp):
        """``(x, y)`` from independent standard normals ``u`` ``(n, dx)``, ``e`` ``(n, dy)``:
        ``v_i = rho_i u_i + sqrt(1 - rho_i^2) e_i`` for the correlated variates, ``v_i = e_i``
        for the rest, then ``x = A_x u``, ``y = A_y v``. ``xp``: ``numpy`` or ``jax.numpy``."""
        rho = xp.asarray(self.correlations, u.dtype)
        r = rho.shape[0]
        v = xp.concatenate([rho * u[:, :r] + xp.sqrt(1 - rho**2) * e[:, :r], e[:, r:]], axis=1)
        ax, ay = (xp.asarray(a, u.dtype) for a in self.mixing)
        return u @ ax.T, v @ ay.T

    def quadrature(self, num: int = 40):
        """A tensor Gauss-Hermite rule for expectations under ``p(x, y)``: nodes
        ``(xs (n, dx), ys (n, dy))`` and weights ``(n,)`` summing to 1, ``n = num^(dx + dy)``
        (the pair is a linear map of ``dx + dy`` independent standard normals). Its marginals
        are rules for ``p(x)`` and ``p(y)``. Exact for polynomials of degree ``2 num - 1`` in each
        latent variable, so evaluation of smooth learned functions has no Monte Carlo noise
        (the variance of high-degree Hermite products makes sampling useless at 1e-3)."""
        num = check_positive_int("num", num)
        d = self.dx + self.dy
        if num**d > 5_000_000:
            raise ValueError(f"num={num} gives {num}^{d} = {num**d:.3g} nodes; use a smaller num "
                             "(or Monte Carlo samples).")
        z, w = np.polynomial.hermite_e.hermegauss(num)
        w = w / np.sqrt(2 * np.pi)
        grids = np.meshgrid(*([z] * d), indexing="ij")
        latent = np.stack([g.reshape(-1) for g in grids], axis=1)
        weights = np.prod(np.stack(np.meshgrid(*([w] * d), indexing="ij")).reshape(d, -1), axis=0)
        xs, ys = self._pairs_from_latent(latent[:, : self.dx], latent[:, self.dx:], np)
        return xs, ys, weights

    def _indices(self, L: int):
        L = check_num_states(L)
        rho = np.asarray(self.correlations)
        r = len(rho)
        # Best-first search over multi-indices: a product only shrinks when a degree grows, so
        # the next largest value is always a successor k + e_i of one already taken.
        value = lambda k: float(np.prod(rho ** np.asarray(k)))
        start = [tuple(int(i == j) for j in range(r)) for i in range(r)]
        heap = [(-value(k), k) for k in start]
        heapq.heapify(heap)
        seen, taken = set(start), []
        while len(taken) < L:
            v, k = heapq.heappop(heap)
            taken.append((k, -v))
            for i in range(r):
                nxt = tuple(k[j] + (j == i) for j in range(r))
                if nxt not in seen:
                    seen.add(nxt)
                    heapq.heappush(heap, (-value(nxt), nxt))
        return np.array([k for k, _ in taken]), np.array([v for _, v in taken])

    def singular_values(self, L: int) -> np.ndarray:
        """The ``L`` largest singular values ``prod_i rho_i^{k_i}``, descending (float64)."""
        return self._indices(L)[1]

    def multi_indices(self, L: int) -> np.ndarray:
        """``(L, r)``: the Hermite degrees ``k`` of each of the top ``L`` singular pairs."""
        return self._indices(L)[0]

    def degenerate_blocks(self, L: int) -> list[tuple[int, int]]:
        """Half-open ranges of equal singular values among the top ``L``."""
        s = self.singular_values(L)
        blocks, a = [], 0
        for i in range(1, L + 1):
            if i == L or not np.isclose(s[i], s[a], rtol=1e-10):
                blocks.append((a, i))
                a = i
        return blocks

    def _functions(self, points, L: int, side: int):
        points = jnp.asarray(points)
        a = self.mixing[side]
        z = points @ jnp.asarray(np.linalg.inv(a).T, points.dtype)
        k = self.multi_indices(L)
        h = _hermite_normalised(z[:, : k.shape[1]], int(k.max()))  # (n, r, k_max + 1)
        cols = [jnp.prod(jnp.stack([h[:, i, k[j, i]] for i in range(k.shape[1])]), axis=0)
                for j in range(L)]
        return jnp.stack(cols, axis=1)

    def left_functions(self, x, L: int):
        """``(n, L)``: the exact left singular functions ``phi_j`` at ``x`` ``(n, dx)``,
        orthonormal in ``L2(p_x)``."""
        return self._functions(x, L, 0)

    def right_functions(self, y, L: int):
        """``(n, L)``: the exact right singular functions ``psi_j`` at ``y`` ``(n, dy)``."""
        return self._functions(y, L, 1)


# ----------------------------------------------------------------- evaluation


def pair_metrics(embed_x, embed_y, xs, ys, *, weights=None, exact=None, phi=None, psi=None,
                 blocks=None, chunk: int = 65536) -> dict:
    """:func:`~nestedlora_jax.metrics.svd_metrics` of learned features on pairs ``(xs, ys)``.

    ``embed_x(xs) -> (n, L)`` and ``embed_y(ys) -> (n, L)`` are the learned left and right
    functions (batched), evaluated chunk by chunk. With ``weights`` (a quadrature rule for
    ``p(x, y)``, e.g. :meth:`GaussianPairs.quadrature`) the CDK is applied with the weighted
    means, ``(K g)(x_n) = g(y_n) - sum_m w_m g(y_m)``; without, the pairs are samples (weights
    ``1/N``) and the leave-one-out mean makes ``<f, K g>`` unbiased, as in training.
    ``exact``, ``phi`` ``(n, L)``, ``psi`` ``(n, L)``, ``blocks``: the exact singular values and
    functions at ``xs``, ``ys`` (e.g. from :class:`GaussianPairs`), for errors and distances.
    Returns the dict of ``svd_metrics`` as numpy values (float64).
    """
    xs, ys = np.asarray(xs), np.asarray(ys)
    if xs.shape[0] != ys.shape[0]:
        raise ValueError(f"pairs need as many xs as ys: got {xs.shape[0]} and {ys.shape[0]}.")
    n = xs.shape[0]
    if n < 2:
        raise ValueError(f"evaluation needs at least 2 pairs, got {n}.")
    run = lambda fn, a: np.concatenate([np.asarray(fn(jnp.asarray(a[i:i + chunk])), np.float64)
                                        for i in range(0, n, chunk)])
    f, g = run(embed_x, xs), run(embed_y, ys)
    if weights is None:
        w = np.full(n, 1.0 / n)
        Tg = centred_leave_one_out(g)
    else:
        w = np.asarray(weights, np.float64)
        if w.shape != (n,):
            raise ValueError(f"weights must have shape ({n},), one per pair, got {w.shape}.")
        Tg = g - w @ g
    with jax.enable_x64(True):
        out = M.svd_metrics(jnp.asarray(f), jnp.asarray(Tg), jnp.asarray(g), jnp.asarray(w),
                            jnp.asarray(w), exact=None if exact is None else jnp.asarray(exact, jnp.float64),
                            phi=None if phi is None else jnp.asarray(phi, jnp.float64),
                            psi=None if psi is None else jnp.asarray(psi, jnp.float64),
                            blocks=blocks)
        return {k: np.asarray(v) for k, v in out.items()}
