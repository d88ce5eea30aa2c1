"""``solve``: a problem in, verified eigenfunctions out, in one call.

Composes the pieces with the defaults that worked on this project's problems::

    import nestedlora_jax as nl
    config = nl.SolveConfig().replace(training={"steps": 5000})
    result = nl.solve(nl.HarmonicOscillator(dim=2), 6, config=config, run_dir="runs/osc")
    print(result.table)
    again = nl.restore("runs/osc")   # the folder alone: configuration, problem, checkpoint

Everything ``solve`` does is available piecewise (``problem_operator``,
``eigenfunction_network`` + ``to_apply``, ``fit``, ``evaluate``) for users who want to swap
one part.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from nestedlora_jax.baselines import neuralef_objective, spin_objective
from nestedlora_jax.omm import omm_objective
from nestedlora_jax._checks import check_positive_int
from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.config import (
    CONFIG_VERSION,
    READABLE_CONFIG_VERSIONS,
    ConfigVersionError,
    EvaluationConfig,
    NetworkConfig,
    SolveConfig,
    TrainingConfig,
)
from nestedlora_jax.evaluation import Evaluation, evaluate, min_monte_carlo_samples, quadrature_grid
from nestedlora_jax.hooks import HistoryFile, Hook, check_resumed_config
from nestedlora_jax.laplacians import STOCHASTIC_LAPLACIAN_METHODS
from nestedlora_jax.networks import ACTIVATION_FUNCTIONS, eigenfunction_network, to_apply
from nestedlora_jax.objectives import Objective, nested_lora_objective
from nestedlora_jax.operators import (
    ProblemOperator,
    energies_from_eigenvalues,
    known_energies,
    problem_operator,
    ritz_energies,
    scaling_from_energies,
)
from nestedlora_jax.problems import check_problem
from nestedlora_jax.training import (
    FitResult,
    default_optimizer,
    fit,
    init_train_state,
    network_output_count,
)
from nestedlora_jax.config import METHODS

__all__ = ["METHODS", "PeriodicEvaluation", "SolveResult", "default_network", "make_objective",
           "restore", "solve"]

# The files solve writes in its run_dir.
RUN_FILE = "solve_config.json"
CHECKPOINTS = "checkpoints"
HISTORY = "history.json"


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
    if method == "spin-batch-jacobian":
        return spin_objective(jacobian="current_batch", **kwargs)
    if method.startswith("omm-"):
        variant = {"omm-seq": "sequential", "omm-joint": "joint", "omm-sanger": "sanger"}.get(method)
        if variant is not None:
            return omm_objective(variant, **kwargs)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")


def default_network(problem, L: int, network: NetworkConfig = NetworkConfig(), *,
                    architecture: str = "parallel", seed: int = 0, sampler=None,
                    importance_weighted: bool = True):
    """The eigenfunction network for ``problem``: ``network``'s choices, with the problem's
    :meth:`~nestedlora_jax.problems.Problem.network_hints` where ``network`` leaves them open
    (``None``): radial input (Coulomb problems), periodic inputs (periodic boxes); the
    problem's boundary mask always (Dirichlet boxes), its input standardization unless
    ``network.standardize_input`` is off, and its Gaussian envelope (harmonic confinement)
    unless ``network.gaussian_envelope`` is off.

    The envelope depends on what the network represents: ``psi / sqrt(p)`` with
    ``importance_weighted`` (as :func:`~nestedlora_jax.operators.problem_operator` by
    default), ``p`` the training ``sampler`` (``None``: the problem's default sampler for
    ``L``), else ``psi``; build the operator with the same two choices."""
    check_problem(problem, "default_network")
    hints = problem.network_hints()
    envelope = None
    if hints.gaussian_envelope is not None and network.gaussian_envelope:
        from nestedlora_jax.networks import gaussian_envelope_for_network

        if importance_weighted and sampler is None:
            sampler = problem.default_sampler(L)
        envelope = gaussian_envelope_for_network(*hints.gaussian_envelope,
                                                 sampler if importance_weighted else None)
    radial = network.radial_input if network.radial_input is not None else hints.radial_input
    periodic = network.periodic if network.periodic is not None else hints.periodic
    standardization = hints.input_standardization if network.standardize_input else None
    center, scale = standardization if standardization is not None else (None, None)
    return eigenfunction_network(
        problem.dim, L, architecture=architecture, hidden=network.hidden,
        activation=ACTIVATION_FUNCTIONS[network.activation],
        fourier_features=network.fourier_features, radial_input=radial, periodic=periodic,
        envelope=network.envelope, envelope_decay=network.envelope_decay,
        gaussian_envelope=envelope, boundary_mask=hints.boundary_mask, input_center=center,
        input_scale=scale, rngs=nnx.Rngs(params=seed),
    )


@dataclasses.dataclass
class SolveResult:
    """What :func:`solve` and :func:`restore` return: the training result, the operator it
    used, the pure network, the objective, the evaluation metrics and their printable table,
    and the configuration and run folder. With ``config.guard_functions`` the network
    (``apply``) and ``fit`` have ``L + guard_functions`` functions, of which the first ``L``
    are the reported states (``metrics``, ``table``, ``energies``)."""

    fit: FitResult
    operator: ProblemOperator
    apply: Callable
    objective: Objective
    metrics: Evaluation
    table: str
    config: SolveConfig = dataclasses.field(default_factory=SolveConfig)
    run_dir: str | None = None

    @property
    def energies(self) -> np.ndarray:
        """Energies from the Rayleigh quotients of the EMA parameters' functions."""
        return self.metrics.rayleigh


