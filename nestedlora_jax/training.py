"""Training loop: NestedLoRA on an operator, with Optax, EMA, NaN guards, checkpoints.

The loop is a thin composition of pure pieces:

* ``make_loss_fn(apply, operator, ...)`` -> ``loss_fn(params, xs) -> (loss, stats)``: the
  network ``apply(params, x)`` (one point ``(d,)`` -> ``(L,)``), the operator
  ``operator(fn, x) -> (f(x), (T f)(x))`` and the nested objective. Usable alone in a
  user's own training step.
* ``make_train_step(...)`` -> a pure ``step(state, key) -> state`` (sample, gradient,
  guarded Optax update, EMA of parameters, running statistics), jit- and scan-friendly.
* ``init_train_state(...)`` and ``train_steps(step, state, key, num_steps)``: pure, so several
  seeds or problems train at once under ``jax.vmap`` and the loop nests in any ``jit``.
* ``fit(...)`` runs it in jitted ``lax.scan`` chunks, shows progress, checkpoints with
  Orbax, re-initialises collapsed functions and writes a JSON history; with a ``mesh`` it
  trains data-parallel (batch sharded, parameters replicated; see :mod:`nestedlora_jax.parallel`).

Reproducibility: the PRNG key of step ``t`` is ``fold_in(PRNGKey(seed), t)``, so a run
resumed from a checkpoint sees exactly the samples of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestedlora_jax._io import write_json_atomic
from nestedlora_jax.objectives import NESTINGS, Objective, nested_lora_objective

__all__ = [
    "CollapseConfig",
    "FitResult",
    "TrainState",
    "TrainingDivergedError",
    "default_optimizer",
    "fit",
    "init_train_state",
    "make_loss_fn",
    "make_train_step",
    "train_steps",
]

PyTree = Any
Apply = Callable[[PyTree, jax.Array], jax.Array]
Operator = Callable[..., tuple[jax.Array, jax.Array]]


class TrainingDivergedError(RuntimeError):
    """Raised when too many consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------- loss


def make_loss_fn(apply: Apply, operator: Operator, objective: Objective | None = None):
    """Build ``loss_fn(params, objective_state, xs) -> (loss, (objective_state, stats))``.

    ``f, Tf = vmap(operator(lambda x: apply(params, x), .))(xs)``, both ``(B, L)``; the
    loss is ``objective.loss`` (default :func:`nested_lora_objective` with sequential
    nesting), whose gradient never differentiates ``Tf``. ``stats`` holds per-function
    batch estimates: ``norms`` = mean_b f_bi^2 (the NestedLoRA eigenvalue estimate) and
    ``rayleigh`` = Rayleigh quotients of the objective's eigenfunction estimates.
    """
    objective = objective if objective is not None else nested_lora_objective()
    takes_key = _accepts_key(operator)

    def loss_fn(params, objective_state, xs, key=None):
        fn = lambda x: apply(params, x)
        if takes_key and key is not None:
            # One key per point, for stochastic operators (e.g. Hutchinson Laplacians).
            keys = jax.random.split(key, xs.shape[0])
            f, Tf = jax.vmap(lambda x, k: operator(fn, x, key=k))(xs, keys)
        else:
            f, Tf = jax.vmap(lambda x: operator(fn, x))(xs)
        loss, objective_state = objective.loss(f, Tf, objective_state)
        f, Tf = jax.lax.stop_gradient((f, Tf))
        phi = objective.transform(f, objective_state)
        Tphi = objective.transform(Tf, objective_state)
        phi_sq = jnp.mean(phi * phi, axis=0)
        # A function that is exactly zero (fully collapsed) has no Rayleigh quotient; report
        # 0 rather than NaN so the collapse test can see it.
        rayleigh = jnp.where(phi_sq > 0, jnp.mean(phi * Tphi, axis=0) / jnp.where(phi_sq > 0, phi_sq, 1), 0)
        stats = {"norms": jnp.mean(f * f, axis=0), "rayleigh": rayleigh}
        return loss, (jax.lax.stop_gradient(objective_state), stats)

    return loss_fn


def _accepts_key(operator) -> bool:
    try:
        return "key" in inspect.signature(operator).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------- state and step


