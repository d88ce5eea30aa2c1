"""Evaluate learned eigenfunctions against a problem's exact answers.

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

import dataclasses
import functools
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax import metrics as M
from nestedlora_jax._checks import check_positive_int
from nestedlora_jax.operators import (
    ProblemOperator,
    energies_from_eigenvalues,
    valid_points,
)
from nestedlora_jax.problems import check_problem

__all__ = ["Evaluation", "METRIC_NAMES", "evaluate", "level_weights", "quadrature_grid", "network_values", "gram_statistics", "metrics_from_gram", "GramStatistics"]


# Evaluation multiplies in full float32 whatever the process default: on GPUs JAX's default
# float32 matmul rounds its operands to TF32 (10-bit mantissa, relative 2^-11), the size of the
# errors we measure. On an H200 the 36-state hydrogen runs, evaluated at that default, read
# ground-state energy errors of 1.2e-4 where the functions' subspace distance (2.7e-7) allows
# about 1e-6, the CPU's figure.
EVALUATION_MATMUL_PRECISION = "highest"


@functools.partial(jax.jit, static_argnums=(0, 2))
def _values_chunk(apply, params, operator, x):
    fn = lambda y: apply(params, y)
    with jax.default_matmul_precision(EVALUATION_MATMUL_PRECISION):
        return jax.vmap(lambda y: operator(fn, y))(x)


def network_values(apply, params, operator, xs, *, chunk: int = 512):
    """``(f, Tf)`` on ``xs`` ``(N, d)`` in chunks (bounded memory); numpy float64 ``(N, L)``.

    Every matrix product runs at full float32 precision (``"highest"``), also on GPUs, whose
    default float32 products round to TF32 (relative 2^-11): evaluation must not be less
    accurate than what it measures.

    Compiled once per ``(apply, operator)`` pair and chunk shape, so periodic evaluation
    during training does not recompile.

    The default chunk is the training batch, 512, and must stay small: on the XLA CPU
    runtime of jaxlib 0.10.2 the compiled operator of the 10-d cosine problem (21 states)
    returned wrong ``Tf`` (errors of order one) for every row at position 1560 or beyond in a
    call, deterministically, while chunks of up to 1560 rows agreed with the per-point
    operator to 1e-7 (``tests/test_evaluation.py`` guards this).
    """
    fs, Tfs = [], []
    for start in range(0, xs.shape[0], chunk):
        f, Tf = _values_chunk(apply, params, operator, jnp.asarray(xs[start : start + chunk]))
        fs.append(np.asarray(f, np.float64))
        Tfs.append(np.asarray(Tf, np.float64))
    return np.concatenate(fs), np.concatenate(Tfs)


def quadrature_grid(problem, L: int, num: int = 200, *, sampler=None) -> tuple[np.ndarray, np.ndarray]:
    """A quadrature grid ``(points (N, d), dx-weights (N,))`` covering the first L states:
    ``problem.quadrature_grid(L, num, sampler=sampler)``
    (:meth:`~nestedlora_jax.problems.Problem.quadrature_grid`; d <= 2).

    * boxes (``problem.box``): tensor Gauss-Legendre with ``num`` nodes per axis;
    * hydrogen (2-D): polar grid, Gauss-Legendre in ``r`` on ``[0, R]`` (``R`` the radius
      outside which every state has less than 1e-10 of its norm,
      :meth:`~nestedlora_jax.problems.Hydrogen.evaluation_radius`) and ``num`` equispaced angles
      (exact for the trigonometric angular parts);
    * otherwise (``d <= 2``): tensor Gauss-Legendre on ``[-R, R]^d`` with ``R`` from the
      problem's ``evaluation_radius(L)`` if it gives one, else from the length scale of
      ``sampler`` (default: the problem's default sampler;
      :func:`~nestedlora_jax.samplers.length_scale`).

    A problem of your own changes its grid by overriding ``quadrature_grid`` or
    ``evaluation_radius``.
    """
    check_problem(problem, "quadrature_grid")
    return problem.quadrature_grid(L, num, sampler=sampler)


def _check_importance_weighting(operator: ProblemOperator, importance_weighted) -> bool:
    """The operator's importance weighting; a contradicting explicit value is an error."""
    chosen = bool(operator.importance_weighted)
    if importance_weighted is not None and bool(importance_weighted) != chosen:
        raise ValueError(
            f"importance_weighted={importance_weighted!r} contradicts the operator, which was "
            f"built with importance_weighted={chosen} (problem_operator(..., "
            f"importance_weighted={chosen})): the network trained with it represents "
            f"{'psi / sqrt(p)' if chosen else 'psi'}, so it must be evaluated the same way. "
            "Leave importance_weighted out (it is read from the operator), or build the "
            "operator with the other choice."
        )
    return chosen


