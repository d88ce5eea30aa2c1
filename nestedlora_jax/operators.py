"""Operators applied to a per-point network: the (importance-weighted) negative Hamiltonian.

The solver decomposes ``T = scale * (-H) + shift`` with ``H = -kinetic * Lap + V``, i.e. ``T f = scale * (kinetic * Lap f - V f) + shift * f``; its top eigenvalues
``t_i = shift - scale * E_i`` belong to the lowest energies ``E_i``.

An operator here is a function ``op(fn, x, key=None) -> (f, Tf)``: ``fn`` maps one point ``x``
``(d,)`` to the ``L`` network outputs ``(L,)`` (or a scalar), and ``op`` returns ``f = fn(x)`` and
``(T f)(x)``, both ``(L,)``. ``key`` is needed only by the stochastic (Hutchinson) Laplacians.
``apply_operator`` vmaps it over a batch.

**Importance weighting.** With samples ``x ~ p`` and ``log_prob = log p`` given, the network
represents ``f = psi / sqrt(p)`` and ``op`` applies ``T_p f = T(sqrt(p) f) / sqrt(p)``. Writing
``sqrt(p) = e^u``, ``u = log_prob / 2``,

    Lap(e^u f) / e^u = Lap f + 2 grad u . grad f + (Lap u + |grad u|^2) f,

evaluated from ``u`` and its derivatives only (no ``exp`` of a log-density, so nothing underflows
in the tails). Then plain batch means estimate ``L2(dx)`` inner products of ``psi = sqrt(p) f``:
``E_p[f_i f_j] = <psi_i, psi_j>`` and ``E_p[f_i T_p f_j] = <psi_i, T psi_j>``. ``T_p`` is
self-adjoint in ``L2(p)``, so the objective may treat ``T f`` as a constant in the backward pass
(``d<f, T f> = 2 <df, T f>``): ``op`` does not stop gradients itself; the objective decides.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nestedlora_jax._checks import check_num_states, check_positive_float
from nestedlora_jax.laplacians import LAPLACIAN_METHODS, STOCHASTIC_LAPLACIAN_METHODS, laplacian
from nestedlora_jax.objectives import OperatorOutput
from nestedlora_jax.problems import check_problem
from nestedlora_jax.samplers import check_sampler_dim

Array = jax.Array
Operator = Callable[..., tuple[Array, Array]]

__all__ = [
    "MAX_ABS_OPERATOR_VALUE",
    "valid_points",
    "negative_hamiltonian",
    "apply_operator",
    "energies_from_eigenvalues",
    "eigenvalues_from_energies",
    "problem_operator",
    "ProblemOperator",
    "BatchOperator",
    "pointwise_operator",
    "kernel_integral_operator",
    "matrix_operator",
    "known_energies",
    "ritz_energies",
    "scaling_from_energies",
]


# Values of f or T f beyond this are not a function's values but a singularity met numerically
# (e.g. -1/r at a point rounded onto the nucleus: -9e18 in float32). The operators are scaled so
# the wanted eigenvalues are O(1); a legitimate sample would need r ~ 1e-10 for 2-D hydrogen,
# probability ~1e-20 per point under the default sampler.
MAX_ABS_OPERATOR_VALUE = 1e10


def valid_points(f, Tf, max_abs_value: float = MAX_ABS_OPERATOR_VALUE):
    """``(B,)`` bool: the points whose ``f`` and ``Tf`` ``(B, L)`` are finite and no larger than
    ``max_abs_value`` in magnitude. Training skips a batch with an invalid point, evaluation
    leaves such points out (and counts them): the one rule for both."""
    f, Tf = jnp.asarray(f), jnp.asarray(Tf)
    ok = lambda v: jnp.all(jnp.isfinite(v) & (jnp.abs(v) <= max_abs_value), axis=-1)
    return ok(f.reshape(f.shape[0], -1)) & ok(Tf.reshape(Tf.shape[0], -1))


def _check_scalar_fn(fn: Callable, x: Array, name: str) -> None:
    # Trace-time check on shapes only: nothing is computed.
    out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape, x.dtype))
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        shape = getattr(out, "shape", type(out).__name__)
        raise ValueError(
            f"{name} must return a scalar for one point of shape {x.shape}; got {shape}. "
            f"It is a per-point function: vmap over batches outside it."
        )


def negative_hamiltonian(
    potential: Callable[[Array], Array],
    *,
    kinetic: float = 1.0,
    scale: float = 1.0,
    shift: float = 0.0,
    laplacian_method: str = "default",
    num_probes: int | None = None,
    log_prob: Callable[[Array], Array] | None = None,
) -> Operator:
    """The operator ``T = scale * (kinetic * Lap - V) + shift``, optionally importance-weighted.

    Args:
      potential: ``V``, one point ``(d,)`` -> scalar.
      kinetic: coefficient of the Laplacian in ``H = -kinetic * Lap + V``.
      scale, shift: ``T = scale * (-H) + shift``; eigenvalues map back by
        ``energies_from_eigenvalues``.
      laplacian_method: any of ``laplacians.LAPLACIAN_METHODS`` for the network's Laplacian. The
        Laplacian of ``u = log_prob / 2`` always uses the exact default method (it is cheap, and
        noise there would only add variance).
      num_probes: probes per point for the Hutchinson methods.
      log_prob: per-point log-density of the sampler; if given, ``op`` applies the
        importance-weighted ``T_p f = T(sqrt(p) f) / sqrt(p)`` (module docstring).

    Returns:
      ``op(fn, x, key=None) -> (f, Tf)``: ``fn`` one point ``(d,)`` -> ``(L,)`` or ``()``; ``x``
      ``(d,)``; ``key`` a PRNG key, required by the stochastic Laplacian methods (ignored
      otherwise). ``f = fn(x)`` and ``Tf`` have ``fn``'s output shape.

    Raises:
      ValueError: unknown ``laplacian_method``; when called: ``potential`` or ``log_prob`` not
        scalar-valued, ``x`` not one point, a stochastic method without ``key`` (the message says
        what to pass).
    """
    if laplacian_method not in LAPLACIAN_METHODS:
        raise ValueError(
            f"Unknown Laplacian method {laplacian_method!r}; "
            f"expected one of {', '.join(LAPLACIAN_METHODS)}."
        )
    stochastic = laplacian_method in STOCHASTIC_LAPLACIAN_METHODS
    scale, shift, kinetic = float(scale), float(shift), float(kinetic)

    def op(fn: Callable[[Array], Array], x: Array, key: Array | None = None):
        x = jnp.asarray(x)
        if x.ndim != 1:
            raise ValueError(
                f"op takes ONE point of shape (d,); got shape {x.shape}. "
                "Use apply_operator for a batch."
            )
        if stochastic and key is None:
            raise ValueError(
                f"laplacian_method={laplacian_method!r} is stochastic: call op(fn, x, key=...) "
                "(apply_operator(op, fn, xs, key=...) splits one key per point)."
            )
        _check_scalar_fn(potential, x, "potential")
        kw = dict(method=laplacian_method, key=key if stochastic else None, num_probes=num_probes)
        if log_prob is None and stochastic:
            # The Hutchinson methods would add an exact reverse pass per output for a gradient
            # that is not needed here.
            f, lap = fn(x), laplacian(fn, x, **kw)
        elif log_prob is None:
            f, _, lap = laplacian(fn, x, return_grad=True, **kw)  # value and grad come for free
        else:
            _check_scalar_fn(log_prob, x, "log_prob")
            f, grad_f, lap_f = laplacian(fn, x, return_grad=True, **kw)
            _, grad_u, lap_u = laplacian(lambda y: 0.5 * log_prob(y), x, return_grad=True)
            # Lap(e^u f) / e^u, expanded so that only u (never e^u) is evaluated.
            lap = lap_f + 2.0 * (grad_f @ grad_u) + (lap_u + grad_u @ grad_u) * f
        v = potential(x)
        return f, scale * (kinetic * lap - v * f) + shift * f

    return op


def apply_operator(op: Operator, fn: Callable[[Array], Array], xs: Array, key: Array | None = None):
    """``op`` vmapped over a batch ``xs`` ``(B, d)``: ``(f, Tf)``, each ``(B, L)`` (or ``(B,)``).

    ``key`` (for stochastic Laplacians) is split into one key per point, so the estimator's
    errors are independent across the batch.
    """
    xs = jnp.asarray(xs)
    if xs.ndim != 2:
        raise ValueError(f"xs must be a batch of points of shape (B, d); got shape {xs.shape}.")
    if key is None:
        return jax.vmap(lambda x: op(fn, x))(xs)
    keys = jax.random.split(key, xs.shape[0])
    return jax.vmap(lambda x, k: op(fn, x, key=k))(xs, keys)


def energies_from_eigenvalues(t: Any, scale: float, shift: float):
    """Energies ``E = -(t - shift) / scale`` from eigenvalues ``t`` of ``T = scale (-H) + shift``.
    """
    return -(t - shift) / scale


def eigenvalues_from_energies(energies: Any, scale: float, shift: float):
    """Eigenvalues ``t = shift - scale * E`` of ``T = scale * (-H) + shift``; inverse of
    ``energies_from_eigenvalues``."""
    return shift - scale * energies


def scaling_from_energies(energies) -> tuple[float, float]:
    """``(scale, shift)`` of ``T = scale * (-H) + shift`` for learning the states of ``energies``
    (ascending): their eigenvalues ``t_i = scale * (c - E_i)`` lie in ``[1/2, 1]``.

    ``c = E_L + D`` with ``D = E_L - E_1`` (the spread of the wanted energies; the ground-state
    scale ``|E_1|``, or 1, when they are all equal) puts ``t_L`` a spread below ``t_1``: the
    ratio ``t_1 / t_L = 2`` keeps later functions from collapsing (a small ``t_L / t_1`` is the
    main failure mode) while every wanted ``t_i`` stays positive and above the unwanted ones.
    ``scale = 1 / (c - E_1)`` normalises ``t_1 = 1``.

    ``D`` is the spread and not ``max(spread, |E_1|)``: a large zero-point energy (an oscillator
    in d = 10 has ``E_1 ~ 15`` under a spread of ~5) would otherwise squeeze the wanted ``t_i``
    into ``[0.75, 1]``, shrinking every relative eigengap the optimiser sees.
    """
    energies = np.asarray(energies, np.float64)
    if energies.ndim != 1 or energies.size == 0 or not np.all(np.isfinite(energies)):
        raise ValueError(f"energies must be a non-empty 1-D array of finite values; got {energies!r}.")
    spread = float(energies[-1] - energies[0])
    if spread == 0.0:
        spread = abs(float(energies[0])) or 1.0
    c = float(energies[-1]) + spread
    scale = 1.0 / (c - float(energies[0]))
    return float(scale), float(scale * c)


def ritz_energies(apply, params, potential, sampler, *, kinetic: float = 1.0,
                  num_samples: int = 8192, key: Array | None = None) -> np.ndarray:
    """Rayleigh-Ritz energies ``(L,)`` ascending of ``H = -kinetic Lap + V`` on the span of the
    functions ``psi = sqrt(p) apply(params, .)``, estimated on ``num_samples`` points from
    ``sampler`` (importance-weighted, as in training).

    By the Hylleraas-Undheim-MacDonald theorem the ``k``-th Ritz value of any ``L``-dimensional
    trial space bounds ``E_k`` from above (up to the Monte Carlo error), so even the Ritz
    values of an untrained network give a shift above the wanted energies: this is how
    :func:`~nestedlora_jax.solver.solve` scales the operator of a problem whose spectrum is
    unknown (``scaling_from_energies(ritz_energies(...))``). Rank-deficient directions
    (``metrics.rayleigh_ritz``) are dropped; missing values are filled with the largest one.
    """
    from nestedlora_jax import metrics as M

    key = jax.random.PRNGKey(0) if key is None else key
    op = negative_hamiltonian(potential, kinetic=kinetic, log_prob=sampler.log_prob)
    xs = sampler.sample(key, num_samples)
    f, Tf = jax.jit(lambda p, xs: apply_operator(op, lambda x: apply(p, x), xs))(params, xs)
    f, Tf = np.asarray(f, np.float64), np.asarray(Tf, np.float64)
    ok = np.asarray(valid_points(f, Tf))
    f, Tf = f[ok], Tf[ok]
    with jax.enable_x64(True):
        ritz = np.asarray(M.rayleigh_ritz(jnp.asarray(f), jnp.asarray(Tf),
                                          jnp.ones(len(f), jnp.float64)).eigenvalues)
    energies = -ritz[np.isfinite(ritz)]  # T = -H: descending Ritz values of -H, ascending E
    if energies.size == 0:
        raise ValueError(
            "could not estimate the spectrum: the network's functions have no usable Ritz "
            "values on the sampler's points; pass scale and shift explicitly."
        )
    energies = np.sort(energies)
    return np.concatenate([energies, np.full(f.shape[1] - energies.size, energies[-1])])


class ProblemOperator(NamedTuple):
    """What ``problem_operator`` builds: the operator, its sampler and scaling, the exact
    operator eigenvalues ``t = shift - scale * E`` of the ``L`` wanted states (``(L,)`` float64;
    ``None`` when the problem's spectrum is unknown), and whether it is importance-weighted
    (the network then represents ``psi / sqrt(p)``, ``p`` the sampler's density; otherwise
    ``psi`` itself). Evaluation reads that choice from here, so it cannot contradict the
    training's."""

    op: Operator
    sampler: Any
    scale: float
    shift: float
    eigenvalues: np.ndarray | None
    importance_weighted: bool = True


def known_energies(problem: Any, L: int) -> np.ndarray | None:
    """``problem.known_energies(L)``: the exact energies, float64, or ``None`` when the problem
    does not know its spectrum (:meth:`~nestedlora_jax.problems.Problem.known_energies`). A bad
    ``L`` still raises; a ``problem`` that is not a ``Problem`` too."""
    check_problem(problem, "known_energies")
    return problem.known_energies(L)


def problem_operator(
    problem: Any,
    L: int,
    sampler: Any = None,
    *,
    laplacian_method: str = "default",
    num_probes: int | None = None,
    importance_weighted: bool = True,
    scale: float | None = None,
    shift: float | None = None,
) -> ProblemOperator:
    """The recommended operator for learning the ``L`` lowest states of ``problem``.

    Uses ``problem.operator_scaling(L)`` (unless ``scale``/``shift`` are given) and
    ``problem.default_sampler(L)`` (unless ``sampler`` is given), and importance-weights with the
    sampler's ``log_prob`` (so batch means estimate ``L2(dx)`` inner products); with
    ``importance_weighted=False`` the network represents ``psi`` itself and batch means estimate
    ``L2(p)`` inner products. The choice is recorded in the result
    (``ProblemOperator.importance_weighted``), where :func:`~nestedlora_jax.evaluation.evaluate`
    reads it. A problem without a known spectrum needs ``scale`` and ``shift`` (``solve``
    estimates them, see :func:`ritz_energies`).

    Raises:
      ValueError: ``problem`` not a :class:`~nestedlora_jax.problems.Problem`; ``L`` not an int
        >= 1 or more states than the problem's exact list provides;
        sampler dimension different from ``problem.dim``; unknown Laplacian method; a
        non-callable potential; an unknown spectrum without ``scale`` and ``shift``; a
        non-finite or non-positive ``scale``, a non-finite ``shift``.
    """
    check_problem(problem, "problem_operator")
    energies = problem.known_energies(L)  # validates L (ValueError if too large or < 1)
    if not callable(problem.potential):
        raise ValueError(
            f"{type(problem).__name__}.potential must be a function of one point (d,) -> scalar; "
            f"got {problem.potential!r}."
        )
    if sampler is None:
        try:
            sampler = problem.default_sampler(L)
        except NotImplementedError:
            raise ValueError(
                f"{type(problem).__name__} has no default_sampler: pass sampler=... (an object "
                "with dim, sample(key, n) and log_prob(x))."
            ) from None
    check_sampler_dim(sampler, problem.dim)
    if scale is None or shift is None:
        if energies is None:
            raise ValueError(
                f"{type(problem).__name__} has no known spectrum (energies), so the operator "
                "T = scale * (-H) + shift cannot be scaled from it: pass scale and shift (with "
                "shift / scale above the highest wanted energy), or use solve(), which "
                "estimates them from Rayleigh-Ritz values of the initial network."
            )
        default_scale, default_shift = problem.operator_scaling(L)
        scale = default_scale if scale is None else scale
        shift = default_shift if shift is None else shift
    scale = check_positive_float("scale", scale)
    if isinstance(shift, bool) or not np.isfinite(shift):
        raise ValueError(f"shift must be a finite number; got {shift!r}.")
    shift = float(shift)
    op = negative_hamiltonian(
        problem.potential,
        kinetic=problem.kinetic,
        scale=scale,
        shift=shift,
        laplacian_method=laplacian_method,
        num_probes=num_probes,
        log_prob=sampler.log_prob if importance_weighted else None,
    )
    eigenvalues = None if energies is None else eigenvalues_from_energies(energies, scale, shift)
    return ProblemOperator(op, sampler, scale, shift, eigenvalues, bool(importance_weighted))


# ----------------------------------------------------------------- batch-level operators


class BatchOperator(NamedTuple):
    """An operator evaluated on a whole batch: the form every objective consumes.

    ``apply(functions, batch, key=None) -> OperatorOutput``: ``functions`` is one per-point
    function ``fn(x)`` ``(d,) -> (L,)`` for a self-adjoint operator, or a pair ``(f_fn, g_fn)``
    (left, right; their inputs may differ in dimension) when ``two_sided``; ``batch`` is what
    the sampler drew (``(B, d)``, or a pair ``(xs, ys)`` of ``(B, dx)``, ``(B', dy)``); ``key``
    a PRNG key for stochastic estimates (ignored otherwise).

    Producers: :func:`pointwise_operator` (a per-point differential operator, vmapped),
    :func:`kernel_integral_operator` (``(K f)(x) = E_y[k(x, y) f(y)]`` estimated from the batch
    itself), and :mod:`nestedlora_jax.dependence` (the canonical dependence kernel of paired
    samples). A new operator kind is one function returning a ``BatchOperator``.

    Attributes:
      apply: the batch map above.
      two_sided: ``True`` if it takes two function families (an SVD).
      name: a short description, for messages.
    """

    apply: Callable[..., Any]
    two_sided: bool = False
    name: str = "batch operator"


def pointwise_operator(op: Operator) -> BatchOperator:
    """A per-point operator ``op(fn, x, key=None) -> (f, Tf)`` (e.g.
    :func:`negative_hamiltonian`) as a :class:`BatchOperator`: vmapped over the batch ``(B, d)``,
    with one key per point when it takes a ``key`` and one is given, giving the self-adjoint
    ``OperatorOutput(f, Tf)``."""
    if isinstance(op, BatchOperator):
        return op
    if not callable(op):
        raise ValueError(
            f"operator must be a per-point op(fn, x) -> (f, Tf) or a BatchOperator, got "
            f"{type(op).__name__}."
        )
    takes_key = _accepts_key(op)

    def apply(fn, xs, key=None):
        if not callable(fn):
            raise ValueError(
                "a per-point operator acts on one function family; it was given a pair of "
                "networks (f, g): use a two-sided BatchOperator (e.g. "
                "dependence.dependence_kernel_operator()) for an SVD."
            )
        if takes_key and key is not None:
            keys = jax.random.split(key, xs.shape[0])
            f, Tf = jax.vmap(lambda x, k: op(fn, x, key=k))(xs, keys)
        else:
            f, Tf = jax.vmap(lambda x: op(fn, x))(xs)
        return OperatorOutput(f, Tf)

    return BatchOperator(apply, two_sided=False, name="pointwise")


def _accepts_key(op) -> bool:
    try:
        return "key" in inspect.signature(op).parameters
    except (TypeError, ValueError):
        return False


def kernel_integral_operator(kernel: Callable[[Array, Array], Array]) -> BatchOperator:
    """``(K f)(x) = E_{y~p}[k(x, y) f(y)]`` for a symmetric kernel ``k``, estimated on the batch.

    With a batch ``x_1..x_B ~ p``, ``(K f)(x_b) ~ (1 / (B - 1)) sum_{b' != b} k(x_b, x_b') f(x_b')``
    (the point itself left out, so the estimate is unbiased given ``x_b``, and the linear term
    ``mean_b f_b . (K f)_b`` is a U-statistic, unbiased for ``<f, K f>_p``). ``K`` is
    self-adjoint in ``L2(p)``: its eigenpairs are those of the kernel under the sampling
    density. Cost ``O(B^2)`` kernel evaluations per batch.

    Args:
      kernel: ``k(x, y)`` for two points ``(d,)`` -> scalar, symmetric.
    """
    if not callable(kernel):
        raise ValueError(f"kernel must be a function k(x, y) -> scalar, got {type(kernel).__name__}.")

    def apply(fn, xs, key=None):
        B = xs.shape[0]
        if B < 2:
            raise ValueError(f"a kernel integral needs at least 2 points per batch, got {B}.")
        f = jax.vmap(fn)(xs)
        k = jax.vmap(lambda x: jax.vmap(lambda y: kernel(x, y))(xs))(xs)  # (B, B)
        k = k * (1.0 - jnp.eye(B, dtype=k.dtype))
        return OperatorOutput(f, (k @ f) / (B - 1))

    return BatchOperator(apply, two_sided=False, name="kernel integral")


def matrix_operator(matrix) -> BatchOperator:
    """A finite matrix ``A`` ``(n, m)`` as a two-sided operator ``R^m -> R^n`` (the Euclidean
    inner products), for SVDs by free parameter tables and for tests against ``numpy.linalg.svd``.

    The two families are evaluated at the indices ``i = 0..n-1`` and ``j = 0..m-1`` (points of
    shape ``(1,)``, e.g. ``apply(table, i) = table[i[0].astype(int)]``); the batch is not used.
    Rows are weighted by ``sqrt(n)`` (``sqrt(m)``) so that batch means are the Euclidean sums, and
    the population is given twice so each batch half is all of it (exact with or without the
    objective's ``split_batch``): ``f = sqrt(n) F``, ``Tg = sqrt(n) A G``, ``g = sqrt(m) G``,
    ``T* f = sqrt(m) A^T F``.
    """
    A = np.asarray(matrix, np.float64)
    if A.ndim != 2 or A.size == 0 or not np.all(np.isfinite(A)):
        raise ValueError(f"matrix must be a finite 2-D array, got shape {A.shape}.")
    n, m = A.shape
    rows = jnp.arange(n, dtype=jnp.float32)[:, None]
    cols = jnp.arange(m, dtype=jnp.float32)[:, None]

    def apply(functions, batch=None, key=None):
        f_fn, g_fn = functions
        F, G = jax.vmap(f_fn)(rows), jax.vmap(g_fn)(cols)
        a = jnp.asarray(A, F.dtype)
        twice = lambda v: jnp.concatenate([v, v])
        return OperatorOutput(twice(np.sqrt(n) * F), twice(np.sqrt(n) * (a @ G)),
                              twice(np.sqrt(m) * G), twice(np.sqrt(m) * (a.T @ F)))

    return BatchOperator(apply, two_sided=True, name="matrix")