class TrainState(NamedTuple):
    """Everything a step reads and writes (a pytree; checkpointed whole)."""

    step: jax.Array  # () int32
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    objective_state: PyTree
    norms: jax.Array  # (L,) running mean of ||f_i||^2
    rayleigh: jax.Array  # (L,) running mean of the Rayleigh quotients
    loss: jax.Array  # () last finite loss
    bad_steps: jax.Array  # () total skipped steps
    consecutive_bad: jax.Array  # () current run of skipped steps


def _tree_all_finite(tree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_train_step(
    loss_fn,
    optimizer: optax.GradientTransformation,
    sample: Callable[[jax.Array, int], jax.Array],
    batch_size: int,
    *,
    ema_decay: float = 0.999,
    stats_decay: float = 0.99,
    batch_sharding: jax.sharding.Sharding | None = None,
):
    """A pure training step ``step(state, key) -> state``.

    Draws ``xs = sample(key, batch_size)``, computes the masked gradient, and applies the
    Optax update only if the loss and every gradient leaf are finite; otherwise the step
    is skipped and counted (parameters, optimizer state and EMA untouched). The EMA of the
    parameters uses the warm-up ``min(ema_decay, (1 + t) / (10 + t))`` so short runs are
    not dominated by the initialisation. With ``batch_sharding`` (e.g.
    :func:`nestedlora_jax.parallel.batch_sharding`) the batch is laid out across devices
    right where it is drawn, and XLA partitions the rest of the step to match.
    """

    def step(state: TrainState, key) -> TrainState:
        sample_key, operator_key = jax.random.split(key)
        xs = sample(sample_key, batch_size)
        if batch_sharding is not None:
            xs = jax.lax.with_sharding_constraint(xs, batch_sharding)
        (loss, (objective_state, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.objective_state, xs, operator_key
        )
        ok = jnp.isfinite(loss) & _tree_all_finite(grads) & _tree_all_finite(objective_state)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        t = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree_util.tree_map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema_params, params
        )
        sd = jnp.where(state.step == 0, 0.0, stats_decay)
        norms = sd * state.norms + (1.0 - sd) * stats["norms"]
        rayleigh = sd * state.rayleigh + (1.0 - sd) * stats["rayleigh"]
        new = state._replace(
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            objective_state=objective_state,
            norms=norms.astype(state.norms.dtype),
            rayleigh=rayleigh.astype(state.rayleigh.dtype),
            loss=loss.astype(state.loss.dtype),
        )
        kept = _select(ok, new, state)
        return kept._replace(
            step=state.step + 1,
            bad_steps=state.bad_steps + (~ok).astype(jnp.int32),
            consecutive_bad=jnp.where(ok, 0, state.consecutive_bad + 1),
        )

    return step


def init_train_state(params: PyTree, optimizer: optax.GradientTransformation, L: int,
                     objective: Objective | None = None) -> TrainState:
    """The :class:`TrainState` at step 0 for ``params`` (pure: ``vmap`` it over seeds).

    ``L`` is the number of learned functions (the network's outputs); ``objective`` defaults
    to sequential NestedLoRA, as in :func:`make_loss_fn`.
    """
    objective = objective if objective is not None else nested_lora_objective()
    dtype = jax.tree_util.tree_leaves(params)[0].dtype
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=params,
        opt_state=optimizer.init(params),
        objective_state=objective.init(L, dtype),
        norms=jnp.zeros((L,), dtype),
        rayleigh=jnp.zeros((L,), dtype),
        loss=jnp.zeros((), dtype),
        bad_steps=jnp.zeros((), jnp.int32),
        consecutive_bad=jnp.zeros((), jnp.int32),
    )


def train_steps(step: Callable[[TrainState, jax.Array], TrainState], state: TrainState,
                key: jax.Array, num_steps: int) -> TrainState:
    """Run ``num_steps`` (a Python int) of ``step`` in one ``lax.scan``; pure.

    Step ``t`` uses the key ``fold_in(key, t)`` (``t`` counted from ``state.step``), the keys
    :func:`fit` uses with ``key = PRNGKey(seed)``: so the same run can be split into chunks,
    resumed, or batched over seeds with ``jax.vmap(lambda s, k: train_steps(step, s, k, n))``
    and give the same numbers.
    """
    keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(state.step + jnp.arange(num_steps))
    state, _ = jax.lax.scan(lambda s, k: (step(s, k), None), state, keys)
    return state


