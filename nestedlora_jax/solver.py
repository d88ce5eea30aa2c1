"""``solve``: a problem in, verified eigenfunctions out, in one call.

Composes the pieces with the defaults that worked on this project's problems::

    from nestedlora_jax import problems, solve
    result = solve(problems.HarmonicOscillator(dim=2), L=6, steps=5000)
    print(result.table)

Everything ``solve`` does is available piecewise (``problem_operator``,
``eigenfunction_network`` + ``to_apply``, ``fit``, ``evaluate``) for users who want to swap
one part.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from nestedlora_jax import metrics as M
from nestedlora_jax.baselines import neuralef_objective, spin_objective
from nestedlora_jax._checks import check_positive_int, is_int
from nestedlora_jax.evaluation import evaluate, min_monte_carlo_samples, quadrature_grid
from nestedlora_jax.networks import eigenfunction_network, to_apply
from nestedlora_jax.objectives import Objective, nested_lora_objective
from nestedlora_jax.operators import (
    ProblemOperator,
    energies_from_eigenvalues,
    known_energies,
    problem_operator,
    ritz_energies,
    scaling_from_energies,
)
from nestedlora_jax.problems import Hydrogen
from nestedlora_jax.training import CollapseConfig, FitResult, fit

EVALUATIONS = ("auto", "grid", "mc")

__all__ = ["METHODS", "SolveResult", "make_objective", "default_network", "restore", "solve"]

METHODS = ("neuralsvd-seq", "neuralsvd-joint", "neuralef", "spin")


def make_objective(method: str, **kwargs) -> Objective:
    """The :class:`Objective` for a method name in :data:`METHODS`."""
    if method == "neuralsvd-seq":
        return nested_lora_objective("sequential", **kwargs)
    if method == "neuralsvd-joint":
        return nested_lora_objective("joint", **kwargs)
    if method == "neuralef":
        return neuralef_objective(**kwargs)
    if method == "spin":
        return spin_objective(**kwargs)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def default_network(problem, L: int, *, kind: str = "parallel", seed: int = 0, **overrides):
    """The eigenfunction network a problem asks for: radial input for Coulomb problems,
    periodic inputs on periodic boxes, the Dirichlet mask on wells."""
    options: dict[str, Any] = {}
    if isinstance(problem, Hydrogen):
        options["radial_input"] = True
    if getattr(problem, "periodic", False):
        options["periodic"] = True
    mask = getattr(problem, "boundary_mask", None)
    if mask is not None:
        options["boundary_mask"] = mask
    options.update(overrides)
    return eigenfunction_network(problem.dim, L, kind=kind, rngs=nnx.Rngs(params=seed), **options)


@dataclasses.dataclass
class SolveResult:
    """What :func:`solve` returns: the training result, the operator it used, the pure
    network, the evaluation metrics (energies etc.) and their printable table."""

    fit: FitResult
    operator: ProblemOperator
    apply: Callable
    objective: Objective
    metrics: dict
    table: str

    @property
    def energies(self) -> np.ndarray:
        """Energies from the Rayleigh quotients of the EMA parameters' functions."""
        return self.metrics["rayleigh"]


