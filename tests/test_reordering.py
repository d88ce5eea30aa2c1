"""Functions learned in the wrong order are put back in order (``CollapseConfig.reorder``).

What is proved:

- ``rayleigh_order`` sorts by Rayleigh quotient, largest first, and leaves alone what the
  standard errors cannot resolve (``rayleigh_statistics`` estimates them from the values
  logged since the last check) and the functions not yet formed (``formed_functions``);
- ``reorder_functions`` moves every per-function quantity with its function (parameters, EMA,
  the optimiser's moments, running statistics, collapse counters) and nothing else, and
  refuses objectives that keep state of their own;
- the mathematics it serves: on a finite symmetric matrix whose two top eigenvalues are close,
  sequential NestedLoRA started at the swapped pair (f_1 on the second eigenvector, f_2 on
  the first, a saddle of the nested objective) is still swapped after the run without the
  reordering, and recovers ``numpy.linalg.eigh`` to tight tolerance with it.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestedlora_jax import problems
from nestedlora_jax.config import TrainingConfig
from nestedlora_jax.hooks import (
    CollapseConfig,
    CollapseRemedy,
    formed_functions,
    rayleigh_order,
    rayleigh_statistics,
    reorder_functions,
    reorderings,
)
from nestedlora_jax.networks import eigenfunction_network, to_apply
from nestedlora_jax.objectives import nested_lora_objective
from nestedlora_jax.operators import problem_operator
from nestedlora_jax.training import default_optimizer, fit, init_train_state


def test_rayleigh_order_sorts_largest_first_where_the_standard_errors_resolve_it():
    np.testing.assert_array_equal(rayleigh_order([1.0, 0.8, 0.9, 0.5]), [0, 2, 1, 3])
    np.testing.assert_array_equal(rayleigh_order([0.1, 0.2, 0.3]), [2, 1, 0])
    # 0.8005 > 0.8 by 0.0005: resolved with standard errors 1e-5, a tie with 1e-3 (4 sigma).
    np.testing.assert_array_equal(rayleigh_order([1.0, 0.8, 0.8005, 0.5], np.full(4, 1e-5)), [0, 2, 1, 3])
    np.testing.assert_array_equal(rayleigh_order([1.0, 0.8, 0.8005, 0.5], np.full(4, 1e-3)), [0, 1, 2, 3])
    np.testing.assert_array_equal(rayleigh_order([0.5, 0.5, 0.5]), [0, 1, 2])  # exact ties stay
    np.testing.assert_array_equal(rayleigh_order([0.7]), [0])


def test_only_formed_functions_are_reordered():
    """A function still forming (norm far below its Rayleigh quotient, which the components
    held by earlier functions inflate) keeps its slot; the formed ones are sorted around it."""
    norms = np.array([1.0, 0.5, 0.004, 0.6])
    rayleigh = np.array([1.0, 0.5, 0.9, 0.6])
    formed = formed_functions(norms, rayleigh)
    np.testing.assert_array_equal(formed, [True, True, False, True])
    np.testing.assert_array_equal(formed_functions([0.3, 0.2, 0.1], [0.5, -0.1, 0.1]),
                                  [True, False, True])  # a quotient <= 0 is never formed
    np.testing.assert_array_equal(rayleigh_order(rayleigh), [0, 2, 3, 1])  # unrestricted
    np.testing.assert_array_equal(rayleigh_order(rayleigh, movable=formed), [0, 3, 2, 1])
    se = np.full(4, 1e-3)
    np.testing.assert_array_equal(
        rayleigh_order(rayleigh, se, confirm=(rayleigh, se), movable=formed), [0, 3, 2, 1])
    # An unconfirmed inversion stays, restricted or not.
    np.testing.assert_array_equal(
        rayleigh_order(rayleigh, se, confirm=(np.array([1.0, 0.7, 0.9, 0.6]), se), movable=formed),
        [0, 1, 2, 3])
    np.testing.assert_array_equal(rayleigh_order(rayleigh, movable=np.zeros(4, bool)), [0, 1, 2, 3])


def test_rayleigh_statistics_use_the_values_logged_since_the_last_check():
    history = [{"step": s, "rayleigh": [1.0 + 0.01 * k, 0.5]} for k, s in enumerate([100, 200, 300, 400])]
    mean, se, n = rayleigh_statistics(history, 200, [1.05, 0.5])  # steps 300, 400 and now
    assert n == 3
    np.testing.assert_allclose(mean, [np.mean([1.02, 1.03, 1.05]), 0.5])
    np.testing.assert_allclose(se, [np.std([1.02, 1.03, 1.05], ddof=1) / np.sqrt(3), 0.0])


def test_reorder_moves_every_per_function_quantity_with_its_function():
    L = 3
    net = eigenfunction_network(2, L, architecture="parallel", hidden=(8,), rngs=nnx.Rngs(params=0))
    apply, params = to_apply(net)
    opt = default_optimizer(10, 1e-2)
    operator = problem_operator(problems.HarmonicOscillator(dim=2), L)
    res = fit(apply, params, operator.op, operator.sampler,
              config=TrainingConfig(steps=10, batch_size=32, log_every=10, collapse=None),
              optimizer=opt, progress=False)
    state = res.state._replace(collapse_flags=jnp.asarray([0, 1, 2], jnp.int32))
    order = np.array([2, 0, 1])
    new = reorder_functions(state, opt, order)
    x = jnp.asarray([[0.3, -0.2], [1.0, 0.5]])
    before = jax.vmap(lambda p: apply(state.params, p))(x)
    after = jax.vmap(lambda p: apply(new.params, p))(x)
    np.testing.assert_array_equal(np.asarray(after), np.asarray(before)[:, order])
    ema_before = jax.vmap(lambda p: apply(state.ema_params, p))(x)
    ema_after = jax.vmap(lambda p: apply(new.ema_params, p))(x)
    np.testing.assert_array_equal(np.asarray(ema_after), np.asarray(ema_before)[:, order])
    for name in ("norms", "rayleigh", "collapse_flags"):
        np.testing.assert_array_equal(np.asarray(getattr(new, name)),
                                      np.asarray(getattr(state, name))[order])
    moved = 0
    for a, b in zip(jax.tree.leaves(new.opt_state), jax.tree.leaves(state.opt_state)):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim >= 1 and a.shape[0] == L:  # Adam's moments
            np.testing.assert_array_equal(a, b[order])
            moved += 1
        else:  # step counts
            np.testing.assert_array_equal(a, b)
    assert moved == 2 * len(jax.tree.leaves(params))
    assert int(new.step) == int(state.step) and float(new.loss) == float(state.loss)
    with pytest.raises(ValueError, match="keeps state of its own"):
        reorder_functions(state._replace(objective_state=(jnp.zeros(3),)), opt, order)


# ------------------------------------------------------------- the swapped saddle, on a matrix

N = 6
EIGENVALUES = np.array([1.0, 0.99, 0.6, 0.5, 0.3, 0.2])  # the top two 1% apart


def _matrix(eigenvalues=EIGENVALUES):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (q * eigenvalues) @ q.T, q


@dataclasses.dataclass(frozen=True)
class _AllIndices:
    """Every index 0..N-1, repeated to the batch size (twice: each batch half the objective
    may use holds all of them): a deterministic 'sampler' under which
    batch means are exactly (1/N) sums, so that with SGD the run is plain gradient descent
    (Adam would rescale the near-zero gradient at the saddle to full-size steps)."""

    dim: int = 1

    def sample(self, key, n):
        return jnp.tile(jnp.arange(N, dtype=jnp.float32), n // N)[:, None]

    def log_prob(self, x):
        return jnp.zeros(())


def _table_apply(params, x):
    return params["table"][:, x[0].astype(jnp.int32)]  # (L,)


def _matrix_operator(A):
    a = jnp.asarray(A, jnp.float32)
    idx = jnp.arange(N, dtype=jnp.float32)[:, None]

    def op(fn, x):
        values = jax.vmap(fn)(idx)  # (N, L): the function at every index
        return fn(x), a[x[0].astype(jnp.int32)] @ values

    return op


def _swapped_run(reorder: bool):
    A, q = _matrix()
    L = 2
    # <f, g> = mean over indices, so the optimum is f_i = sqrt(N t_i) q_i. Start swapped.
    table = np.stack([np.sqrt(N * EIGENVALUES[1]) * q[:, 1], np.sqrt(N * EIGENVALUES[0]) * q[:, 0]])
    table += 1e-6 * np.random.default_rng(1).standard_normal(table.shape)
    params = {"table": jnp.asarray(table, jnp.float32)}
    config = TrainingConfig(steps=3000, batch_size=2 * N, log_every=100,
                            ema_decay=0.0,
                            collapse=CollapseConfig(check_every=500, start_fraction=0.1,
                                                    reorder=reorder))
    init_params = lambda key: {"table": jax.random.normal(key, (L, N)) * 0.1}
    result = fit(_table_apply, params, _matrix_operator(A), _AllIndices(), config=config,
                 objective=nested_lora_objective("sequential"), init_params=init_params,
                 optimizer=optax.sgd(0.05), progress=False)
    F = np.asarray(result.state.params["table"], np.float64) / np.sqrt(N)
    return F, q, result


def test_a_swapped_pair_is_stuck_without_reordering_and_recovers_eigh_with_it():
    F, q, result = _swapped_run(reorder=False)
    overlap = np.abs(F @ q[:, :2]) / np.linalg.norm(F, axis=1)[:, None]
    assert overlap[0, 1] > 0.99 and overlap[1, 0] > 0.99  # still swapped: f_1 ~ q_2, f_2 ~ q_1
    assert reorderings(result.history) == []

    F, q, result = _swapped_run(reorder=True)
    assert reorderings(result.history)[0][1] == [1, 0]
    t = np.sum(F * F, axis=1)  # ||f_i||^2 = t_i at the optimum
    np.testing.assert_allclose(t, EIGENVALUES[:2], rtol=1e-4)
    for i in range(2):
        assert abs(abs(F[i] @ q[:, i]) / np.linalg.norm(F[i]) - 1) < 1e-6


# The second level sits 1% above the third: a function started on the third is at a saddle it
# leaves only slowly, and the window of two misses the second level.
MISSED = np.array([1.0, 0.6, 0.594, 0.3, 0.2, 0.1])


def _missed_level_run(guard_functions: int):
    A, q = _matrix(MISSED)
    rows = [np.sqrt(N * MISSED[0]) * q[:, 0], np.sqrt(N * MISSED[2]) * q[:, 2]]
    rng = np.random.default_rng(2)
    rows += [0.3 * rng.standard_normal(N) for _ in range(guard_functions)]
    table = np.stack(rows) + 1e-6 * rng.standard_normal((len(rows), N))
    L = len(rows)
    config = TrainingConfig(steps=3000, batch_size=2 * N, log_every=100, ema_decay=0.0,
                            collapse=CollapseConfig(check_every=500, start_fraction=0.1))
    init_params = lambda key: {"table": jax.random.normal(key, (L, N)) * 0.1}
    result = fit(_table_apply, {"table": jnp.asarray(table, jnp.float32)}, _matrix_operator(A),
                 _AllIndices(), config=config, objective=nested_lora_objective("sequential"),
                 init_params=init_params, optimizer=optax.sgd(0.05), progress=False)
    F = np.asarray(result.state.params["table"], np.float64)[:2] / np.sqrt(N)
    return F, q, result


def test_a_guard_function_takes_the_level_the_window_missed_and_is_moved_into_it():
    # Without a guard function the second function stays on the third level.
    F, q, result = _missed_level_run(0)
    assert abs(F[1] @ q[:, 2]) / np.linalg.norm(F[1]) > 0.99
    # A third function is drawn to the highest level the first two leave free (the second),
    # the reordering puts it second, and the first two recover eigh.
    F, q, result = _missed_level_run(1)
    assert [1, 2] == sorted(reorderings(result.history)[0][1][1:])
    np.testing.assert_allclose(np.sum(F * F, axis=1), MISSED[:2], rtol=1e-4)
    for i in range(2):
        assert abs(abs(F[i] @ q[:, i]) / np.linalg.norm(F[i]) - 1) < 1e-6


class _Loop:
    def __init__(self, history, step):
        self.history, self.step = history, step


class _State:
    def __init__(self, rayleigh, norms=None):
        self.rayleigh = np.asarray(rayleigh)
        self.norms = self.rayleigh if norms is None else np.asarray(norms)  # formed by default


def _interval(start, values, jitter=1e-4, seed=0):
    """History entries at start+100 .. start+400, scattered by ``jitter``."""
    rng = np.random.default_rng(seed)
    return [{"step": start + 100 * (k + 1),
             "rayleigh": (np.asarray(values) + jitter * rng.standard_normal(len(values))).tolist()}
            for k in range(4)]


def test_a_reordering_needs_the_inversion_in_two_consecutive_check_intervals():
    hook = CollapseRemedy(CollapseConfig(check_every=400), None)
    swapped, ordered = [0.9, 1.0, 0.5], [1.0, 0.9, 0.5]
    # Inverted in both intervals: swapped.
    history = _interval(0, swapped) + _interval(400, swapped, seed=1)
    order = hook._resolved_order(_Loop(history[:-1], 800), _State(history[-1]["rayleigh"]))
    np.testing.assert_array_equal(order, [1, 0, 2])
    # A fluctuation in one interval only: left alone.
    history = _interval(0, ordered) + _interval(400, swapped, seed=1)
    order = hook._resolved_order(_Loop(history[:-1], 800), _State(history[-1]["rayleigh"]))
    np.testing.assert_array_equal(order, [0, 1, 2])
    # A reordering at the previous check relabels the earlier interval: functions 0 and 1 were
    # swapped there, so values in order under the old labels are inverted under today's, and
    # confirm today's inversion.
    history = _interval(0, ordered) + _interval(400, swapped, seed=1)
    history[3]["reordered"] = [1, 0, 2]
    order = hook._resolved_order(_Loop(history[:-1], 800), _State(history[-1]["rayleigh"]))
    np.testing.assert_array_equal(order, [1, 0, 2])
    # Inverted in both intervals, but the second function is still forming: left alone.
    history = _interval(0, swapped) + _interval(400, swapped, seed=1)
    order = hook._resolved_order(_Loop(history[:-1], 800),
                                 _State(history[-1]["rayleigh"], norms=[0.9, 0.05, 0.5]))
    np.testing.assert_array_equal(order, [0, 1, 2])
    # At the first check there is no earlier interval: nothing is reordered yet.
    history = _interval(0, swapped)
    order = hook._resolved_order(_Loop(history[:-1], 400), _State(history[-1]["rayleigh"]))
    np.testing.assert_array_equal(order, [0, 1, 2])


def test_a_version_three_configuration_reorders_every_function_as_it_trained():
    from nestedlora_jax.config import CONFIG_VERSION, SolveConfig

    data = SolveConfig().to_dict()
    assert data["version"] == CONFIG_VERSION and data["training"]["collapse"]["formed_ratio"] == 0.5
    collapse = {k: v for k, v in data["training"]["collapse"].items() if k != "formed_ratio"}
    old = {**data, "version": 3, "training": {**data["training"], "collapse": collapse}}
    assert SolveConfig.from_dict(old).training.collapse.formed_ratio == 0.0
    assert SolveConfig.from_dict(data).training.collapse.formed_ratio == 0.5
    # With 0 every function takes part, as before version 4.
    hook = CollapseRemedy(CollapseConfig(check_every=400, formed_ratio=0.0), None)
    history = _interval(0, [0.9, 1.0, 0.5]) + _interval(400, [0.9, 1.0, 0.5], seed=1)
    order = hook._resolved_order(_Loop(history[:-1], 800),
                                 _State(history[-1]["rayleigh"], norms=[0.9, 0.05, 0.5]))
    np.testing.assert_array_equal(order, [1, 0, 2])
    for bad in (-0.1, 1.0, "0.5", None):
        with pytest.raises(ValueError, match="CollapseConfig.formed_ratio must be a number in"):
            CollapseConfig(formed_ratio=bad)