def default_optimizer(steps: int, learning_rate: float = 1e-3, final_fraction: float = 1e-2):
    """Adam with cosine decay from ``learning_rate`` to ``final_fraction * learning_rate``.

    method.md §7: Adam at 1e-3 with cosine decay to 1e-5 worked well on the oscillator and
    hydrogen; the follow-up paper also found Adam better than RMSprop.
    """
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=final_fraction)
    return optax.adam(schedule)


# ----------------------------------------------------------------- collapse


@dataclasses.dataclass(frozen=True)
class CollapseConfig:
    """Detection of collapsed functions and their re-initialisation (method.md §7).

    A function is *dead* when its running norm ``||f_i||^2`` has fallen below
    ``threshold`` times its running Rayleigh quotient ``<f_i, T f_i>/||f_i||^2``, or its
    Rayleigh quotient is not positive. At the NestedLoRA optimum the two are equal
    (``||f_i||^2 = lambda_i``), so the test uses only quantities known during training.
    A collapsing function keeps a meaningful direction (typically drifting into the span
    of earlier functions, so its Rayleigh quotient stays large) while its norm goes to 0.

    Checks run every ``check_every`` steps between ``start_fraction`` and
    ``stop_fraction`` of training; flagged functions are recorded in the history
    (``"dead"``). With ``reinitialize`` (the default) and an ``init_params`` given to :func:`fit`
    (per-function parameters with a leading axis of size L, as in ``ParallelMLPs``), a dead
    function gets fresh parameters, its EMA is reset to them, its Adam first moment is
    zeroed and its second moment set to the mean over the other functions.

    A function is re-initialised only after ``patience`` consecutive checks flag it: under
    sequential nesting a later function can look dead for a while before the earlier ones
    have converged, while a real collapse persists.

    Measured on 2-D hydrogen with 16 states (100k steps, batch 256, lr 3e-3, the problem's
    shifted operator and default sampler), A/B without re-initialisation: on seed 1 function
    15 collapsed at step 24000 and stayed dead (mean relative error 0.43); re-initialised,
    the run reached 8.3e-4. On seed 0 the detector flagged functions 14, 15 once, at step
    12000, and they recovered alone (2.1e-4 without re-initialisation, 3.4e-4 with it, at
    patience 1), which is why ``patience`` defaults to 2.
    """

    threshold: float = 0.1
    check_every: int = 2000
    start_fraction: float = 0.05
    stop_fraction: float = 0.8
    reinitialize: bool = True
    patience: int = 2

    def __post_init__(self):
        if not 0 < self.threshold < 1:
            raise ValueError(f"CollapseConfig.threshold must be in (0, 1), got {self.threshold}.")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"CollapseConfig.check_every must be a positive integer, got {self.check_every}.")
        if int(self.patience) != self.patience or self.patience < 1:
            raise ValueError(f"CollapseConfig.patience must be a positive integer, got {self.patience}.")
        if not 0 <= self.start_fraction <= self.stop_fraction <= 1:
            raise ValueError(
                "CollapseConfig needs 0 <= start_fraction <= stop_fraction <= 1, got "
                f"{self.start_fraction}, {self.stop_fraction}."
            )


def dead_functions(norms, rayleigh, threshold: float) -> np.ndarray:
    """Indices of functions judged collapsed (see :class:`CollapseConfig`)."""
    norms, rayleigh = np.asarray(norms), np.asarray(rayleigh)
    return np.flatnonzero((rayleigh <= 0) | (norms < threshold * rayleigh))


def _reinitialize_functions(state: TrainState, fresh_params, dead: np.ndarray) -> TrainState:
    idx = jnp.asarray(dead)

    def replace_rows(old, new):
        return old.at[idx].set(new[idx])

    params = jax.tree_util.tree_map(replace_rows, state.params, fresh_params)
    ema = jax.tree_util.tree_map(replace_rows, state.ema_params, fresh_params)
    L = state.norms.shape[0]
    alive = np.setdiff1d(np.arange(L), dead)

    def fix_adam(s):
        if not isinstance(s, optax.ScaleByAdamState):
            return s
        mu = jax.tree_util.tree_map(lambda m: m.at[idx].set(0.0), s.mu)
        if alive.size:
            nu = jax.tree_util.tree_map(
                lambda v: v.at[idx].set(jnp.mean(v[jnp.asarray(alive)], axis=0)), s.nu
            )
        else:
            nu = s.nu
        return s._replace(mu=mu, nu=nu)

    opt_state = jax.tree_util.tree_map(
        fix_adam, state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)
    )
    # Forget the dead functions' running statistics so they are not flagged again at once.
    norms = state.norms.at[idx].set(state.rayleigh[idx])
    return state._replace(params=params, ema_params=ema, opt_state=opt_state, norms=norms)