class PeriodicEvaluation(Hook):
    """Every ``every`` steps, evaluate the EMA parameters on fixed ``points`` and record
    ``mean_rel_error`` (with its standard error), ``max_rel_error`` and
    ``subspace_distance_mean`` in the history (the same points each time, so successive
    values are comparable); of the first ``reported`` functions (``None``: all)."""

    KEYS = ("mean_rel_error", "mean_rel_error_se", "max_rel_error", "subspace_distance_mean")

    def __init__(self, every: int, problem, operator, apply, objective, points,
                 reported: int | None = None):
        self.every, self.problem, self.operator = every, problem, operator
        self.apply, self.objective, self.points = apply, objective, points
        self.reported = reported

    def after_chunk(self, loop, entry: dict) -> None:
        if loop.step % self.every:
            return
        state = loop.state
        m = evaluate(self.apply, state.ema_params, self.problem, self.operator, points=self.points,
                     readout=_readout(self.objective, state.objective_state, self.reported))
        flat = m.to_dict()
        entry.update({k: flat[k] for k in self.KEYS if k in flat})


def solve(
    problem,
    L: int,
    *,
    config: SolveConfig | None = None,
    network: nnx.Module | None = None,
    objective: Objective | None = None,
    sampler=None,
    optimizer=None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
    data_parallel: bool | int = False,
) -> SolveResult:
    """Learn the ``L`` lowest eigenstates of ``problem`` and evaluate them.

    Args:
      problem: a problem from :mod:`nestedlora_jax.problems`, or your own subclass of
        :class:`~nestedlora_jax.problems.Problem` (the network, the operator and the evaluation
        take what they need from its methods). A problem whose spectrum is unknown (no
        ``energies``) trains too: without
        ``config.operator.scale`` / ``shift`` they come from the Rayleigh-Ritz energies of the
        initial network on 8192 samples (upper bounds of the wanted energies,
        :func:`~nestedlora_jax.operators.ritz_energies`); the evaluation then reports energies,
        residuals, orthogonality and Ritz values, and no errors.
      L: number of states.
      config: a :class:`~nestedlora_jax.config.SolveConfig` (method, network, operator,
        training, evaluation); default ``SolveConfig()``.
      network: your own Flax NNX module, one point ``(d,)`` -> ``(L,)``, instead of the one
        ``config.network`` describes (collapsed functions are then reported, not
        re-initialised: fresh per-function parameters cannot be drawn for an arbitrary module).
      objective: your own :class:`~nestedlora_jax.objectives.Objective` instead of
        ``config.method``'s.
      sampler: the training distribution (default: the problem's).
      optimizer: an Optax optimiser instead of the default Adam + cosine decay
        (``config.training.learning_rate`` must then be ``None``).
      run_dir: a folder for the run: ``solve_config.json`` (configuration and problem,
        written before training), ``checkpoints/`` and ``history.json``. ``restore(run_dir)``
        reloads it. A folder with checkpoints needs ``resume=True``.
      resume: continue the run in ``run_dir``; a configuration that differs from the saved
        one (but for ``training.checkpoint_every``) is refused.
      hooks: more :class:`~nestedlora_jax.hooks.Hook` objects for the training loop.
      progress: show a progress bar.
      data_parallel: ``True`` splits every batch over all devices (``jax.devices()``, every
        process's after ``jax.distributed.initialize()``), an int ``n`` over the first ``n``;
        ``batch_size`` must be divisible by the device count. See :mod:`nestedlora_jax.parallel`.
    """
    check_problem(problem, "solve")
    config = SolveConfig() if config is None else config
    if not isinstance(config, SolveConfig):
        raise ValueError(f"config must be a SolveConfig, got {type(config).__name__}.")
    check_positive_int("L (the number of states)", L)
    if data_parallel is not False and data_parallel is not None and data_parallel is not True:
        check_positive_int("data_parallel (a device count, or True for all)", data_parallel)
    if resume and run_dir is None:
        raise ValueError("resume=True needs the run_dir of the run to resume.")
    if config.training.checkpoint_every is not None and run_dir is None:
        raise ValueError("TrainingConfig.checkpoint_every needs a run_dir to write checkpoints to.")
    # Everything evaluation will need is checked now: a bad setting must not cost a training.
    ev = config.evaluation
    _check_evaluation(problem, L, ev.mode, ev.grid_size, ev.num_samples)
    if ev.every is not None:
        _check_evaluation(problem, L, "mc", ev.grid_size, ev.num_periodic_samples,
                          name="num_periodic_samples")
    mesh = None
    if data_parallel is not False and data_parallel is not None:
        from nestedlora_jax.parallel import data_parallel_mesh

        mesh = data_parallel_mesh(None if data_parallel is True else int(data_parallel))
    record = run_record(problem, L, config, sampler=sampler, optimizer=optimizer,
                        network=network, objective=objective)
    # The network, the operator's scaling and training see the guard functions too.
    trained = L + config.guard_functions
    objective, operator, apply, params = _build(problem, trained, config, sampler, network,
                                                objective, reported=L)
    architecture = config.architecture
    reinitializable = network is None and architecture == "parallel"

    def init_params(key):
        # Fresh trainable parameters only: `apply` keeps the frozen features of the network.
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        return to_apply(default_network(problem, trained, config.network,
                                        architecture=architecture, seed=seed, sampler=sampler))[1]

    all_hooks = []
    if ev.every is not None:
        seed = config.training.seed
        points = np.asarray(operator.sampler.sample(jax.random.PRNGKey(seed + 7), ev.num_periodic_samples))
        all_hooks.append(PeriodicEvaluation(ev.every, problem,
                                            _evaluation_operator(problem, trained, config, operator),
                                            apply, objective, points, L))
    all_hooks.extend(hooks)
    checkpoint_dir = None
    if run_dir is not None:
        run_dir = os.fspath(run_dir)
        _write_run_record(run_dir, record, resume)
        checkpoint_dir = os.path.join(run_dir, CHECKPOINTS)
        all_hooks.append(HistoryFile(os.path.join(run_dir, HISTORY)))

    result = fit(
        apply, params, operator.op, operator.sampler,
        config=config.training,
        objective=objective,
        optimizer=optimizer,
        init_params=init_params if reinitializable else None,
        spectral_map=lambda t: energies_from_eigenvalues(t, operator.scale, operator.shift),
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        hooks=all_hooks,
        progress=progress,
        mesh=mesh,
    )
    return _evaluated(problem, L, config, operator, apply, objective, result, ev, run_dir)


