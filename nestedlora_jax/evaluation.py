"""Evaluate learned eigenfunctions against a problem's exact answers (method.md §4).

:func:`evaluate` applies the network and the operator on evaluation points, maps the values to
``L2(dx)`` and computes every metric of :mod:`nestedlora_jax.metrics`: energies by Rayleigh
quotient and by norm, relative errors, orthogonality, per-block subspace distance,
Procrustes-aligned angle distance, residuals, and Rayleigh-Ritz energies on the learned span.

Evaluation points are either a quadrature grid (:func:`quadrature_grid`, d <= 2; weights are
``dx`` weights) or a fresh Monte Carlo sample from the training sampler (any d; weights
``1/N`` on the importance-weighted values). On the Monte Carlo sample the eigenvalue and
subspace estimates have zero variance at the exact eigenfunctions, so their sampling noise is
proportional to the error being measured.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax import metrics as M
from nestedlora_jax.operators import ProblemOperator, energies_from_eigenvalues
from nestedlora_jax.problems import Hydrogen

__all__ = ["evaluate", "quadrature_grid", "network_values"]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _values_chunk(apply, params, operator, x):
    fn = lambda y: apply(params, y)
    return jax.vmap(lambda y: operator(fn, y))(x)


def network_values(apply, params, operator, xs, *, chunk: int = 4096):
    """``(f, Tf)`` on ``xs`` ``(N, d)`` in chunks (bounded memory); numpy float64 ``(N, L)``.

    Compiled once per ``(apply, operator)`` pair and chunk shape, so periodic evaluation
    during training does not recompile.
    """
    fs, Tfs = [], []
    for start in range(0, xs.shape[0], chunk):
        f, Tf = _values_chunk(apply, params, operator, jnp.asarray(xs[start : start + chunk]))
        fs.append(np.asarray(f, np.float64))
        Tfs.append(np.asarray(Tf, np.float64))
    return np.concatenate(fs), np.concatenate(Tfs)


def quadrature_grid(problem, L: int, num: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """A quadrature grid ``(points (N, d), dx-weights (N,))`` covering the first L states.

    * boxes (``problem.box``): tensor Gauss-Legendre with ``num`` nodes per axis;
    * hydrogen (2-D): polar grid, Gauss-Legendre in ``r`` on ``[0, R]`` (R = 12 n_max + 20,
      where the slowest state has decayed below 1e-8) and ``num`` equispaced angles
      (exact for the trigonometric angular parts);
    * otherwise (``d <= 2``): tensor Gauss-Legendre on ``[-R, R]^d`` with ``R`` from the
      problem's ``evaluation_radius(L)`` if it has one, else from its default sampler scale.
    """
    dim = problem.dim
    if dim > 2:
        raise ValueError(
            f"quadrature grids are provided for d <= 2 (got d = {dim}); evaluate on a Monte "
            "Carlo sample instead (evaluate(..., points=None))."
        )
    if problem.box is not None:
        lo, hi = (np.full(dim, float(b)) for b in problem.box)
        return _tensor_gauss_legendre(lo, hi, num)
    if isinstance(problem, Hydrogen) and dim == 2:
        n_max = max(s[0] for s in problem.states(L))
        R = 12.0 * (n_max + 0.5) / getattr(problem, "Z", 1.0) + 20.0
        r, wr = np.polynomial.legendre.leggauss(num)
        r = 0.5 * R * (r + 1.0)
        wr = 0.5 * R * wr * r
        theta = 2 * np.pi * np.arange(num) / num
        wt = np.full(num, 2 * np.pi / num)
        rr, tt = np.meshgrid(r, theta, indexing="ij")
        points = np.stack([rr * np.cos(tt), rr * np.sin(tt)], axis=-1).reshape(-1, 2)
        return points, np.outer(wr, wt).reshape(-1)
    radius = getattr(problem, "evaluation_radius", None)
    R = float(radius(L)) if radius is not None else 8.0 * float(np.max(getattr(problem.default_sampler(L), "scale", 1.0)))
    return _tensor_gauss_legendre(np.full(dim, -R), np.full(dim, R), num)


def _tensor_gauss_legendre(lo, hi, num):
    nodes, weights = np.polynomial.legendre.leggauss(num)
    axes = [0.5 * (h - l) * (nodes + 1.0) + l for l, h in zip(lo, hi)]
    ws = [0.5 * (h - l) * weights for l, h in zip(lo, hi)]
    grids = np.meshgrid(*axes, indexing="ij")
    points = np.stack([g.reshape(-1) for g in grids], axis=-1)
    w = ws[0]
    for extra in ws[1:]:
        w = np.outer(w, extra).reshape(-1)
    return points, w


def evaluate(
    apply: Callable,
    params: Any,
    problem,
    operator: ProblemOperator,
    *,
    points: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    num_samples: int = 65536,
    key: jax.Array | None = None,
    importance_weighted: bool = True,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk: int = 4096,
) -> dict:
    """All metrics of method.md §4 for the learned functions ``apply(params, .)``.

    Args:
      apply, params: the network (one point -> ``(L,)``).
      problem: a problem with ``energies``, ``degenerate_blocks`` and (for distances)
        ``eigenfunctions``.
      operator: the :class:`~nestedlora_jax.operators.ProblemOperator` used in training
        (its operator, sampler and scaling).
      points, weights: a quadrature grid with ``dx`` weights (see :func:`quadrature_grid`).
        ``points`` without ``weights`` are taken as samples from ``operator.sampler``; no
        ``points`` means ``num_samples`` fresh samples from it (drawn with ``key``).
      importance_weighted: the network represents ``psi / sqrt(p)`` (training used the
        sampler's ``log_prob``), as :func:`~nestedlora_jax.operators.problem_operator` does
        by default.
      transform: maps raw outputs ``(N, L)`` to eigenfunction estimates (a baseline's
        ``objective.transform`` with its state bound); identity by default.

    Returns:
      A dict of numpy values: per state ``exact``, ``rayleigh``, ``norm`` (energies),
      ``rel_error`` (Rayleigh), ``rel_error_norm``, ``residual`` (energy units),
      ``angle_distance``; aggregates ``mean_rel_error``, ``max_rel_error``,
      ``orthogonality_fro``, ``orthogonality_max``, ``subspace_distance_blocks`` (per block),
      ``subspace_distance_mean``, ``subspace_distance_total``, ``angle_distance_mean``,
      ``ritz`` (Rayleigh-Ritz energies), ``ritz_rel_error`` and the block subspace distances
      of the Ritz functions (``ritz_subspace_distance_blocks``, ``_mean``); plus ``blocks`` and
      ``num_points``. Print it with ``metrics.summary_table``.
    """
    scale, shift, sampler = operator.scale, operator.shift, operator.sampler
    if points is None:
        key = jax.random.PRNGKey(12345) if key is None else key
        points = np.asarray(sampler.sample(key, num_samples), np.float64)
    elif weights is not None and len(weights) != len(points):
        raise ValueError(
            f"a grid needs one dx-weight per point: got {len(points)} points and "
            f"{len(weights)} weights."
        )
    on_grid = weights is not None
    xs = np.asarray(points, np.float32)
    f, Tf = network_values(apply, params, operator.op, xs, chunk=chunk)
    if transform is not None:
        f, Tf = np.asarray(transform(f), np.float64), np.asarray(transform(Tf), np.float64)
    L = f.shape[1]
    exact = np.asarray(problem.energies(L), np.float64)
    blocks = problem.degenerate_blocks(L)

    with jax.enable_x64(True):
        x64 = jnp.asarray(points, jnp.float64)
        psi = _exact_values(problem, x64, L)
        if importance_weighted:
            half_log_p = 0.5 * np.asarray(_log_probs(sampler, x64), np.float64)
        else:
            half_log_p = None
        if on_grid:
            w = np.asarray(weights, np.float64)
            if half_log_p is not None:  # values of psi = sqrt(p) f
                f, Tf = f * np.exp(half_log_p)[:, None], Tf * np.exp(half_log_p)[:, None]
        else:
            w = np.full(len(points), 1.0 / len(points))
            if psi is not None and half_log_p is not None:  # exact psi in the f representation
                psi = psi * np.exp(-half_log_p)[:, None]
            elif psi is not None:
                psi = None  # L2(p) representation: no exact comparison without the density
        f, Tf, w = jnp.asarray(f), jnp.asarray(Tf), jnp.asarray(w)
        psi = None if psi is None else jnp.asarray(psi)
        m = jax.tree_util.tree_map(np.asarray, _metric_block(f, Tf, w, psi, tuple(map(tuple, blocks))))
        t_norm = m["t_norm"] if on_grid or importance_weighted else np.full(L, np.nan)
        rayleigh = energies_from_eigenvalues(m["t_rayleigh"], scale, shift)
        norm = energies_from_eigenvalues(t_norm, scale, shift)
        rel = np.asarray(M.relative_errors(rayleigh, exact).per_state)
        rel_norm = np.asarray(M.relative_errors(norm, exact).per_state)
        ritz_energies = energies_from_eigenvalues(m["ritz"], scale, shift)
        out = {
            "exact": exact,
            "rayleigh": rayleigh,
            "norm": norm,
            "rel_error": rel,
            "rel_error_norm": rel_norm,
            "residual": m["residual"] / scale,
            "mean_rel_error": float(np.mean(rel)),
            "max_rel_error": float(np.max(rel)),
            "mean_rel_error_norm": float(np.mean(rel_norm)),
            "orthogonality_fro": float(m["orthogonality_fro"]),
            "orthogonality_max": float(m["orthogonality_max"]),
            "ritz": ritz_energies,
            "ritz_rel_error": np.asarray(M.relative_errors(ritz_energies, exact).per_state),
            "blocks": [list(b) for b in blocks],
            "num_points": int(len(points)),
            "evaluation": "quadrature grid" if on_grid else "Monte Carlo",
        }
        if psi is not None:
            out.update(
                angle_distance=m["angle_distance"],
                angle_distance_mean=float(m["angle_distance_mean"]),
                subspace_distance_blocks=m["subspace_distance_blocks"],
                subspace_distance_mean=float(m["subspace_distance_mean"]),
                subspace_distance_total=float(m["subspace_distance_total"]),
                ritz_subspace_distance_blocks=m["ritz_subspace_distance_blocks"],
                ritz_subspace_distance_mean=float(m["ritz_subspace_distance_mean"]),
            )
    return out


@functools.partial(jax.jit, static_argnames=("blocks",))
def _metric_block(f, Tf, w, psi, blocks):
    """Every metric in one compiled call: run op by op, the float64 linear algebra compiled
    some 170 small programs per evaluation (about 7 s of a 9 s evaluation on the CPU)."""
    ortho = M.orthogonality(f, w)
    ritz = M.rayleigh_ritz(f, Tf, w)
    out = {
        "t_rayleigh": M.rayleigh_quotients(f, Tf, w),
        "t_norm": M.norms_squared(f, w),
        "residual": M.residuals(f, Tf, None, w),
        "orthogonality_fro": ortho.frobenius,
        "orthogonality_max": ortho.max_offdiag,
        "ritz": ritz.eigenvalues,
    }
    if psi is not None:
        # Rayleigh-Ritz post-processing: rotating within span(f) removes mixing across levels
        # (but not error outside the span).
        ritz_sub = M.subspace_distance(f @ ritz.coefficients, psi, w, blocks)
        out.update(ritz_subspace_distance_blocks=ritz_sub.per_block,
                   ritz_subspace_distance_mean=ritz_sub.mean)
        sub = M.subspace_distance(f, psi, w, blocks)
        ang = M.angle_distance(f, psi, w, blocks)
        out.update(
            angle_distance=ang.per_function,
            angle_distance_mean=ang.mean,
            subspace_distance_blocks=sub.per_block,
            subspace_distance_mean=sub.mean,
            subspace_distance_total=sub.total,
        )
    return out


def _per_point(fn, owner, xs, *args):
    """``vmap(fn(owner, x, *args))`` over ``xs``, compiled. The library's problems and samplers
    are frozen dataclasses, hence static arguments: compiled once per problem/sampler and
    shape, not once per evaluation (periodic evaluation calls this often); an unhashable
    user object is compiled afresh each call."""
    try:
        hash(owner)
    except TypeError:
        return jax.jit(jax.vmap(lambda x: fn(owner, x, *args)))(xs)
    return _per_point_cached(fn, owner, xs, *args)


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def _per_point_cached(fn, owner, xs, *args):
    return jax.vmap(lambda x: fn(owner, x, *args))(xs)


def _log_probs(sampler, xs):
    return _per_point(type(sampler).log_prob, sampler, xs)


def _exact_values(problem, x64, L):
    try:
        values = _per_point(type(problem).eigenfunctions, problem, x64, L)
    except NotImplementedError:
        return None
    return np.asarray(values, np.float64)