# ----------------------------------------------------------------- fit


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      params: trained raw parameters.
      ema_params: exponential moving average of the parameters (use these to evaluate).
      eigenvalues: ``(L,)`` running estimates of the operator eigenvalues ``||f_i||^2``.
      rayleigh: ``(L,)`` running Rayleigh quotients.
      history: list of dicts (step, loss, norms, rayleigh, bad_steps, dead, time, ...).
      bad_steps: number of skipped (non-finite) steps.
      reinitialized: list of (step, [function indices]) re-initialisations.
      state: the final :class:`TrainState`.
      steps_run: steps trained by this call (fewer than ``steps`` after a resume).
      train_time: seconds this call spent training (compilation included).
    """

    params: PyTree
    ema_params: PyTree
    eigenvalues: np.ndarray
    rayleigh: np.ndarray
    history: list
    bad_steps: int
    reinitialized: list
    state: TrainState
    steps_run: int = 0
    train_time: float = 0.0

    @classmethod
    def from_state(cls, state: TrainState, history: list, reinitialized: list, *,
                   steps_run: int = 0, train_time: float = 0.0) -> "FitResult":
        """The result for a training state (at the end of ``fit``, or restored from disk;
        JSON turns the ``(step, indices)`` pairs of ``reinitialized`` into lists)."""
        return cls(
            params=state.params,
            ema_params=state.ema_params,
            eigenvalues=np.asarray(state.norms),
            rayleigh=np.asarray(state.rayleigh),
            history=history,
            bad_steps=int(state.bad_steps),
            reinitialized=[tuple(r) for r in reinitialized],
            state=state,
            steps_run=steps_run,
            train_time=train_time,
        )


def _validate_fit_args(apply, params, sampler, steps, batch_size, nesting, num_functions, split_batch):
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}.")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if split_batch and batch_size % 2:
        raise ValueError(
            f"batch_size must be even for this objective (the quadratic term uses two "
            f"equal halves of the batch), got {batch_size}."
        )
    if nesting not in NESTINGS:
        raise ValueError(f"unknown nesting {nesting!r}; expected one of {NESTINGS}.")
    if num_functions is not None and (int(num_functions) != num_functions or num_functions < 1):
        raise ValueError(f"num_functions L must be a positive integer, got {num_functions!r}.")
    dim = getattr(sampler, "dim", None)
    if dim is None:
        raise ValueError("sampler must have a `dim` attribute and sample(key, n) / log_prob(x).")
    out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((dim,), jnp.float32))
    if len(out.shape) != 1:
        raise ValueError(
            f"apply(params, x) must map one point of shape ({dim},) to (L,), got output "
            f"shape {out.shape}."
        )
    L = out.shape[0]
    if num_functions is not None and L != num_functions:
        raise ValueError(
            f"the network has {L} outputs but num_functions L = {num_functions}; build the "
            f"network with L = {num_functions} outputs (or pass num_functions={L})."
        )
    if L < 1:
        raise ValueError("the network has no outputs (L = 0).")
    return L


def fit(
    apply: Apply,
    params: PyTree,
    operator: Operator,
    sampler,
    *,
    steps: int,
    batch_size: int = 512,
    nesting: str = "sequential",
    weights=None,
    split_batch: bool = True,
    objective: Objective | None = None,
    num_functions: int | None = None,
    optimizer: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    log_every: int = 100,
    progress: bool = True,
    eigenvalue_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    collapse: CollapseConfig | None = CollapseConfig(),
    init_params: Callable[[jax.Array], PyTree] | None = None,
    max_consecutive_bad_steps: int = 100,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    history_path: str | os.PathLike | None = None,
    callback: Callable[[int, TrainState], dict | None] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> FitResult:
    """Train ``apply(params, .)`` so its L outputs learn the top-L eigenfunctions.

    Args:
      apply: pure network ``apply(params, x)``, one point ``(d,)`` -> ``(L,)``.
      params: initial parameters (pytree).
      operator: ``operator(fn, x) -> (fn(x), (T fn)(x))`` for one point, T self-adjoint
        in the inner product that batch means under ``sampler`` estimate.
      sampler: object with ``dim`` and ``sample(key, n) -> (n, d)``.
      steps: number of optimisation steps (``0`` returns the initial state).
      batch_size: samples per step (even with ``split_batch``).
      nesting: ``"sequential"`` (per-function parameters) or ``"joint"``.
      weights: joint-nesting weights.
      split_batch: unbiased two-halves estimate of the quadratic term.
      objective: an :class:`Objective` overriding ``nesting``/``weights``/``split_batch``
        (e.g. a baseline from :mod:`nestedlora_jax.baselines`).
      optimizer: any Optax ``GradientTransformation``; default
        :func:`default_optimizer` (Adam, cosine decay from ``learning_rate``).
      seed: PRNG seed; same seed, same machine -> same numbers.
      ema_decay: decay of the parameter EMA used for evaluation.
      log_every: steps per jitted chunk (progress, history and checks happen between
        chunks).
      progress: show a tqdm progress bar (step rate, loss, eigenvalue estimates).
      eigenvalue_transform: maps operator eigenvalue estimates to reported units
        (e.g. energies) for the progress bar and history.
      collapse: collapse detection / remedy (``None`` disables it; always off for objectives
        whose norms are not eigenvalue estimates, such as the baselines).
      init_params: ``key -> params`` fresh per-function parameters for re-initialising
        collapsed functions (leading axis L on every leaf); without it collapse is only
        reported.
      max_consecutive_bad_steps: stop with :class:`TrainingDivergedError` after this many
        consecutive non-finite steps.
      checkpoint_dir: Orbax checkpoint directory (atomic saves of the whole state).
      checkpoint_every: steps between checkpoints (a multiple of ``log_every``); the final
        state is saved in any case when ``checkpoint_dir`` is given.
      resume: continue from the latest checkpoint in ``checkpoint_dir``; gives the same
        parameters as an uninterrupted run with the same seed and configuration.
      history_path: JSON file rewritten after every chunk with the history so far.
      callback: ``callback(step, state) -> dict | None`` after every chunk; a returned
        dict is merged into that history entry (e.g. periodic evaluation).
      mesh: train data-parallel on this device mesh (e.g.
        :func:`nestedlora_jax.parallel.data_parallel_mesh`): each batch is split over the
        mesh axis ``data_axis`` (``batch_size`` must be divisible by its size), parameters
        and optimiser state are replicated. Same seed and global batch -> the same samples
        and, to float round-off, the same result as on one device.
      data_axis: name of the mesh axis the batch is split over.
    """
    if int(log_every) != log_every or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}.")
    if checkpoint_every is not None:
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir.")
        if checkpoint_every < 1 or checkpoint_every % log_every:
            raise ValueError(
                f"checkpoint_every ({checkpoint_every}) must be a positive multiple of "
                f"log_every ({log_every})."
            )
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume.")
    if max_consecutive_bad_steps < 1:
        raise ValueError(f"max_consecutive_bad_steps must be >= 1, got {max_consecutive_bad_steps}.")

    if objective is None:
        objective = nested_lora_objective(nesting, weights, split_batch)
    if not objective.norms_are_eigenvalues:
        # The collapse test compares ||f_i||^2 with the Rayleigh quotient, equal only at the
        # NestedLoRA optimum (see Objective.norms_are_eigenvalues).
        collapse = None
    # Configuration is checked first; only then is the network traced (abstractly) for L.
    L = _validate_fit_args(
        apply, params, sampler, steps, batch_size, nesting, num_functions, objective.needs_even_batch
    )

    place = lambda state: state
    sharding = None
    if mesh is not None:
        from nestedlora_jax import parallel

        parallel.check_batch_divisible(batch_size, mesh, data_axis)
        sharding = parallel.batch_sharding(mesh, data_axis)
        place = lambda state: parallel.replicate(state, mesh)

    optimizer = optimizer if optimizer is not None else default_optimizer(steps, learning_rate)
    loss_fn = make_loss_fn(apply, operator, objective)
    step_fn = make_train_step(
        loss_fn, optimizer, sampler.sample, batch_size, ema_decay=ema_decay, batch_sharding=sharding
    )
    base_key = jax.random.PRNGKey(seed)
    state = init_train_state(params, optimizer, L, objective)

    manager = None
    history: list = []
    reinitialized: list = []
    flag_counts = np.zeros(L, dtype=int)  # consecutive collapse checks that flagged each function
    if checkpoint_dir is not None:
        from nestedlora_jax import checkpoint as ckpt

        manager = ckpt.CheckpointManager(checkpoint_dir)
        if resume:
            restored = manager.restore_latest(state)
            if restored is not None:
                state, extra = restored
                history = extra.get("history", [])
                reinitialized = extra.get("reinitialized", [])
                flag_counts = np.asarray(extra.get("flag_counts", flag_counts), dtype=int)
    state = place(state)

    # At most three chunk lengths occur (log_every, the rest up to a multiple of it, the
    # last one), so a static length costs at most three compilations.
    run_chunk = jax.jit(lambda state, num: train_steps(step_fn, state, base_key, num), static_argnums=1)

    transform = eigenvalue_transform or (lambda t: t)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=int(state.step), desc="nestedlora", dynamic_ncols=True)
    t_start = time.perf_counter()
    start_step = int(state.step)
    try:
        while int(state.step) < steps:
            num = min(log_every - int(state.step) % log_every, steps - int(state.step))
            state = run_chunk(state, num)
            step = int(state.step)
            if int(state.consecutive_bad) >= max_consecutive_bad_steps:
                raise TrainingDivergedError(
                    f"{int(state.consecutive_bad)} consecutive steps up to step {step} had a "
                    f"non-finite loss or gradient (skipped, {int(state.bad_steps)} in total); "
                    "training stopped. Check the sampler (samples at singular points), the "
                    "operator and the learning rate."
                )
            norms, rq = np.asarray(state.norms), np.asarray(state.rayleigh)
            entry = {
                "step": step,
                "loss": float(state.loss),
                "eigenvalues": transform(norms).tolist(),
                "rayleigh": transform(rq).tolist(),
                "bad_steps": int(state.bad_steps),
                "time": time.perf_counter() - t_start,
            }
            if collapse is not None and step % collapse.check_every < num:
                if collapse.start_fraction * steps <= step <= collapse.stop_fraction * steps:
                    dead = dead_functions(norms, rq, collapse.threshold)
                    entry["dead"] = dead.tolist()
                    flagged = np.zeros(L, dtype=bool)
                    flagged[dead] = True
                    flag_counts = np.where(flagged, flag_counts + 1, 0)
                    dead = np.flatnonzero(flag_counts >= collapse.patience)
                    if dead.size and collapse.reinitialize and init_params is not None:
                        flag_counts[dead] = 0
                        fresh = init_params(jax.random.fold_in(jax.random.PRNGKey(seed + 1), step))
                        state = place(_reinitialize_functions(state, fresh, dead))
                        reinitialized.append((step, dead.tolist()))
                        entry["reinitialized"] = dead.tolist()
            if callback is not None:
                extra = callback(step, state)
                if extra:
                    entry.update(extra)
            history.append(entry)
            if bar is not None:
                bar.update(num)
                shown = transform(norms)[: min(L, 4)]
                bar.set_postfix(loss=f"{entry['loss']:.4g}", eig=np.array2string(shown, precision=4), bad=entry["bad_steps"])
            if history_path is not None:
                write_json_atomic(history_path, {"history": history, "reinitialized": reinitialized})
            # The final state is always saved, so a finished run can be reloaded.
            if manager is not None and (step == steps or (checkpoint_every and step % checkpoint_every == 0)):
                manager.save(step, state, {"history": history, "reinitialized": reinitialized,
                                           "flag_counts": flag_counts.tolist()})
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.close()
    return FitResult.from_state(
        state, history, reinitialized,
        steps_run=int(state.step) - start_step,
        train_time=time.perf_counter() - t_start,
    )