def restore(run_dir: str | os.PathLike, *, problem=None, network=None, objective=None,
            sampler=None, optimizer=None, evaluation: EvaluationConfig | None = None) -> SolveResult:
    """Reload what ``solve(..., run_dir=run_dir)`` trained, from its newest checkpoint.

    The configuration and the problem are read from ``run_dir/solve_config.json``; the
    network is rebuilt, the saved training state (parameters, EMA, history) restored and
    evaluated as ``solve`` did (or with ``evaluation``); ``result.fit.state.step`` says which
    step was restored. Pass ``problem`` only for a problem class that cannot be imported by
    name (e.g. one defined in a notebook; it must equal the saved one), and ``network``,
    ``objective``, ``sampler``, ``optimizer`` when the run used custom ones (a network of the
    same structure; only the optimiser state's structure matters).

    Raises:
      FileNotFoundError: ``run_dir`` holds no run (no ``solve_config.json``) or no checkpoint.
      ConfigVersionError: the run was written by an incompatible version.
      ValueError: a ``problem`` that differs from the saved one; a custom network, objective,
        sampler or optimizer not passed.
    """
    from nestedlora_jax import checkpoint as ckpt

    run_dir = os.fspath(run_dir)
    saved = read_run_record(run_dir)
    config = SolveConfig.from_dict(saved["config"])
    L = int(saved["L"])
    if problem is None:
        problem = problem_from_record(saved["problem"])
    elif problem_record(problem) != saved["problem"]:
        raise ValueError(
            f"the problem passed to restore ({problem!r}) differs from the one the run in "
            f"{run_dir} was trained on ({saved['problem']}): pass that one, or none."
        )
    for name, given in (("network", network), ("objective", objective), ("sampler", sampler),
                        ("optimizer", optimizer)):
        if saved.get(name) == "custom" and given is None:
            raise ValueError(f"the run in {run_dir} was trained with a custom {name}: pass it "
                             f"(restore(run_dir, {name}=...)) to rebuild the run.")
    trained = L + config.guard_functions
    objective, operator, apply, params = _build(problem, trained, config, sampler, network,
                                                objective, reported=L)
    if optimizer is None:
        optimizer = default_optimizer(config.training.steps, config.training.peak_learning_rate)
    like = init_train_state(params, optimizer, trained, objective)
    manager = ckpt.CheckpointManager(os.path.join(run_dir, CHECKPOINTS))
    try:
        restored = manager.restore_latest(like)
    finally:
        manager.close()
    if restored is None:
        raise FileNotFoundError(f"the run in {run_dir} has no checkpoint yet (it was stopped "
                                "before its first save).")
    state, extra = restored
    result = FitResult.from_state(state, extra.get("history", []))
    return _evaluated(problem, L, config, operator, apply, objective, result,
                      evaluation or config.evaluation, run_dir)


