"""End to end: the solver reaches stated accuracy on problems with exact answers.

Budgets were measured on the 2-core CPU (see the README): each run is well under a minute.
"""

import numpy as np
import pytest

from nestedlora_jax import problems
from nestedlora_jax.config import EvaluationConfig, SolveConfig, TrainingConfig
from nestedlora_jax.solver import solve


@pytest.mark.parametrize(
    "method, steps",
    # Joint nesting end to end is a slow test: its objective is proven on matrices and
    # baselines in the default suite, and the suite must stay near 10 minutes on 2 cores.
    [("neuralsvd-seq", 6000), pytest.param("neuralsvd-joint", 8000, marks=pytest.mark.slow)],
)
def test_harmonic_oscillator_six_states(method, steps):
    """2-D oscillator, 3 levels (E = 2, 4, 4, 6, 6, 6): mean relative error <= 1e-3."""
    config = SolveConfig(method=method, training=TrainingConfig(
        steps=steps, batch_size=512, learning_rate=3e-3, log_every=500, seed=0))
    result = solve(problems.HarmonicOscillator(dim=2), 6, config=config, progress=False)
    m = result.metrics
    print(result.table)
    assert m.mean_rel_error <= 1e-3
    assert m.subspace_distance_mean <= 1e-2
    assert result.fit.bad_steps == 0


def test_hydrogen_four_states():
    """2-D hydrogen, n = 0, 1 (E = -1, -1/9 x 3): mean relative error <= 2e-2."""
    config = SolveConfig(training=TrainingConfig(
        steps=6000, batch_size=256, learning_rate=3e-3, log_every=500, seed=0))
    result = solve(problems.Hydrogen(dim=2), 4, config=config, progress=False)
    print(result.table)
    m = result.metrics
    assert m.mean_rel_error <= 2e-2
    assert np.all(np.isfinite(m.rayleigh))
    assert m.subspace_distance_mean <= 2e-2


def test_periodic_evaluation_is_recorded_in_the_history():
    config = SolveConfig(
        training=TrainingConfig(steps=400, batch_size=64, learning_rate=3e-3, log_every=100),
        evaluation=EvaluationConfig(every=200, num_periodic_samples=1024),
    )
    result = solve(problems.HarmonicOscillator(dim=1), 2, config=config, progress=False)
    evaluated = [h for h in result.fit.history if "mean_rel_error" in h]
    assert [h["step"] for h in evaluated] == [200, 400]
    assert evaluated[-1]["mean_rel_error"] < evaluated[0]["mean_rel_error"]
    with pytest.raises(ValueError, match=r"EvaluationConfig.every \(150\) must be a multiple"):
        SolveConfig(training=TrainingConfig(log_every=100), evaluation=EvaluationConfig(every=150))


def test_ritz_subspace_distance_undoes_mixing_across_levels():
    """Exact eigenfunctions mixed across levels by an invertible Q: the learned span is exact,
    so the Rayleigh-Ritz functions recover every level while the raw functions do not."""
    import jax.numpy as jnp

    from nestedlora_jax import evaluate, problem_operator, problems, quadrature_grid

    problem, L = problems.HarmonicOscillator(dim=1), 3
    op = problem_operator(problem, L)
    Q = jnp.asarray([[1.0, 0.3, 0.0], [0.2, 1.0, 0.1], [0.0, 0.4, 1.0]])

    def apply(params, x):  # the network represents psi / sqrt(p)
        return (Q @ problem.eigenfunctions(x, L)) * jnp.exp(-0.5 * op.sampler.log_prob(x))

    points, weights = quadrature_grid(problem, L, 400)
    m = evaluate(apply, None, problem, op, points=points, weights=weights)
    assert m.subspace_distance_mean > 1e-2
    assert m.ritz_subspace_distance_mean < 1e-5
    np.testing.assert_allclose(m.ritz, problem.energies(L), rtol=1e-4)