# The metrics, by kind: per state (L,), aggregates (floats), per block.
_PER_STATE = ("exact", "rayleigh", "norm", "rel_error", "rel_error_norm", "residual",
              "angle_distance", "ritz", "ritz_rel_error")
_AGGREGATES = ("mean_rel_error", "mean_rel_error_norm", "max_rel_error", "angle_distance_mean",
               "subspace_distance_mean", "subspace_distance_total", "ritz_subspace_distance_mean",
               "orthogonality_fro", "orthogonality_max")
_PER_BLOCK = ("subspace_distance_blocks", "ritz_subspace_distance_blocks")
METRIC_NAMES = _PER_STATE + _AGGREGATES + _PER_BLOCK


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What :func:`evaluate` returns: every metric of the protocol, by name.

    Energies are in the problem's units. Per state ``(L,)``: ``exact``, ``rayleigh`` (energy by
    Rayleigh quotient), ``norm`` (energy by ``||f||^2``), ``rel_error`` (of ``rayleigh``),
    ``rel_error_norm``, ``residual`` (``||H psi - E psi|| / ||psi||``), ``angle_distance``,
    ``ritz`` (Rayleigh-Ritz energies of the span) and ``ritz_rel_error``. Aggregates:
    ``mean_rel_error``, ``mean_rel_error_norm``, ``max_rel_error``, ``angle_distance_mean``,
    ``subspace_distance_mean``, ``subspace_distance_total``, ``ritz_subspace_distance_mean``,
    ``orthogonality_fro``, ``orthogonality_max``. Per degenerate block:
    ``subspace_distance_blocks``, ``ritz_subspace_distance_blocks``. A metric that needs what
    the problem does not provide (a spectrum, eigenfunctions) is ``None``.

    ``standard_errors`` maps each metric's name to its jackknife standard error (Monte Carlo
    evaluation; empty on a quadrature grid); :meth:`se` reads one. ``blocks`` are the
    degenerate blocks ``[start, stop)``, ``num_points`` the points used, ``num_invalid_points``
    those left out (non-finite or absurd values), ``method`` ``"quadrature grid"`` or
    ``"Monte Carlo"``. :meth:`to_dict` is the flat JSON form (``<name>_se`` beside each name).
    """

    rayleigh: np.ndarray
    norm: np.ndarray
    residual: np.ndarray
    ritz: np.ndarray
    orthogonality_fro: float
    orthogonality_max: float
    blocks: list
    num_points: int
    num_invalid_points: int
    method: str
    exact: np.ndarray | None = None
    rel_error: np.ndarray | None = None
    rel_error_norm: np.ndarray | None = None
    mean_rel_error: float | None = None
    mean_rel_error_norm: float | None = None
    max_rel_error: float | None = None
    ritz_rel_error: np.ndarray | None = None
    angle_distance: np.ndarray | None = None
    angle_distance_mean: float | None = None
    subspace_distance_blocks: np.ndarray | None = None
    subspace_distance_mean: float | None = None
    subspace_distance_total: float | None = None
    ritz_subspace_distance_blocks: np.ndarray | None = None
    ritz_subspace_distance_mean: float | None = None
    standard_errors: dict = dataclasses.field(default_factory=dict)

    def se(self, name: str):
        """The standard error of metric ``name`` (Monte Carlo evaluations only)."""
        if name not in METRIC_NAMES:
            raise KeyError(f"{name!r} is not a metric; metrics: {METRIC_NAMES}.")
        if name not in self.standard_errors:
            why = ("a quadrature grid has none" if self.method == "quadrature grid"
                   else "the metric was not computed")
            raise KeyError(f"no standard error for {name!r}: {why}.")
        return self.standard_errors[name]

    def available(self) -> list[str]:
        """The names of the metrics that were computed (not ``None``)."""
        return [k for k in METRIC_NAMES if getattr(self, k) is not None]

    def to_dict(self) -> dict:
        """Flat JSON-able form: every computed metric, ``<name>_se`` beside it, and ``blocks``,
        ``num_points``, ``num_invalid_points``, ``evaluation`` (the method)."""
        out = {}
        for k in self.available():
            out[k] = _plain(getattr(self, k))
            if k in self.standard_errors:
                out[f"{k}_se"] = _plain(self.standard_errors[k])
        out.update(blocks=[list(b) for b in self.blocks], num_points=self.num_points,
                   num_invalid_points=self.num_invalid_points, evaluation=self.method)
        return out

    def table(self, title: str | None = None) -> str:
        """The per-state table and the aggregates (:func:`~nestedlora_jax.metrics.summary_table`)."""
        keys = ("exact", "rayleigh", "norm", "rel_error", "residual", "angle_distance",
                "mean_rel_error", "max_rel_error", "subspace_distance_mean",
                "subspace_distance_total", "angle_distance_mean", "orthogonality_fro",
                "orthogonality_max")
        view = {}
        for k in keys:
            if getattr(self, k) is not None:
                view[k] = getattr(self, k)
                if k in ("rel_error", "mean_rel_error", "subspace_distance_mean") and k in self.standard_errors:
                    view[f"{k}_se"] = self.standard_errors[k]
        return M.summary_table(view, title=title)


def _plain(value):
    value = np.asarray(value)
    return float(value) if value.ndim == 0 else value


def evaluate(
    apply: Callable,
    params: Any,
    problem,
    operator: ProblemOperator,
    *,
    points: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    num_samples: int = 2**18,
    key: jax.Array | None = None,
    importance_weighted: bool | None = None,
    readout: Callable[[np.ndarray], np.ndarray] | None = None,
    chunk: int = 512,
    groups: int = 32,
) -> Evaluation:
    """All metrics of the evaluation protocol for the learned functions ``apply(params, .)``,
    with standard errors on Monte Carlo samples.

    Every metric is a function of inner products only, so the points enter through the Gram
    matrix ``S = sum_n w_n z_n z_n^T`` of ``z = [f, Tf, psi]`` (``(3L,)`` per point: learned
    functions, the operator applied to them, exact eigenfunctions, all in one ``L2``
    representation). ``S`` is accumulated chunk by chunk (memory ``O(chunk * L + L^2)``, any
    number of points, any dimension) and the metrics are computed from it (see
    :func:`metrics_from_gram`).

    On Monte Carlo samples the points are split into ``groups`` consecutive groups with their
    own ``S_g``; the delete-one-group jackknife ``se^2 = (G-1)/G sum_g (theta_(g) - theta_(.))^2``
    gives a standard error for every reported quantity (``<key>_se``), including nonlinear
    ones (relative errors, subspace distances, Ritz values). Energies are ratio estimates on
    the same samples, ``<f, Tf> / <f, f>``: the numerator's and denominator's noise cancel, so
    at an exact eigenfunction (``Tf = t f`` pointwise) the estimate has zero variance and the
    standard error is proportional to the error being measured.

    Args:
      apply, params: the network (one point -> ``(L,)``).
      problem: a problem; with ``energies`` (and ``degenerate_blocks``) errors against them
        are reported, with ``eigenfunctions`` distances too. Without a known spectrum the
        result has energies, residuals, orthogonality and Ritz values only.
      operator: the :class:`~nestedlora_jax.operators.ProblemOperator` used in training
        (its operator, sampler and scaling).
      points, weights: a quadrature grid with ``dx`` weights (see :func:`quadrature_grid`);
        no standard errors (the grid is deterministic). ``points`` without ``weights`` are
        taken as samples from ``operator.sampler``; no ``points`` means ``num_samples`` fresh
        samples from it, drawn chunk by chunk from ``key`` (never all in memory at once).
      importance_weighted: whether the network represents ``psi / sqrt(p)`` (training used
        the sampler's ``log_prob``). Read from ``operator.importance_weighted`` (the choice
        made in :func:`~nestedlora_jax.operators.problem_operator`); ``None``, the default,
        takes it from there, and an explicit value that contradicts it is refused.
      readout: maps raw outputs ``(n, M)`` to eigenfunction estimates ``(n, L)``, ``L <= M``
        (a baseline's ``objective.readout`` with its state bound, and / or the first ``L``
        of ``M`` functions trained with guard functions; applied chunk by chunk, so it must
        act on each point alone); identity by default.
      chunk: points per compiled network call.
      groups: jackknife groups for the standard errors (Monte Carlo only; >= 2).

    Returns:
      An :class:`Evaluation`: every metric by name (``result.mean_rel_error``), their
      standard errors on Monte Carlo samples (``result.se("mean_rel_error")``), the blocks and
      point counts; ``result.table()`` prints it, ``result.to_dict()`` is its JSON form.

    Raises:
      ValueError: ``problem`` not a :class:`~nestedlora_jax.problems.Problem`;
        ``importance_weighted`` contradicting ``operator.importance_weighted``; a grid with a
        weight count different from its point count; fewer Monte
        Carlo samples than ``max(256, 3 L groups)``: each group's Gram matrix ``(3L, 3L)``
        needs at least ``3L`` points for the jackknife to mean anything.
    """
    check_problem(problem, "evaluate")
    importance_weighted = _check_importance_weighting(operator, importance_weighted)
    on_grid = _check_grid(points, weights)
    if not on_grid and (isinstance(groups, bool) or not isinstance(groups, (int, np.integer))
                        or groups < 2):
        raise ValueError(f"groups (jackknife groups) must be an int >= 2; got {groups!r}.")
    L = int(np.shape(jax.eval_shape(lambda x: apply(params, x),
                                    jax.ShapeDtypeStruct((problem.dim,), jnp.float32)))[0])
    if readout is not None:
        # The readout may report fewer functions than the network has (guard functions).
        L = int(np.shape(readout(np.zeros((1, L), np.float32)))[-1])
    n_points = len(points) if points is not None else int(num_samples)
    minimum = min_monte_carlo_samples(L, groups)
    if not on_grid and n_points < minimum:
        raise ValueError(
            f"{n_points} Monte Carlo samples are too few to evaluate {L} functions with "
            f"standard errors: use at least {minimum} (num_samples=..., or more points)."
        )
    exact = problem.known_energies(L)
    # Without a known spectrum there are no levels to group: every state is its own block (and
    # no metric that needs the exact answer is reported).
    blocks = (tuple((i, i + 1) for i in range(L)) if exact is None
              else tuple(map(tuple, problem.degenerate_blocks(L))))
    stats = gram_statistics(
        apply, params, problem, operator, points=points, weights=weights,
        num_samples=num_samples, key=key, importance_weighted=importance_weighted,
        readout=readout, chunk=chunk, groups=1 if on_grid else groups,
    )
    total = stats.sums.sum(axis=0) / (1.0 if on_grid else stats.counts.sum())
    out = metrics_from_gram(total, L, operator, exact, blocks, stats.has_psi)
    standard_errors = {}
    if not on_grid:
        loo = (stats.sums.sum(axis=0)[None] - stats.sums) / (
            stats.counts.sum() - stats.counts)[:, None, None]
        # A Python loop over the groups, not a vmap: XLA's CPU runtime has been seen to wedge
        # (all threads asleep, never returning) on the vmapped float64 eigh/SVD graph; the
        # loop costs G small dispatches of one compiled program.
        replicas = [metrics_from_gram(S, L, operator, exact, blocks, stats.has_psi) for S in loo]
        g = len(replicas)
        for k in list(out):
            r = np.stack([np.asarray(rep[k]) for rep in replicas])
            se = np.sqrt((g - 1) / g * np.sum((r - r.mean(axis=0)) ** 2, axis=0))
            standard_errors[k] = float(se) if np.ndim(se) == 0 else se
    if not importance_weighted and not on_grid:
        # L2(p) representation: the norms are not L2(dx) norms, so they carry no eigenvalue.
        for k in ("norm", "rel_error_norm", "mean_rel_error_norm"):
            if k in out:
                out[k] = np.full(L, np.nan) if np.ndim(out[k]) else float("nan")
                standard_errors.pop(k)
    return Evaluation(
        **{k: _plain(v) for k, v in out.items()},
        blocks=[list(b) for b in blocks],
        num_points=int(stats.counts.sum()) if not on_grid else int(len(points)),
        num_invalid_points=stats.invalid,
        method="quadrature grid" if on_grid else "Monte Carlo",
        standard_errors=standard_errors,
    )


def level_weights(apply, params, problem, operator: ProblemOperator, num_states: int, *,
                  points: np.ndarray | None = None, weights: np.ndarray | None = None,
                  num_samples: int = 2**18, key: jax.Array | None = None,
                  readout: Callable[[np.ndarray], np.ndarray] | None = None,
                  chunk: int = 512) -> np.ndarray:
    """Where each learned function's norm lies among the exact levels: ``(L, B + 1)``.

    ``W[i, b] = sum_{j in level b} <psi_j, f_i>^2 / <f_i, f_i>`` for the ``B`` degenerate
    levels of the ``num_states`` lowest exact states (``problem.degenerate_blocks(num_states)``),
    and ``W[i, B] = 1 - sum_b W[i, b]``, the fraction outside them; each row sums to 1.

    With ``num_states`` beyond the ``L`` learned functions this tells apart the two ways an
    outer state goes wrong: a function mixed with the levels just above the window (it
    converges at a rate set by the gap to them) and a state of the window no function holds.
    The errors left on 36-state hydrogen are the first kind (README).

    Points, weights, ``num_samples``, ``key``, ``readout`` and ``chunk`` as in :func:`evaluate`
    (a quadrature grid, or Monte Carlo samples from ``operator.sampler``).

    Raises:
      ValueError: ``num_states`` not an int >= 1; a problem without exact eigenfunctions for
        ``num_states`` states; weights without points, or not one per point; a network not importance-weighted evaluated on samples (its
        functions cannot be compared with ``psi`` there).
    """
    check_problem(problem, "level_weights")
    num_states = check_positive_int("level_weights: num_states", num_states)
    if not problem.has_eigenfunctions(num_states):
        raise ValueError(
            f"level_weights: {type(problem).__name__} has no exact eigenfunctions for "
            f"{num_states} states; use fewer (num_states=...)."
        )
    on_grid = _check_grid(points, weights)
    stats = gram_statistics(apply, params, problem, operator, points=points, weights=weights,
                            num_samples=num_samples, key=key, readout=readout, chunk=chunk,
                            num_exact=num_states)
    if not stats.has_psi:
        raise ValueError(
            "level_weights: on samples the functions of a network trained without importance "
            "weighting cannot be compared with the exact ones; pass a quadrature grid "
            "(points and weights, see quadrature_grid)."
        )
    # Sums over samples are means once divided by the count (the grid's weights are dx).
    S = stats.sums.sum(axis=0) / (1.0 if on_grid else stats.counts.sum())
    L = (S.shape[0] - num_states) // 2
    norms = np.diag(S)[:L]
    overlaps = S[2 * L :, :L] ** 2 / norms  # (num_states, L)
    blocks = problem.degenerate_blocks(num_states)
    W = np.stack([overlaps[a:b].sum(axis=0) for a, b in blocks], axis=1)
    return np.concatenate([W, 1.0 - W.sum(axis=1, keepdims=True)], axis=1)


def _check_grid(points, weights) -> bool:
    """Whether ``points`` and ``weights`` are a quadrature grid (weights given): then one
    dx-weight per point, and points with them."""
    if weights is None:
        return False
    if points is None:
        raise ValueError("weights were given without points: pass the grid's points too.")
    if len(weights) != len(points):
        raise ValueError(
            f"a grid needs one dx-weight per point: got {len(points)} points and "
            f"{len(weights)} weights."
        )
    return True


def min_monte_carlo_samples(L: int, groups: int = 32) -> int:
    """The fewest Monte Carlo samples :func:`evaluate` takes for ``L`` functions: each of the
    ``groups`` jackknife groups needs its ``(3L, 3L)`` Gram matrix estimated from ``3L`` points
    or more, and never fewer than 256 points in all."""
    return max(256, 3 * L * groups)


class GramStatistics(NamedTuple):
    """Accumulated second moments of ``z = [f, Tf(, psi)]`` (all in one L2 representation).

    ``sums[g] = sum_{n in group g} w_n z_n z_n^T`` ``(G, K, K)`` float64 (``K = 2L``, or
    ``3L`` with exact eigenfunctions); ``counts[g]`` the number of points in group g;
    ``has_psi`` whether the exact eigenfunctions are included; ``invalid`` how many points
    were left out for non-finite or absurdly large values (``operators.valid_points``).
    """

    sums: np.ndarray
    counts: np.ndarray
    has_psi: bool
    invalid: int = 0


def gram_statistics(apply, params, problem, operator, *, points=None, weights=None,
                    num_samples=2**18, key=None, importance_weighted=None, readout=None,
                    chunk=512, groups=1, num_exact=None) -> GramStatistics:
    """``S_g = sum_n w_n z_n z_n^T`` over ``groups`` consecutive groups of points, chunk by chunk.

    On a grid (``weights`` given) ``w`` are the ``dx`` weights and the values are mapped to the
    ``psi`` representation (``sqrt(p) f`` when importance-weighted); on samples ``w = 1`` and
    everything is in the ``f = psi / sqrt(p)`` representation, whose plain means estimate
    ``L2(dx)`` inner products (with ``importance_weighted=False`` the exact ``psi`` cannot be
    compared and is left out). Samples are drawn chunk by chunk, chunk ``c`` from
    ``fold_in(key, c)``, so any ``num_samples`` fits in memory. ``importance_weighted`` is
    ``operator.importance_weighted`` (``None``, the default; a contradicting value raises, as in
    :func:`evaluate`). ``num_exact``: how many exact eigenfunctions ``psi`` to include (default:
    as many as there are learned functions).
    """
    check_problem(problem, "gram_statistics")
    importance_weighted = _check_importance_weighting(operator, importance_weighted)
    on_grid = weights is not None
    sampler = operator.sampler
    key = jax.random.PRNGKey(12345) if key is None else key
    n_total = len(points) if points is not None else int(num_samples)
    bounds = np.linspace(0, n_total, groups + 1).round().astype(int)
    sums, counts, has_psi, invalid = None, np.zeros(groups), None, 0
    exact_known = None  # problem.has_eigenfunctions(L), asked once L is known
    for c, start in enumerate(range(0, n_total, chunk)):
        stop = min(start + chunk, n_total)
        if points is not None:
            x = np.asarray(points[start:stop], np.float64)
        else:
            x = np.asarray(sampler.sample(jax.random.fold_in(key, c), stop - start), np.float64)
        f, Tf = network_values(apply, params, operator.op, x.astype(np.float32), chunk=chunk)
        # The training rule: a point with a non-finite or absurd raw value (a singularity met
        # numerically, e.g. a grid node on the nucleus) is not evaluated.
        valid = np.asarray(valid_points(f, Tf))
        if readout is not None:
            f, Tf = np.asarray(readout(f), np.float64), np.asarray(readout(Tf), np.float64)
        with jax.enable_x64(True):
            x64 = jnp.asarray(x, jnp.float64)
            n_exact = f.shape[1] if num_exact is None else int(num_exact)
            if exact_known is None:
                exact_known = problem.has_eigenfunctions(n_exact)
            psi = _exact_values(problem, x64, n_exact) if exact_known else None
            half_log_p = (0.5 * np.asarray(_log_probs(sampler, x64), np.float64)
                          if importance_weighted else None)
        if on_grid:
            w = np.asarray(weights[start:stop], np.float64)
            if half_log_p is not None:  # values of psi = sqrt(p) f
                f, Tf = f * np.exp(half_log_p)[:, None], Tf * np.exp(half_log_p)[:, None]
        else:
            w = np.ones(stop - start)
            if psi is not None:
                # The exact psi in the f representation; without the density no comparison.
                psi = psi * np.exp(-half_log_p)[:, None] if half_log_p is not None else None
        if has_psi is None:
            has_psi = psi is not None
        z = np.concatenate([f, Tf] + ([psi] if has_psi else []), axis=1)
        # A non-finite value would turn every metric into NaN (or worse, send LAPACK into a
        # non-terminating iteration): such points are left out and counted.
        finite = valid & np.all(np.isfinite(z), axis=1)
        if not finite.all():
            invalid += int(np.sum(~finite))
            z, w = np.where(finite[:, None], z, 0.0), np.where(finite, w, 0.0)
        if sums is None:
            sums = np.zeros((groups, z.shape[1], z.shape[1]))
        # A chunk may straddle group boundaries.
        for g in range(groups):
            lo, hi = max(bounds[g], start), min(bounds[g + 1], stop)
            if lo < hi:
                zg, wg = z[lo - start : hi - start], w[lo - start : hi - start]
                sums[g] += (zg * wg[:, None]).T @ zg
                counts[g] += np.count_nonzero(finite[lo - start : hi - start])
    if invalid == n_total:
        raise ValueError(
            f"evaluation: every one of the {n_total} points gave a non-finite or absurd network "
            "or operator value (beyond operators.MAX_ABS_OPERATOR_VALUE): nothing to evaluate. "
            "Check the points (inside the domain, not on a singularity) and the parameters."
        )
    if invalid:
        warnings.warn(
            f"evaluation: {invalid} of {n_total} points gave non-finite or absurd network or "
            "operator values (e.g. a point on a singularity of the potential) and were left "
            "out of every metric (num_invalid_points in the result).",
            RuntimeWarning, stacklevel=2)
    return GramStatistics(sums, counts, bool(has_psi), invalid)


def metrics_from_gram(S, L: int, operator: ProblemOperator, exact, blocks, has_psi: bool) -> dict:
    """Every metric from the Gram matrix ``S`` ``(K, K)`` of ``z = [f, Tf(, psi)]``.

    Metrics depend on the points only through inner products, so they are evaluated on
    pseudo-points: the rows of ``R = diag(sqrt(lambda)) V^T`` (``S = V diag(lambda) V^T``)
    satisfy ``R^T R = S``, and :mod:`nestedlora_jax.metrics`' functions applied to ``K`` such
    rows with unit weights give exactly what they give on the real points. Energies are
    mapped with the operator's ``scale`` / ``shift``; relative errors use ``exact`` (``None``:
    an unknown spectrum, no errors reported).
    Returns numpy values (floats for aggregates).
    """
    with jax.enable_x64(True):
        out = _metrics_from_gram_jit(jnp.asarray(S, jnp.float64), L, operator.scale,
                                     operator.shift,
                                     None if exact is None else np.asarray(exact, np.float64),
                                     tuple(map(tuple, blocks)), has_psi)
    return {k: (float(v) if np.ndim(v) == 0 else np.asarray(v)) for k, v in out.items()}


@functools.partial(jax.jit, static_argnums=(1, 5, 6))
def _metrics_from_gram_jit(S, L, scale, shift, exact, blocks, has_psi):
    lam, V = jnp.linalg.eigh((S + S.T) / 2)
    R = jnp.sqrt(jnp.maximum(lam, 0))[:, None] * V.T  # (K, K) pseudo-points
    f, Tf = R[:, :L], R[:, L : 2 * L]
    psi = R[:, 2 * L :] if has_psi else None
    m = _metric_block(f, Tf, jnp.ones(R.shape[0], R.dtype), psi, blocks)
    energy = lambda t: energies_from_eigenvalues(t, scale, shift)
    rayleigh, norm, ritz = energy(m["t_rayleigh"]), energy(m["t_norm"]), energy(m["ritz"])
    out = {
        "rayleigh": rayleigh,
        "norm": norm,
        "residual": m["residual"] / scale,
        "orthogonality_fro": m["orthogonality_fro"],
        "orthogonality_max": m["orthogonality_max"],
        "ritz": ritz,
    }
    if exact is not None:  # errors against a known spectrum
        rel = lambda e: M.relative_errors(e, exact).per_state
        out.update(
            exact=exact,
            rel_error=rel(rayleigh),
            rel_error_norm=rel(norm),
            mean_rel_error=jnp.mean(rel(rayleigh)),
            max_rel_error=jnp.max(rel(rayleigh)),
            mean_rel_error_norm=jnp.mean(rel(norm)),
            ritz_rel_error=rel(ritz),
        )
    for k in ("angle_distance", "angle_distance_mean", "subspace_distance_blocks",
              "subspace_distance_mean", "subspace_distance_total",
              "ritz_subspace_distance_blocks", "ritz_subspace_distance_mean"):
        if k in m:
            out[k] = m[k]
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
    """The exact eigenfunctions at ``x64``, float64 ``(N, L)``; call only where
    ``problem.has_eigenfunctions(L)``."""
    return np.asarray(_per_point(type(problem).eigenfunctions, problem, x64, L), np.float64)
