"""Training: NestedLoRA on an operator, with Optax, EMA and guarded steps.

The compiled part is pure:

* ``make_loss_fn(apply, operator, objective)`` ->
  ``loss_fn(params, objective_state, batch, key=None) -> (loss, (objective_state, stats))``: the
  network ``apply(params, x)`` (one point ``(d,)`` -> ``(L,)``) or a pair ``(apply_f, apply_g)``
  for an SVD, the operator (per point, ``operator(fn, x) -> (f(x), (T f)(x))``, or a
  :class:`~nestedlora_jax.operators.BatchOperator`) and the objective. Usable alone in a user's
  own training step.
* ``make_train_step(loss_fn, optimizer, sample, batch_size)`` -> a pure
  ``step(state, key) -> state`` (sample, gradient, guarded Optax update, EMA of parameters,
  running statistics), jit- and scan-friendly.
* ``init_train_state(...)`` and ``train_steps(step, state, key, num_steps)``: pure, so several
  seeds or problems train at once under ``jax.vmap`` and the loop nests in any ``jit``.

``fit(...)`` composes them and runs the chunks with :func:`nestedlora_jax.hooks.run_loop`:
progress, history file, checkpoints with resume, collapse remedy, divergence guard and
callbacks are hooks (:mod:`nestedlora_jax.hooks`); with a ``mesh`` it trains data-parallel
(batch sharded, parameters replicated; see :mod:`nestedlora_jax.parallel`).

Reproducibility: the PRNG key of step ``t`` is ``fold_in(PRNGKey(seed), t)``, so a run
resumed from a checkpoint sees exactly the samples of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestedlora_jax.hooks import (
    Checkpoints,
    CollapseConfig,
    CollapseRemedy,
    DivergenceGuard,
    Hook,
    Loop,
    ProgressBar,
    TrainingDivergedError,
    TrainingInterrupted,
    reinitializations,
    run_loop,
)
from nestedlora_jax._checks import check_even_batch
from nestedlora_jax.config import TrainingConfig
from nestedlora_jax.lattice import check_lattice_sampler, lattice_sample
from nestedlora_jax.objectives import (Objective, OperatorOutput, _halves, _second_moment,
                                      nested_lora_objective)
from nestedlora_jax.operators import (
    MAX_ABS_OPERATOR_VALUE,
    BatchOperator,
    pointwise_operator,
    valid_points,
)

__all__ = [
    "CollapseConfig",
    "FitResult",
    "TrainState",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "default_optimizer",
    "fit",
    "init_train_state",
    "make_loss_fn",
    "make_train_step",
    "rayleigh_ritz_readout",
    "train_steps",
]

PyTree = Any
Apply = Callable[[PyTree, jax.Array], jax.Array]
Operator = Callable[..., tuple[jax.Array, jax.Array]]


# ----------------------------------------------------------------- loss


def make_loss_fn(apply: Apply | tuple[Apply, Apply], operator, objective: Objective | None = None,
                 *, max_abs_value: float = MAX_ABS_OPERATOR_VALUE):
    """Build ``loss_fn(params, objective_state, batch, key=None) -> (loss, (objective_state, stats))``.

    The network is one ``apply(params, x)`` (one point ``(d,)`` -> ``(L,)``), or for an SVD a
    pair ``(apply_f, apply_g)`` whose ``params`` is the pair ``(params_f, params_g)`` (the two
    inputs may differ in dimension). The operator is a per-point ``operator(fn, x) -> (f(x),
    (T f)(x))`` (vmapped over the batch ``(B, d)``) or a
    :class:`~nestedlora_jax.operators.BatchOperator` (e.g. the canonical dependence kernel on a
    batch of pairs ``(xs, ys)``); either way it gives an
    :class:`~nestedlora_jax.objectives.OperatorOutput` and the loss is ``objective.loss`` of it
    (default :func:`nested_lora_objective`, sequential nesting), whose gradient never
    differentiates ``Tg`` or ``T* f``.

    ``stats`` holds per-function batch estimates: ``norms`` = ``mean_b f_bi^2`` (the NestedLoRA
    eigenvalue estimate; ``sqrt(mean f_i^2 mean g_i^2)``, the singular value estimate, for two
    families), ``rayleigh`` = Rayleigh quotients of the objective's eigenfunction estimates
    (``<f_i, T g_i> / (|f_i| |g_i|)`` for two families), ``residual_rayleigh`` = under
    NestedLoRA the Rayleigh quotients of the residual ``T - sum_{j<i} f_j g_j^T`` each function
    is left (see :class:`~nestedlora_jax.hooks.CollapseConfig`; the plain ones for other
    objectives); and ``invalid_points``, the number of
    points whose values are non-finite or larger than ``max_abs_value`` in magnitude (see
    :func:`~nestedlora_jax.operators.valid_points`; :func:`make_train_step` skips such a batch).

    ``moment_batch`` (optional): points drawn independently of ``batch`` (pairs for two
    networks) where the networks are only evaluated, without gradient, giving the
    ``f_moment``/``g_moment`` of :class:`~nestedlora_jax.objectives.OperatorOutput`: an objective
    that takes them (:attr:`~nestedlora_jax.objectives.Objective.takes_moment_samples`)
    estimates its second moments there.
    """
    objective = objective if objective is not None else nested_lora_objective()
    batch_operator = pointwise_operator(operator)
    two_networks = isinstance(apply, tuple)
    if two_networks and (len(apply) != 2 or not all(callable(a) for a in apply)):
        raise ValueError("apply must be one function apply(params, x) or a pair (apply_f, apply_g).")
    if batch_operator.two_sided != two_networks:
        raise ValueError(
            f"the operator {batch_operator.name!r} is "
            f"{'two-sided (an SVD: it needs a pair of networks apply=(apply_f, apply_g))' if batch_operator.two_sided else 'one-sided (self-adjoint: it needs one network apply(params, x))'}, "
            f"but {'two networks were' if two_networks else 'one network was'} given."
        )

    if objective.parameter_term is not None and (two_networks or isinstance(operator, BatchOperator)):
        raise ValueError(
            f"the {objective.name!r} objective updates through the network's parameter-space "
            "Jacobian, which needs one network and a per-point operator op(fn, x) -> (f, Tf) "
            f"(got {'two networks' if two_networks else 'the batch operator ' + repr(batch_operator.name)})."
        )

    def loss_fn(params, objective_state, batch, key=None, moment_batch=None):
        functions = network_functions(apply, params)
        out = batch_operator.apply(functions, batch, key)
        if moment_batch is not None:
            out = out._replace(**moment_values(functions, moment_batch))
        loss, objective_state = objective.loss(out, objective_state)
        if objective.parameter_term is not None:
            term, objective_state = objective.parameter_term(apply, params, batch, out, objective_state)
            loss = loss + term
        out = jax.lax.stop_gradient(out)
        stats = _output_statistics(out, objective, objective_state, max_abs_value)
        return loss, (jax.lax.stop_gradient(objective_state), stats)

    return loss_fn


def network_functions(apply, params):
    """The per-point functions of one network (``x -> apply(params, x)``) or of a pair
    ``(apply_f, apply_g)`` with ``params = (params_f, params_g)``: the ``functions`` a
    :class:`~nestedlora_jax.operators.BatchOperator` takes."""
    if isinstance(apply, tuple):
        (apply_f, apply_g), (params_f, params_g) = apply, params
        return (lambda x: apply_f(params_f, x)), (lambda y: apply_g(params_g, y))
    return lambda x: apply(params, x)


def moment_values(functions, moment_batch) -> dict:
    """``{"f_moment": (B_m, L), "g_moment": ...}``: the networks' values at moment samples
    (``g_moment`` only for a pair of networks, whose moment batch is a pair ``(xs, ys)``),
    without gradient."""
    if isinstance(functions, tuple):
        (f_fn, g_fn), (xs, ys) = functions, moment_batch
        return {"f_moment": jax.lax.stop_gradient(jax.vmap(f_fn)(xs)),
                "g_moment": jax.lax.stop_gradient(jax.vmap(g_fn)(ys))}
    return {"f_moment": jax.lax.stop_gradient(jax.vmap(functions)(moment_batch))}


def _invalid_moment_points(out: OperatorOutput, max_abs_value):
    count = 0
    for values in (out.f_moment, out.g_moment):
        if values is not None:
            count = count + jnp.sum(~valid_points(values, values, max_abs_value))
    return count


def _output_statistics(out: OperatorOutput, objective: Objective, objective_state, max_abs_value):
    stats = _batch_statistics(out, objective, objective_state, max_abs_value)
    stats["invalid_points"] = stats["invalid_points"] + _invalid_moment_points(out, max_abs_value)
    return stats


def _batch_statistics(out: OperatorOutput, objective: Objective, objective_state, max_abs_value):
    if out.is_self_adjoint:
        phi = objective.readout(out.f, objective_state)
        Tphi = objective.readout(out.Tg, objective_state)
        phi_sq = jnp.mean(phi * phi, axis=0)
        rayleigh = _ratio_or_zero(jnp.mean(phi * Tphi, axis=0), phi_sq)
        norms = jnp.mean(out.f * out.f, axis=0)
        residual = rayleigh
        if objective.norms_are_eigenvalues:
            cross = jnp.mean(out.f * out.Tg, axis=0)
            residual = _residual_quotients(cross, norms, _earlier_overlaps(out.f, moments=out.f_moment))
        return {"norms": norms, "rayleigh": rayleigh, "residual_rayleigh": residual,
                "invalid_points": jnp.sum(~valid_points(out.f, out.Tg, max_abs_value))}
    # Two families: at the optimum f_i = sqrt(s_i) phi_i and g_i = sqrt(s_i) psi_i.
    norms = jnp.sqrt(jnp.mean(out.f * out.f, axis=0) * jnp.mean(out.g * out.g, axis=0))
    cross = 0.5 * (jnp.mean(out.f * out.Tg, axis=0) + jnp.mean(out.Tadj_f * out.g, axis=0))
    rayleigh = _ratio_or_zero(cross, norms)
    residual = rayleigh
    if objective.norms_are_eigenvalues:
        moments = None if out.f_moment is None else (out.f_moment, out.g_moment)
        residual = _residual_quotients(cross, norms, _earlier_overlaps(out.f, out.g, moments))
    invalid = (jnp.sum(~valid_points(out.f, out.Tg, max_abs_value))
               + jnp.sum(~valid_points(out.g, out.Tadj_f, max_abs_value)))
    return {"norms": norms, "rayleigh": rayleigh, "residual_rayleigh": residual,
            "invalid_points": invalid}


def _earlier_overlaps(left, right=None, moments=None):
    """``(L,)``: ``sum_{j<i} <f_i, f_j> <g_i, g_j>`` (``right=None``: ``g = f``, one family),
    each product of two expectations estimated without bias from two independent samples.
    Without moment samples those are the two halves of the batch (``(B, L)`` each), as the
    objectives split them. With ``moments`` (``f_moment``, or ``(f_moment, g_moment)`` for two
    families) one factor comes from the batch and the other from the moment samples: moment
    samples on one lattice are one draw, whose halves are not independent (their product's
    mean is not the product of the means; see :func:`~nestedlora_jax.lattice.lattice_sample`),
    while the batch and the moment samples are drawn independently of each other."""
    if moments is None:
        fa, fb = map(_second_moment, _halves(left))
        ga, gb = (fa, fb) if right is None else map(_second_moment, _halves(right))
    else:
        left_m, right_m = (moments, None) if right is None else moments
        fa, fb = _second_moment(left), _second_moment(left_m)
        ga, gb = (fa, fb) if right is None else (_second_moment(right), _second_moment(right_m))
    products = 0.5 * (fa * gb + fb * ga)
    return jnp.sum(jnp.tril(products, k=-1), axis=1)


def _residual_quotients(cross, norms, overlaps):
    """``(<f_i, T g_i> - sum_{j<i} <f_i, f_j><g_i, g_j>) / (|f_i| |g_i|)``: the Rayleigh
    quotient of function i for the residual ``T - sum_{j<i} f_j g_j^T`` left to it by the
    earlier functions (``g = f``, ``T g = T f`` for one family)."""
    return _ratio_or_zero(cross - overlaps, norms)


def _ratio_or_zero(numerator, denominator):
    """``numerator / denominator`` where the denominator is positive, else 0 (a function that
    is exactly zero has no quotient; 0, not NaN, lets the collapse test see it)."""
    positive = denominator > 0
    return jnp.where(positive, numerator / jnp.where(positive, denominator, 1), 0)


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
    residual_rayleigh: jax.Array  # (L,) running mean of the residual Rayleigh quotients
    loss: jax.Array  # () last finite loss
    bad_steps: jax.Array  # () total skipped steps
    consecutive_bad: jax.Array  # () current run of skipped steps
    collapse_flags: jax.Array  # (L,) int32 consecutive collapse checks that flagged each function

    # Fields added after checkpoints were written, and how a checkpoint without them fills
    # them (see CheckpointManager.restore_latest): the residual quotients start as the plain
    # ones, which the running mean replaces within a few hundred steps.
    ADDED_FIELDS = {"residual_rayleigh": lambda older: older["rayleigh"]}


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
    moment_batch_size: int | None = None,
    moment_sample: Callable[[jax.Array, int], jax.Array] | None = None,
):
    """A pure training step ``step(state, key) -> state``.

    Draws ``xs = sample(key, batch_size)``, computes the masked gradient, and applies the
    Optax update only if it is sound: every point's values valid (finite and not absurdly
    large, ``stats["invalid_points"] == 0``), the loss, the gradients, the update and the new
    parameters finite (a NaN learning rate gives finite gradients but NaN parameters).
    Otherwise the step is skipped and counted (parameters, optimizer state and EMA untouched):
    one point at a singularity costs one step, not the run. The EMA of the
    parameters uses the warm-up ``min(ema_decay, (1 + t) / (10 + t))`` so short runs are
    not dominated by the initialisation. With ``batch_sharding`` (e.g.
    :func:`nestedlora_jax.parallel.batch_sharding`) the batch is laid out across devices
    right where it is drawn, and XLA partitions the rest of the step to match. With
    ``moment_batch_size`` it also draws that many moment samples per step (from
    ``fold_in(key, 2)``, so the batch itself is the one drawn without them) and passes them
    to ``loss_fn`` as ``moment_batch``; ``moment_sample(key, n)`` draws them in place of
    ``sample`` (e.g. ``functools.partial(lattice_sample, sampler)``).
    """
    draw_moments = sample if moment_sample is None else moment_sample

    def step(state: TrainState, key) -> TrainState:
        sample_key, operator_key = jax.random.split(key)
        xs = sample(sample_key, batch_size)
        moments = None
        if moment_batch_size is not None:
            moments = draw_moments(jax.random.fold_in(key, 2), moment_batch_size)
        if batch_sharding is not None:
            xs = jax.lax.with_sharding_constraint(xs, batch_sharding)
            if moments is not None:
                moments = jax.lax.with_sharding_constraint(moments, batch_sharding)
        (loss, (objective_state, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.objective_state, xs, operator_key, moments
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ok = (jnp.isfinite(loss) & _tree_all_finite(grads) & _tree_all_finite(objective_state)
              & _tree_all_finite(params) & _tree_all_finite(opt_state))
        if "invalid_points" in stats:
            ok = ok & (stats["invalid_points"] == 0)
        t = state.step.astype(jnp.float32)
        decay = jnp.minimum(ema_decay, (1.0 + t) / (10.0 + t))
        ema = jax.tree_util.tree_map(
            lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), state.ema_params, params
        )
        sd = jnp.where(state.step == 0, 0.0, stats_decay)
        norms = sd * state.norms + (1.0 - sd) * stats["norms"]
        rayleigh = sd * state.rayleigh + (1.0 - sd) * stats["rayleigh"]
        # A loss_fn of the user's own may not report residual quotients.
        residual = (sd * state.residual_rayleigh
                    + (1.0 - sd) * stats.get("residual_rayleigh", stats["rayleigh"]))
        new = state._replace(
            params=params,
            ema_params=ema,
            opt_state=opt_state,
            objective_state=objective_state,
            norms=norms.astype(state.norms.dtype),
            rayleigh=rayleigh.astype(state.rayleigh.dtype),
            residual_rayleigh=residual.astype(state.residual_rayleigh.dtype),
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
        objective_state=objective.init_state(L, dtype, params),
        norms=jnp.zeros((L,), dtype),
        rayleigh=jnp.zeros((L,), dtype),
        residual_rayleigh=jnp.zeros((L,), dtype),
        loss=jnp.zeros((), dtype),
        bad_steps=jnp.zeros((), jnp.int32),
        consecutive_bad=jnp.zeros((), jnp.int32),
        collapse_flags=jnp.zeros((L,), jnp.int32),
    )


def train_steps(step: Callable[[TrainState, jax.Array], TrainState], state: TrainState,
                key: jax.Array, num_steps: int, *,
                max_consecutive_bad: int | None = None) -> TrainState:
    """Run ``num_steps`` (a Python int) of ``step`` in one ``lax.scan``; pure.

    Step ``t`` uses the key ``fold_in(key, t)`` (``t`` counted from ``state.step``), the keys
    :func:`fit` uses with ``key = PRNGKey(seed)``: so the same run can be split into chunks,
    resumed, or batched over seeds with ``jax.vmap(lambda s, k: train_steps(step, s, k, n))``
    and give the same numbers. With ``max_consecutive_bad``, once that many consecutive steps
    were skipped the remaining steps of the scan leave the state as it is (``state.step``
    stops there), so a diverged run stops where it diverged, not at the end of the chunk.
    """
    keys = jax.vmap(lambda t: jax.random.fold_in(key, t))(state.step + jnp.arange(num_steps))
    if max_consecutive_bad is None:
        body = step
    else:
        def body(s, k):
            return jax.lax.cond(s.consecutive_bad >= max_consecutive_bad, lambda s, k: s, step, s, k)
    state, _ = jax.lax.scan(lambda s, k: (body(s, k), None), state, keys)
    return state


def default_optimizer(steps: int, learning_rate: float = 1e-3, final_fraction: float = 1e-2):
    """Adam with cosine decay from ``learning_rate`` to ``final_fraction * learning_rate``.

    Adam with a cosine decay worked well on the oscillator and hydrogen, and the method's
    follow-up paper also found Adam better than RMSprop.
    """
    schedule = optax.cosine_decay_schedule(learning_rate, max(int(steps), 1), alpha=final_fraction)
    return optax.adam(schedule)


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
    def from_state(cls, state: TrainState, history: list, *,
                   steps_run: int = 0, train_time: float = 0.0) -> "FitResult":
        """The result for a training state and its history (at the end of ``fit``, or
        restored from disk); ``reinitialized`` is read from the history."""
        return cls(
            params=state.params,
            ema_params=state.ema_params,
            eigenvalues=np.asarray(state.norms),
            rayleigh=np.asarray(state.rayleigh),
            history=history,
            bad_steps=int(state.bad_steps),
            reinitialized=reinitializations(history),
            state=state,
            steps_run=steps_run,
            train_time=train_time,
        )


def _validate_fit_args(apply, params, sampler, batch_size, needs_even_batch):
    if needs_even_batch:
        check_even_batch(batch_size, "TrainingConfig.batch_size")
    try:  # the sampler contract: dim and sample(key, n)
        dim, sample = sampler.dim, sampler.sample
    except AttributeError:
        dim = sample = None
    if dim is None or not callable(sample):
        raise ValueError(
            f"sampler must have a `dim` attribute and sample(key, n), got {type(sampler).__name__} "
            "(e.g. a samplers.GaussianSampler, or dependence.PairedData for paired data).")
    if not isinstance(apply, tuple):
        return network_output_count(apply, params, dim)
    if not (isinstance(params, tuple) and len(params) == 2):
        raise ValueError("two networks apply=(apply_f, apply_g) need params=(params_f, params_g).")
    if not (isinstance(dim, tuple) and len(dim) == 2):
        raise ValueError(
            f"two networks learn from pairs: the sampler must draw pairs (xs, ys) and have "
            f"dim = (dx, dy), got dim = {dim!r} (e.g. dependence.PairedData(x, y)).")
    L_f = network_output_count(apply[0], params[0], dim[0], name="apply_f(params_f, x)",
                               data="x")
    L_g = network_output_count(apply[1], params[1], dim[1], name="apply_g(params_g, y)",
                               data="y")
    if L_f != L_g:
        raise ValueError(f"the two networks must learn the same number of functions: f has "
                         f"{L_f} outputs and g has {L_g}.")
    return L_f


def network_output_count(apply: Apply, params: PyTree, dim: int, *,
                         name: str = "apply(params, x)", data: str = "the problem's") -> int:
    """L, the number of outputs of ``apply(params, x)`` on one point ``(dim,)``, found by an
    abstract trace (nothing is compiled); ValueError saying what to check when the network
    does not map one point to ``(L,)``, ``L >= 1``."""
    if not callable(apply):
        raise ValueError(f"apply must be a function apply(params, x), got {type(apply).__name__}.")
    try:
        out = jax.eval_shape(apply, params, jax.ShapeDtypeStruct((dim,), jnp.float32))
    except Exception as exc:  # noqa: BLE001 - re-raised with what to check
        raise ValueError(
            f"{name} fails on one point of shape ({dim},), the sampler's dimension: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0].rstrip('.') if str(exc) else ''}. Was the network "
            f"built for another input dimension than {data} d = {dim}?"
        ) from exc
    if len(out.shape) != 1:
        raise ValueError(
            f"{name} must map one point of shape ({dim},) to (L,), got output "
            f"shape {out.shape}."
        )
    L = out.shape[0]
    if L < 1:
        raise ValueError("the network has no outputs (L = 0).")
    return L


def residual_quotient_estimate(loss_fn, sample, num_samples: int):
    """``(params, objective_state, key) -> (L,)``: the residual Rayleigh quotients of
    :func:`make_loss_fn`'s statistics on ``sample(key, num_samples)``, compiled (what the
    collapse remedy ranks fresh draws by, :class:`~nestedlora_jax.hooks.CollapseConfig`)."""

    @jax.jit
    def estimate(params, objective_state, key):
        _, (_, stats) = loss_fn(params, objective_state, sample(key, num_samples), key)
        return stats["residual_rayleigh"]

    return estimate


# Points each of the Rayleigh-Ritz readout's two samples has. The width + 1 features fit a small
# sample's noise: on 36-state hydrogen (33 features, the last n = 5 slot, 16 fresh draws, before
# the ridge and the second sample) 2048 points gave quotients mu of 0.010-0.032 around lambda_5 =
# 0.020 and a median share of 0.031 in the missing n = 5 direction on an independent sample;
# 16 384 points 0.012-0.019 (one draw 0.057, a heavy point) and 0.055
# (benchmarks/results/hydrogen36_readout.py). Both samples together take about 1.5 s there,
# alone on the 2-core CPU.
RAYLEIGH_RITZ_SAMPLES = 16384
# The Rayleigh-Ritz readout maximises w A w / w (B + ridge * |B| I) w (|B| the largest eigenvalue
# of the features' Gram matrix B). Without the ridge, on 36-state hydrogen (6 fresh draws for the
# last n = 5 slot) the chosen readouts were 9x the size of a drawn one (|w| 8.7) and one step of
# 3e-3 noise on the hidden layers changed the function's norm 1.9x (up to 6.4x): in training the
# norm went from 0.014 to 0.34 within 500 steps. With 1e-4: |w| 0.6, the same noise moves the
# norm by at most 9%, the quotient 0.005 (0.014 without; lambda_5 = 0.020), the share in the
# missing n = 5 direction 0.08 (0.002 for a drawn readout). 1e-5: |w| 2.5, noise 1.2-1.4x.
RAYLEIGH_RITZ_RIDGE = 1e-4


def rayleigh_ritz_readout(apply: Apply, operator, sample, num_samples: int, readout: tuple[str, str]):
    """``(params, key, i) -> (params, mu)``: function ``i`` with the readout (its row of the
    last layer, ``readout`` = the key paths of that layer's kernel and bias, see
    :func:`~nestedlora_jax.networks.readout_paths`) that maximises its Rayleigh quotient for
    the residual operator the earlier functions leave it, the rest of its network kept.

    Output ``i`` is linear in its readout ``w`` (``width + 1`` numbers with the bias):
    ``f_i = sum_k w_k h_k`` with features ``h_k = d f_i / d w_k``. On ``num_samples`` points
    drawn by ``sample``, with ``H`` the features, ``F`` the earlier functions ``f_j``, ``j < i``,
    and ``<u, v> = mean_b u_b v_b``, it solves the generalized eigenproblem::

        A w = mu (B + r |B| I) w,   A = sym(<H, T H>) - <H, F> <F, H>,   B = <H, H>

    (``T - sum_{j<i} f_j f_j^T`` in the features' span, NestedLoRA's residual as in
    :class:`~nestedlora_jax.hooks.CollapseConfig`; ``r = RAYLEIGH_RITZ_RIDGE`` keeps ``w`` from
    the near-cancellations of large features that training undoes at once, ``|B|`` the largest
    eigenvalue of ``B``) for its top eigenvector ``w``. The quotient
    ``mu = w A' w / w B' w`` is then estimated on a second, independent sample (``A'``, ``B'``;
    ``key`` is split for the two), and ``w`` is scaled so that ``||f_i||^2 = mu``, the norm a
    function with that quotient has at the NestedLoRA optimum. A fresh network's random readout
    starts the function mostly inside the earlier functions' span; this one starts it with the
    largest share of what they leave uncovered that its features can hold. Where ``mu <= 0``
    (no direction the residual favours, or one the first sample's noise made) the readout is
    left as it was. Jit-compiled; ``i`` may be traced."""
    kernel_path, bias_path = readout
    batch_operator = pointwise_operator(operator)

    def with_readout(params, i, w):
        def put(path, leaf):
            name = jax.tree_util.keystr(path)
            if name == kernel_path:
                return leaf.at[i, :, 0].set(w[:-1].astype(leaf.dtype))
            if name == bias_path:
                return leaf.at[i, 0].set(w[-1].astype(leaf.dtype))
            return leaf
        return jax.tree_util.tree_map_with_path(put, params)

    def current_readout(params, i):
        leaves = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
        return jnp.concatenate([leaves[kernel_path][i, :, 0], leaves[bias_path][i]])

    def moments(params, i, key):
        """``(B, A)`` of the docstring on ``sample(key, num_samples)``."""
        x = sample(key, num_samples)
        features = lambda xx: jax.jacfwd(lambda w: apply(with_readout(params, i, w), xx)[i])(
            jnp.zeros_like(current_readout(params, i)))
        out = batch_operator.apply(features, x, key)
        h, Th = out.f, out.Tg
        n = h.shape[0]
        F = jax.vmap(lambda xx: apply(params, xx))(x)
        earlier = (jnp.arange(F.shape[1]) < i).astype(h.dtype)
        overlap = (F * earlier).T @ h / n  # (L, width + 1), zero rows for j >= i
        HTh = h.T @ Th / n
        return h.T @ h / n, 0.5 * (HTh + HTh.T) - overlap.T @ overlap

    @jax.jit
    def choose(params, key, i):
        fit_key, check_key = jax.random.split(key)
        gram, A = moments(params, i, fit_key)
        evals, evecs = jnp.linalg.eigh(gram)
        # Ridge: the best quotients come from near-cancellations of large features, which the
        # next few steps of the hidden layers undo (see RAYLEIGH_RITZ_RIDGE).
        evals = evals + RAYLEIGH_RITZ_RIDGE * evals[-1]
        whiten = evecs / jnp.sqrt(evals)
        w = whiten @ jnp.linalg.eigh(whiten.T @ A @ whiten)[1][:, -1]
        # The top of a noisy eigenproblem is biased up, and one heavy point (the Coulomb
        # singularity) can put it on noise: on 36-state hydrogen one draw in 16 read mu = 0.057
        # on its own sample and -0.059 on another. A second sample decides and sets the norm.
        gram2, A2 = moments(params, i, check_key)
        norm2 = jnp.maximum(w @ gram2 @ w, 1e-30)
        mu = (w @ A2 @ w) / norm2
        w = jnp.where(mu > 0, w * jnp.sqrt(jnp.maximum(mu, 0.0) / norm2), current_readout(params, i))
        return with_readout(params, i, w), mu

    return choose


def fit(
    apply: Apply,
    params: PyTree,
    operator,
    sampler,
    *,
    config: TrainingConfig | None = None,
    objective: Objective | None = None,
    optimizer: optax.GradientTransformation | None = None,
    init_params: Callable[[jax.Array], PyTree] | None = None,
    spectral_map: Callable[[np.ndarray], np.ndarray] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    hooks: Sequence[Hook] = (),
    progress: bool = True,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
) -> FitResult:
    """Train ``apply(params, .)`` so its L outputs learn the top-L eigenfunctions of ``operator``
    (or, with two networks, the top-L singular functions).

    Args:
      apply: pure network ``apply(params, x)``, one point ``(d,)`` -> ``(L,)``; or a pair
        ``(apply_f, apply_g)`` of left and right networks for an SVD (inputs ``(dx,)`` and
        ``(dy,)``, both ``L`` outputs).
      params: initial parameters (pytree); ``(params_f, params_g)`` for two networks.
      operator: ``operator(fn, x) -> (fn(x), (T fn)(x))`` for one point, T self-adjoint
        in the inner product that batch means under ``sampler`` estimate; or a
        :class:`~nestedlora_jax.operators.BatchOperator` (two-sided for two networks, e.g.
        :func:`~nestedlora_jax.dependence.dependence_kernel_operator`).
      sampler: object with ``dim`` and ``sample(key, n)``: ``(n, d)`` points, or for two
        networks ``dim = (dx, dy)`` and pairs ``(xs, ys)`` (e.g.
        :class:`~nestedlora_jax.dependence.PairedData` of arrays in memory).
      config: a :class:`~nestedlora_jax.config.TrainingConfig` (steps, batch size, learning
        rate, EMA, seed, chunk length, checkpoint interval, guards, collapse remedy); default
        ``TrainingConfig()``.
      objective: an :class:`~nestedlora_jax.objectives.Objective`; default NestedLoRA with
        sequential nesting (:func:`~nestedlora_jax.objectives.nested_lora_objective`), or a
        baseline from :mod:`nestedlora_jax.baselines`.
      optimizer: any Optax ``GradientTransformation``; default
        :func:`default_optimizer` (Adam, cosine decay from ``config.learning_rate``, which must
        then stay ``None``).
      init_params: ``key -> params`` fresh per-function parameters (leading axis L on every
        leaf) for re-initialising collapsed functions; without it collapse is only reported.
      spectral_map: operator eigenvalues -> the units to report (e.g. energies); the history
        then also holds ``"energies"``.
      checkpoint_dir: Orbax checkpoints of the whole state (every
        ``config.checkpoint_every`` steps, at the end, on interrupt). A folder that already
        holds checkpoints needs ``resume=True``.
      resume: continue from the newest intact checkpoint in ``checkpoint_dir``: the same
        parameters as an uninterrupted run. The configuration that shapes the result
        (``config`` but ``checkpoint_every``, L, the objective, the optimiser kind) is saved
        with every checkpoint and a resume that changes it is refused.
      hooks: more :class:`~nestedlora_jax.hooks.Hook` objects (e.g. ``Callback(fn)``,
        ``HistoryFile(path)``), run after the ones ``fit`` makes (checkpoints, divergence
        guard, collapse remedy) and before the progress bar.
      progress: show a tqdm progress bar.
      mesh: train data-parallel on this device mesh (e.g.
        :func:`nestedlora_jax.parallel.data_parallel_mesh`): each batch is split over the
        mesh axis ``data_axis`` (``batch_size`` must be divisible by its size), parameters
        and optimiser state are replicated. Same seed and global batch -> the same samples
        and, to float round-off, the same result as on one device.
      data_axis: name of the mesh axis the batch is split over.

    The loop is :func:`~nestedlora_jax.hooks.run_loop` over compiled chunks of
    ``config.log_every`` steps. SIGINT (Ctrl-C) and SIGTERM stop it at the end of the running
    chunk (a second Ctrl-C stops at once), save a checkpoint of that step when
    ``checkpoint_dir`` is given, and raise :class:`~nestedlora_jax.hooks.TrainingInterrupted`.
    """
    config = TrainingConfig() if config is None else config
    if not isinstance(config, TrainingConfig):
        raise ValueError(f"config must be a TrainingConfig, got {type(config).__name__}.")
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("TrainingConfig.checkpoint_every needs a checkpoint_dir.")
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to resume.")
    if optimizer is not None and config.learning_rate is not None:
        raise ValueError(
            "TrainingConfig.learning_rate sets the default optimiser's rate; with an optimizer "
            "given it would be ignored: leave learning_rate None and set the rate in the optimizer."
        )
    if objective is not None and not isinstance(objective, Objective):
        raise ValueError(f"objective must be an Objective, got {type(objective).__name__}.")
    if spectral_map is not None and not callable(spectral_map):
        raise ValueError(f"spectral_map must be callable, got {type(spectral_map).__name__}.")
    hooks = list(hooks)
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise ValueError(f"hooks must be nestedlora_jax.hooks.Hook objects, got {hook!r}.")

    objective = objective if objective is not None else nested_lora_objective()
    if config.moment_batch_size is not None and not objective.takes_moment_samples:
        raise ValueError(
            f"TrainingConfig.moment_batch_size is set ({config.moment_batch_size}), but the "
            f"{objective.name!r} objective does not use moment samples (only NestedLoRA does): "
            "leave moment_batch_size None."
        )
    moment_sample = None
    if config.moment_sampling == "lattice":
        check_lattice_sampler(sampler)
        moment_sample = functools.partial(lattice_sample, sampler)
    batch_sample = sampler.sample
    if config.batch_sampling == "lattice":
        check_lattice_sampler(sampler)
        # Without moment samples a splitting objective pairs the batch's halves: they must be
        # independent, and the halves of one lattice are not.
        halves = objective.needs_even_batch and config.moment_batch_size is None
        batch_sample = functools.partial(lattice_sample, sampler, blocks=2 if halves else 1)
    collapse = config.collapse
    if not objective.norms_are_eigenvalues:
        # The collapse test compares ||f_i||^2 with the Rayleigh quotient, equal only at the
        # NestedLoRA optimum (see Objective.norms_are_eigenvalues).
        collapse = None
    # Configuration is checked first; only then is the network traced (abstractly) for L.
    L = _validate_fit_args(apply, params, sampler, config.batch_size, objective.needs_even_batch)

    place = lambda state: state
    sharding = None
    if mesh is not None:
        from nestedlora_jax import parallel

        parallel.check_batch_divisible(config.batch_size, mesh, data_axis)
        if config.moment_batch_size is not None:
            parallel.check_batch_divisible(config.moment_batch_size, mesh, data_axis)
        sharding = parallel.batch_sharding(mesh, data_axis)
        place = lambda state: parallel.replicate(state, mesh)

    if optimizer is None:
        optimizer, optimizer_kind = default_optimizer(config.steps, config.peak_learning_rate), "default"
    else:
        optimizer_kind = "custom"
    loss_fn = make_loss_fn(apply, operator, objective, max_abs_value=config.max_abs_value)
    step_fn = make_train_step(loss_fn, optimizer, batch_sample, config.batch_size,
                              ema_decay=config.ema_decay, batch_sharding=sharding,
                              moment_batch_size=config.moment_batch_size,
                              moment_sample=moment_sample)
    run_config = config.resume_key() | {
        "collapse": None if collapse is None else dataclasses.asdict(collapse),
        "num_functions": int(L), "objective": objective.name, "optimizer": optimizer_kind,
        "reinitialize_with": None if init_params is None else "init_params",
    }
    loop = Loop(state=place(init_train_state(params, optimizer, L, objective)),
                steps=int(config.steps), config=run_config, spectral_map=spectral_map, place=place)

    # At most three chunk lengths occur (log_every, the rest up to a multiple of it, the
    # last one), so a static length costs at most three compilations.
    base_key = jax.random.PRNGKey(config.seed)
    run_chunk = jax.jit(
        lambda state, num: train_steps(step_fn, state, base_key, num,
                                       max_consecutive_bad=config.max_consecutive_bad_steps),
        static_argnums=1,
    )
    all_hooks: list[Hook] = []
    if checkpoint_dir is not None:  # first: a resume replaces the state the others start from
        all_hooks.append(Checkpoints(checkpoint_dir, every=config.checkpoint_every, resume=resume))
    all_hooks.append(DivergenceGuard(config.max_consecutive_bad_steps, config.max_abs_value))
    if collapse is not None:
        choose_readout = None
        if collapse.readout == "rayleigh-ritz" and collapse.reinitialize and init_params is not None:
            if isinstance(apply, tuple) or pointwise_operator(operator).two_sided:
                raise ValueError(
                    "CollapseConfig(readout='rayleigh-ritz') solves an eigenproblem for one "
                    "family of functions; this is an SVD (two networks): use readout='drawn'.")
            # Here, not at the top: the core of the package does not import Flax.
            from nestedlora_jax.networks import readout_paths

            choose_readout = rayleigh_ritz_readout(apply, operator, sampler.sample,
                                                   RAYLEIGH_RITZ_SAMPLES, readout_paths(params, L))
        all_hooks.append(CollapseRemedy(
            collapse, optimizer, init_params=init_params, seed=config.seed + 1,
            residual_quotients=(residual_quotient_estimate(loss_fn, sampler.sample,
                                                           4 * config.batch_size)
                                if collapse.candidates > 1 else None),
            choose_readout=choose_readout))
    all_hooks.extend(hooks)
    if progress:
        all_hooks.append(ProgressBar())

    result = lambda: FitResult.from_state(loop.state, loop.history,
                                          steps_run=loop.step - loop.start_step,
                                          train_time=loop.elapsed)
    try:
        run_loop(loop, run_chunk, all_hooks, chunk_steps=config.log_every)
    except TrainingInterrupted as exc:
        exc.result = result()
        raise
    return result()