def solve(
    problem,
    L: int,
    *,
    method: str = "neuralsvd-seq",
    steps: int = 20000,
    batch_size: int = 512,
    seed: int = 0,
    network_kind: str | None = None,
    network_options: dict | None = None,
    sampler=None,
    scale: float | None = None,
    shift: float | None = None,
    laplacian_method: str = "default",
    learning_rate: float = 3e-3,
    optimizer=None,
    ema_decay: float = 0.999,
    collapse: CollapseConfig | None = CollapseConfig(),
    evaluation: str = "auto",
    num_eval_samples: int = 2**18,
    grid_size: int = 200,
    progress: bool = True,
    log_every: int = 100,
    checkpoint_dir=None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    history_path=None,
    callback=None,
    eval_every: int | None = None,
    num_periodic_eval_samples: int = 8192,
    data_parallel: bool | int = False,
) -> SolveResult:
    """Learn the ``L`` lowest eigenstates of ``problem`` and evaluate them.

    Args:
      problem: a problem from :mod:`nestedlora_jax.problems` (or anything with the same
        interface).
      L: number of states.
      method: one of :data:`METHODS`.
      learning_rate: Adam's peak rate, cosine-decayed to 1% (3e-3: every measured problem,
        from the 2-D oscillator and hydrogen to the coupled oscillator in d = 5, trained faster
        with it than with 1e-3).
      steps, batch_size, seed, optimizer, ema_decay, log_every,
      checkpoint_dir, checkpoint_every, resume, history_path, callback, progress: passed to
        :func:`~nestedlora_jax.training.fit`.
      collapse: collapse detection / re-initialisation for the NestedLoRA methods (ignored
        for the baselines, whose raw outputs' norms carry no eigenvalue).
      network_kind: ``"parallel"`` (L independent MLPs; default except for
        ``neuralsvd-joint``) or ``"shared"``.
      network_options: extra keywords for
        :func:`~nestedlora_jax.networks.eigenfunction_network` (``hidden``, ``fourier_features``, ...).
      sampler, scale, shift, laplacian_method: passed to
        :func:`~nestedlora_jax.operators.problem_operator` (problem defaults otherwise). A
        problem whose spectrum is unknown (no ``energies``) trains too: without ``scale`` and
        ``shift`` they come from the Rayleigh-Ritz energies of the initial network on 8192
        samples (upper bounds of the wanted energies, :func:`~nestedlora_jax.operators.ritz_energies`),
        through the same rule as for known spectra; the evaluation then reports energies,
        residuals, orthogonality and Ritz values, and no errors.
      evaluation: ``"grid"`` (quadrature, d <= 2), ``"mc"`` (fresh samples) or ``"auto"``
        (grid when d <= 2).
      eval_every: evaluate the EMA parameters every this many steps (a multiple of
        ``log_every``) on ``num_periodic_eval_samples`` fresh samples (a fixed set, so
        successive values are comparable) and record ``mean_rel_error``,
        ``max_rel_error`` and ``subspace_distance_mean`` in the history.
      data_parallel: ``True`` splits every batch over all devices (``jax.devices()``, every
        process's after ``jax.distributed.initialize()``), an int ``n`` over the first ``n``;
        ``batch_size`` must be divisible by the device count. See :mod:`nestedlora_jax.parallel`.
    """
    check_positive_int("L (the number of states)", L)
    check_positive_int("log_every", log_every)
    if eval_every is not None and (not is_int(eval_every) or eval_every < 1 or eval_every % log_every):
        raise ValueError(
            f"eval_every ({eval_every!r}) must be a positive multiple of log_every ({log_every})."
        )
    if data_parallel is not False and data_parallel is not None and data_parallel is not True:
        check_positive_int("data_parallel (a device count, or True for all)", data_parallel)
    # Everything evaluation will need is checked now: a bad setting must not cost a training.
    _check_evaluation(problem, L, evaluation, grid_size, num_eval_samples)
    if eval_every is not None:
        _check_evaluation(problem, L, "mc", grid_size, num_periodic_eval_samples,
                          name="num_periodic_eval_samples")
    mesh = None
    if data_parallel is not False and data_parallel is not None:
        from nestedlora_jax.parallel import data_parallel_mesh

        mesh = data_parallel_mesh(None if data_parallel is True else int(data_parallel))
    objective, operator, kind, options, apply, params = _build(
        problem, L, method, seed, network_kind, network_options, sampler, scale, shift, laplacian_method
    )

    def init_params(key):
        # Fresh trainable parameters only: `apply` keeps the frozen features of `net`.
        return to_apply(eigenfunction_network_like(problem, L, kind, options, key))[1]

    if eval_every is not None:
        user_callback = callback
        eval_points = np.asarray(operator.sampler.sample(jax.random.PRNGKey(seed + 7), num_periodic_eval_samples))

        def callback(step, state):
            extra = dict(user_callback(step, state) or {}) if user_callback is not None else {}
            if step % eval_every == 0:
                m = evaluate(apply, state.ema_params, problem, operator, points=eval_points,
                             transform=_transform(objective, state.objective_state))
                extra.update({k: m[k] for k in ("mean_rel_error", "mean_rel_error_se", "max_rel_error",
                                                "subspace_distance_mean") if k in m})
            return extra

    result = fit(
        apply,
        params,
        operator.op,
        operator.sampler,
        steps=steps,
        batch_size=batch_size,
        objective=objective,
        num_functions=L,
        optimizer=optimizer,
        learning_rate=learning_rate,
        seed=seed,
        ema_decay=ema_decay,
        log_every=log_every,
        progress=progress,
        eigenvalue_transform=lambda t: energies_from_eigenvalues(t, operator.scale, operator.shift),
        collapse=collapse,
        init_params=init_params if kind == "parallel" else None,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        history_path=history_path,
        callback=callback,
        mesh=mesh,
    )
    return _evaluated(problem, L, method, operator, apply, objective, result,
                      evaluation=evaluation, num_eval_samples=num_eval_samples, grid_size=grid_size)