# ----------------------------------------------------------------- the run record


def run_record(problem, L: int, config: SolveConfig, *, sampler=None, optimizer=None,
               network=None, objective=None) -> dict:
    """What ``solve_config.json`` holds: the configuration, the problem (class and fields), L,
    and whether the network, objective, sampler and optimiser were the defaults."""
    return {
        "version": CONFIG_VERSION,
        "problem": problem_record(problem),
        "L": int(L),
        "config": config.to_dict(),
        "sampler": "default" if sampler is None else "custom",
        "optimizer": "default" if optimizer is None else "custom",
        "network": "default" if network is None else "custom",
        "objective": "default" if objective is None else "custom",
    }


def problem_record(problem) -> dict:
    """``{"class": "module:QualName", "fields": {...}}`` of a dataclass problem (its init
    fields, as JSON)."""
    cls = type(problem)
    if not dataclasses.is_dataclass(problem):
        raise ValueError(f"{cls.__name__} is not a dataclass: solve(run_dir=...) records a "
                         "problem by its class and fields; make it a frozen dataclass.")
    fields = {f.name: _jsonable(getattr(problem, f.name)) for f in dataclasses.fields(problem) if f.init}
    return {"class": f"{cls.__module__}:{cls.__qualname__}", "fields": fields}


def problem_from_record(record: dict):
    """The problem a :func:`problem_record` describes (its class imported by name)."""
    module_name, _, qualname = record["class"].partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise ValueError(
            f"cannot import the problem class {record['class']!r} of this run: pass the problem "
            "(restore(run_dir, problem=...))."
        ) from None
    return obj(**{k: _as_tuples(v) for k, v in record["fields"].items()})


