"""Guard functions: train ``L + g`` functions, report the first ``L`` (``SolveConfig.guard_functions``).

What is proved here: the plumbing. The network, the training state and the operator's
scaling have ``L + g`` functions; the metrics, the table and the periodic evaluation have
``L``, and they are exactly the metrics of the first ``L`` functions evaluated on their own;
``restore`` rebuilds the run from its folder; bad input is refused. The mathematics the guard
functions serve (a guard function takes the level the first ``L`` missed, and the reordering
moves it into the window, recovering ``eigh`` on a matrix) is proved in
``test_reordering.py``.
"""

import jax
import numpy as np
import pytest
from flax import nnx

import nestedlora_jax as nl
from nestedlora_jax.config import (
    CONFIG_VERSION,
    CollapseConfig,
    EvaluationConfig,
    NetworkConfig,
    SolveConfig,
    TrainingConfig,
)
from nestedlora_jax.evaluation import evaluate
from nestedlora_jax.solver import restore, solve

CONFIG = SolveConfig(
    network=NetworkConfig(hidden=(8,)),
    training=TrainingConfig(steps=200, batch_size=64, log_every=50, seed=3),
    evaluation=EvaluationConfig(mode="mc", num_samples=4096, every=100, num_periodic_samples=1024),
    guard_functions=2,
)


def test_guard_functions_are_trained_but_not_reported(tmp_path):
    problem, L = nl.HarmonicOscillator(dim=2), 3
    run = tmp_path / "run"
    result = solve(problem, L, config=CONFIG, run_dir=run, progress=False)
    x = np.zeros(2, np.float32)
    assert result.apply(result.fit.ema_params, x).shape == (L + 2,)
    assert np.shape(result.fit.state.norms) == (L + 2,)
    m = result.metrics
    assert np.shape(m.rayleigh) == (L,) and np.shape(m.rel_error) == (L,)
    assert f"L = {L}," in result.table
    # The reported metrics are those of the first L functions evaluated on their own.
    first = lambda p, y: result.apply(p, y)[:L]
    alone = evaluate(first, result.fit.ema_params, problem, result.operator, num_samples=4096,
                     key=jax.random.PRNGKey(12345))
    np.testing.assert_array_equal(m.rayleigh, alone.rayleigh)
    assert m.mean_rel_error == alone.mean_rel_error
    # The operator is scaled for the L + 2 trained states.
    assert result.operator.shift == nl.problem_operator(problem, L + 2).shift
    assert result.operator.shift != nl.problem_operator(problem, L).shift
    # The periodic evaluation reports L states too (its table would fail on L + 2).
    assert [h["step"] for h in result.fit.history if "mean_rel_error" in h] == [100, 200]
    again = restore(run)
    assert again.config.guard_functions == 2 and again.config == CONFIG
    np.testing.assert_array_equal(again.metrics.rayleigh, m.rayleigh)
    saved = (run / "solve_config.json").read_text()
    assert f'"version": {CONFIG_VERSION}' in saved and '"guard_functions": 2' in saved


def test_bad_guard_function_counts_and_networks_are_refused():
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="SolveConfig.guard_functions must be a non-negative integer"):
            SolveConfig(guard_functions=bad)
    problem = nl.HarmonicOscillator(dim=2)
    network = nl.eigenfunction_network(2, 3, hidden=(8,), rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"L = 3 states and 2 guard functions were asked for: "
                                         r"build it with 5 outputs"):
        solve(problem, 3, config=CONFIG, network=network, progress=False)


def test_a_version_two_configuration_is_read_without_guard_functions():
    data = SolveConfig().to_dict()
    collapse = {k: v for k, v in data["training"]["collapse"].items() if k != "formed_ratio"}
    old = ({k: v for k, v in data.items() if k != "guard_functions"}
           | {"version": 2, "training": {**data["training"], "collapse": collapse}})
    assert SolveConfig.from_dict(old).guard_functions == 0
    # Version 2 reordered functions still forming too (formed_ratio 0, see test_reordering).
    assert SolveConfig.from_dict(old) == SolveConfig(
        training=TrainingConfig(collapse=CollapseConfig(formed_ratio=0.0)))