def _evaluated(problem, L, method, operator, apply, objective, result: FitResult, **evaluation):
    """``solve``'s and ``restore``'s answer: the result evaluated, with its printable table."""
    metrics = evaluate_result(problem, operator, apply, result, objective, L, **evaluation)
    table = M.summary_table(_table_view(metrics), title=f"{type(problem).__name__}, L = {L}, {method}")
    return SolveResult(result, operator, apply, objective, metrics, table)


def _build(problem, L, method, seed, network_kind, network_options, sampler, scale, shift,
           laplacian_method):
    """Objective, operator and initial network of a ``solve`` call (shared with ``restore``).

    A problem without a known spectrum and no ``scale``/``shift`` given is scaled from the
    Rayleigh-Ritz energies of the initial network (:func:`~nestedlora_jax.operators.ritz_energies`,
    upper bounds of the wanted energies): deterministic for a seed, so ``restore`` rebuilds the
    same operator."""
    objective = make_objective(method)
    kind = network_kind or ("shared" if method == "neuralsvd-joint" else "parallel")
    options = dict(network_options or {})
    if network_options is not None and not isinstance(network_options, dict):
        raise ValueError(f"network_options must be a dict of keywords, got {network_options!r}.")
    apply, params = to_apply(default_network(problem, L, kind=kind, seed=seed, **options))
    if (scale is None or shift is None) and known_energies(problem, L) is None:
        unscaled = problem_operator(problem, L, sampler, scale=1.0, shift=0.0)
        estimate = ritz_energies(apply, params, problem.potential, unscaled.sampler,
                                 kinetic=problem.kinetic, key=jax.random.PRNGKey(seed))
        est_scale, est_shift = scaling_from_energies(estimate)
        scale = est_scale if scale is None else scale
        shift = est_shift if shift is None else shift
    operator = problem_operator(
        problem, L, sampler, laplacian_method=laplacian_method, scale=scale, shift=shift
    )
    return objective, operator, kind, options, apply, params


def _check_evaluation(problem, L, evaluation, grid_size, num_samples, name="num_eval_samples") -> bool:
    """Fail before training on evaluation settings that could not be used after it; return
    whether the evaluation is on a quadrature grid."""
    if evaluation not in EVALUATIONS:
        raise ValueError(f"evaluation must be one of {EVALUATIONS}, got {evaluation!r}.")
    use_grid = evaluation == "grid" or (evaluation == "auto" and problem.dim <= 2)
    if evaluation == "grid" and problem.dim > 2:
        raise ValueError(
            f"evaluation='grid' needs d <= 2 (a tensor grid in d = {problem.dim} has "
            f"grid_size^{problem.dim} points): use evaluation='mc' (or 'auto')."
        )
    if use_grid:
        check_positive_int("grid_size", grid_size)
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2 nodes per axis, got {grid_size}.")
        points = grid_size ** problem.dim
        if points * 3 * L * 8 > 8e9:
            raise ValueError(
                f"grid_size={grid_size} gives {points:.3g} points, too many to evaluate {L} "
                "functions in memory (over 8 GB): use a smaller grid_size."
            )
    else:
        check_positive_int(name, num_samples)
        minimum = min_monte_carlo_samples(L)
        if num_samples < minimum:
            raise ValueError(
                f"{name}={num_samples} is too few Monte Carlo samples to evaluate {L} functions "
                f"with standard errors: use at least {minimum}."
            )
    return use_grid