def _as_tuples(value):
    """JSON lists back as (nested) tuples, the hashable form frozen problem fields hold."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def read_run_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, RUN_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{run_dir} holds no run: there is no {RUN_FILE} (written by solve(..., run_dir=...))."
        )
    with open(path) as fh:
        saved = json.load(fh)
    if not isinstance(saved, dict) or saved.get("version") not in READABLE_CONFIG_VERSIONS:
        raise ConfigVersionError(
            f"{path} has version {saved.get('version') if isinstance(saved, dict) else None!r}; "
            f"this nestedlora_jax reads versions {READABLE_CONFIG_VERSIONS}: the run was written "
            "by an incompatible version."
        )
    return saved


def _write_run_record(run_dir: str, record: dict, resume: bool) -> None:
    path = os.path.join(run_dir, RUN_FILE)
    checkpoints = os.path.join(run_dir, CHECKPOINTS)
    if not resume and os.path.isdir(checkpoints) and any(
            d.isdigit() for d in os.listdir(checkpoints)):
        # Refused here, before the record is rewritten: the old checkpoints must keep the
        # configuration they were trained with.
        raise FileExistsError(
            f"run_dir {run_dir} already holds checkpoints of a run: pass resume=True to continue "
            "it, or use an empty folder."
        )
    if resume and os.path.isfile(path):
        # A record written before "network" / "objective" were recorded had the defaults.
        saved = {"network": "default", "objective": "default"} | read_run_record(run_dir)
        # A record of an older readable version is compared as today's version reads it (the
        # same run: options added since take the values it ran).
        saved |= {"version": record["version"],
                  "config": SolveConfig.from_dict(saved["config"]).to_dict()}
        exempt = lambda r: r | {"config": r["config"] | {"training": {
            k: v for k, v in r["config"]["training"].items() if k not in TrainingConfig.RESUME_EXEMPT}}}
        check_resumed_config(exempt(saved), exempt(record), run_dir,
                             saved_values="the saved configuration (restore(run_dir).config)")
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(path, record)


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------- building and evaluating


def _evaluated(problem, L, config: SolveConfig, operator, apply, objective, result: FitResult,
               evaluation: EvaluationConfig, run_dir=None):
    """``solve``'s and ``restore``'s answer: the result evaluated, with its printable table."""
    operator = _evaluation_operator(problem, L + config.guard_functions, config, operator)
    metrics = evaluate_result(problem, operator, apply, result, objective, L, evaluation)
    table = metrics.table(title=f"{type(problem).__name__}, L = {L}, {config.method}")
    return SolveResult(result, operator, apply, objective, metrics, table, config, run_dir)


def _build(problem, L, config: SolveConfig, sampler, network=None, objective=None, *,
           reported=None):
    """Objective, operator and initial network of a ``solve`` call (shared with ``restore``),
    for ``L`` trained functions (``reported`` of them reported; only for the error message).

    A problem without a known spectrum and no scale / shift given is scaled from the
    Rayleigh-Ritz energies of the initial network (:func:`~nestedlora_jax.operators.ritz_energies`,
    upper bounds of the wanted energies): deterministic for a seed, so ``restore`` rebuilds the
    same operator."""
    if objective is None:
        # SpIN's Jacobian average skips the zero blocks of the default parallel networks (the
        # same update, one reverse pass per sample instead of L).
        kwargs = ({"per_function_parameters": True} if config.method == "spin" and network is None
                  and config.architecture == "parallel" else {})
        objective = make_objective(config.method, **kwargs)
    elif not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective, got {type(objective).__name__}.")
    seed = config.training.seed
    if network is None:
        network = default_network(problem, L, config.network, architecture=config.architecture,
                                  seed=seed, sampler=sampler)
    elif not isinstance(network, nnx.Module):
        raise ValueError(f"network must be a Flax NNX module (one point (d,) -> (L,)), got "
                         f"{type(network).__name__}; with a pure apply(params, x) use fit.")
    apply, params = to_apply(network)
    outputs = network_output_count(apply, params, problem.dim)
    if outputs != L:
        asked = (f"L = {L} states were asked for" if reported in (None, L) else
                 f"L = {reported} states and {L - reported} guard functions were asked for")
        raise ValueError(f"the network maps a point to shape ({outputs},), but {asked}: build "
                         f"it with {L} outputs.")
    scale, shift = config.operator.scale, config.operator.shift
    if (scale is None or shift is None) and known_energies(problem, L) is None:
        unscaled = problem_operator(problem, L, sampler, scale=1.0, shift=0.0)
        estimate = ritz_energies(apply, params, problem.potential, unscaled.sampler,
                                 kinetic=problem.kinetic, key=jax.random.PRNGKey(seed))
        est_scale, est_shift = scaling_from_energies(estimate)
        scale = est_scale if scale is None else scale
        shift = est_shift if shift is None else shift
    operator = problem_operator(problem, L, sampler, laplacian_method=config.operator.laplacian,
                                num_probes=config.operator.num_probes, scale=scale, shift=shift)
    return objective, operator, apply, params


def _evaluation_operator(problem, L, config: SolveConfig, operator: ProblemOperator) -> ProblemOperator:
    """The operator evaluation uses: the training one, but with an exact Laplacian where
    training used a stochastic one (its noise would enter every reported error)."""
    if config.operator.laplacian not in STOCHASTIC_LAPLACIAN_METHODS:
        return operator
    return problem_operator(problem, L, operator.sampler, scale=operator.scale, shift=operator.shift,
                            importance_weighted=operator.importance_weighted)


def _check_evaluation(problem, L, evaluation, grid_size, num_samples, name="num_samples") -> bool:
    """Fail before training on evaluation settings that could not be used after it; return
    whether the evaluation is on a quadrature grid."""
    use_grid = evaluation == "grid" or (evaluation == "auto" and problem.dim <= 2)
    if evaluation == "grid" and problem.dim > 2:
        raise ValueError(
            f"evaluation mode 'grid' needs d <= 2 (a tensor grid in d = {problem.dim} has "
            f"grid_size^{problem.dim} points): use mode 'mc' (or 'auto')."
        )
    if use_grid:
        points = grid_size ** problem.dim
        if points * 3 * L * 8 > 8e9:
            raise ValueError(
                f"grid_size={grid_size} gives {points:.3g} points, too many to evaluate {L} "
                "functions in memory (over 8 GB): use a smaller grid_size."
            )
    else:
        minimum = min_monte_carlo_samples(L)
        if num_samples < minimum:
            raise ValueError(
                f"{name}={num_samples} is too few Monte Carlo samples to evaluate {L} functions "
                f"with standard errors: use at least {minimum}."
            )
    return use_grid


def evaluate_result(problem, operator, apply, result: FitResult, objective: Objective, L,
                    evaluation: EvaluationConfig = EvaluationConfig(), *, params=None, grid=None):
    """Evaluate the first ``L`` functions of a :class:`FitResult` (EMA parameters by default;
    the network may have more outputs, guard functions) on a grid or fresh samples;
    ``grid=(points, weights)`` replaces the one ``evaluation`` would choose."""
    points = weights = None
    if grid is not None:
        points, weights = grid
    elif _check_evaluation(problem, L, evaluation.mode, evaluation.grid_size, evaluation.num_samples):
        points, weights = quadrature_grid(problem, L, evaluation.grid_size, sampler=operator.sampler)
    return evaluate(
        apply,
        result.ema_params if params is None else params,
        problem,
        operator,
        points=points,
        weights=weights,
        num_samples=evaluation.num_samples,
        readout=_readout(objective, result.state.objective_state, L),
    )


def _readout(objective: Objective, state, reported: int | None = None):
    """Raw outputs -> the objective's eigenfunction estimates (identity for NestedLoRA),
    the first ``reported`` of them (``None``: all; fewer than the network's outputs with
    guard functions)."""
    return lambda f: np.asarray(objective.readout(jax.numpy.asarray(f), state))[..., :reported]