def restore(
    problem,
    L: int,
    checkpoint_dir,
    *,
    method: str = "neuralsvd-seq",
    seed: int = 0,
    network_kind: str | None = None,
    network_options: dict | None = None,
    optimizer=None,
    sampler=None,
    scale: float | None = None,
    shift: float | None = None,
    laplacian_method: str = "default",
    evaluation: str = "auto",
    num_eval_samples: int = 2**18,
    grid_size: int = 200,
) -> SolveResult:
    """Reload what ``solve(..., checkpoint_dir=...)`` trained, from its newest checkpoint.

    Pass the same problem, ``L``, method, seed and network options as the ``solve`` call (and
    its ``optimizer`` if it was not the default; only its state's structure matters). The
    network is rebuilt, the saved training state (parameters, EMA, history) restored and
    evaluated as ``solve`` does; ``result.fit.state.step`` says which step was restored.
    """
    from nestedlora_jax import checkpoint as ckpt
    from nestedlora_jax.training import default_optimizer, init_train_state

    objective, operator, _, _, apply, params = _build(
        problem, L, method, seed, network_kind, network_options, sampler, scale, shift, laplacian_method
    )
    optimizer = optimizer if optimizer is not None else default_optimizer(1)
    like = init_train_state(params, optimizer, L, objective)
    manager = ckpt.CheckpointManager(checkpoint_dir)
    try:
        restored = manager.restore_latest(like)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoint_dir!r}: was it the checkpoint_dir of a solve call?")
    state, extra = restored
    result = FitResult.from_state(state, extra.get("history", []))
    return _evaluated(problem, L, method, operator, apply, objective, result,
                      evaluation=evaluation, num_eval_samples=num_eval_samples, grid_size=grid_size)


def eigenfunction_network_like(problem, L, kind, options, key):
    """A network of the same architecture with parameters drawn from ``key``."""
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    return default_network(problem, L, kind=kind, seed=seed, **options)


def evaluate_result(problem, operator, apply, result: FitResult, objective: Objective, L, *,
                    evaluation="auto", num_eval_samples=2**18, grid_size=200, params=None):
    """Evaluate a :class:`FitResult` (EMA parameters by default) on a grid or fresh samples."""
    use_grid = _check_evaluation(problem, L, evaluation, grid_size, num_eval_samples)
    points = weights = None
    if use_grid:
        points, weights = quadrature_grid(problem, L, grid_size, sampler=operator.sampler)
    transform = _transform(objective, result.state.objective_state)
    return evaluate(
        apply,
        result.ema_params if params is None else params,
        problem,
        operator,
        points=points,
        weights=weights,
        num_samples=num_eval_samples,
        transform=transform,
    )


def _transform(objective: Objective, state):
    """Raw outputs -> the objective's eigenfunction estimates (identity for NestedLoRA)."""
    return lambda f: np.asarray(objective.transform(jax.numpy.asarray(f), state))


def _table_view(metrics: dict) -> dict:
    keys = ["exact", "rayleigh", "norm", "rel_error", "rel_error_se", "residual", "angle_distance",
            "mean_rel_error", "mean_rel_error_se", "max_rel_error", "subspace_distance_mean",
            "subspace_distance_mean_se",
            "subspace_distance_total", "angle_distance_mean", "orthogonality_fro",
            "orthogonality_max"]
    return {k: metrics[k] for k in keys if k in metrics}
