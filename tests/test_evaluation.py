"""Monte Carlo evaluation with standard errors, validated against quadrature grids.

The "networks" here are exact eigenfunctions, deliberately perturbed (mixed within and across
levels, plus a function outside the span), written in the representation the trained networks
use (``psi / sqrt(p)``): their true metrics are known from a fine quadrature grid, so the Monte
Carlo estimates and their error bars can be checked against them.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestedlora_jax.evaluation import (
    _metric_block,
    evaluate,
    level_weights,
    metrics_from_gram,
    quadrature_grid,
)
from nestedlora_jax.operators import problem_operator
from nestedlora_jax.problems import CoupledOscillator, HarmonicOscillator, Hydrogen


def perturbed_network(problem, L, operator, eps, seed=0):
    """``apply(None, x) = (psi(x) A) (1 + eps g(x)) / sqrt(p(x))``: ``A = I + eps B`` mixes
    states, the smooth factor ``g`` (a bump per output) leaves the span of the exact
    eigenfunctions. A factor rather than an added function keeps the Coulomb cusp of
    hydrogen's states: an added smooth function would put a ``1/r`` term in ``Tf - t f``,
    whose Monte Carlo variance diverges logarithmically at the nucleus (no trained network
    with the radial input has that)."""
    rng = np.random.default_rng(seed)
    A = jnp.asarray(np.eye(L) + eps * rng.standard_normal((L, L)), jnp.float32)
    centres = jnp.asarray(rng.standard_normal((L, problem.dim)), jnp.float32)

    def apply(params, x):
        psi = problem.eigenfunctions(x, L)
        bump = jnp.exp(-0.5 * jnp.sum((x[None, :] - centres) ** 2, axis=1))
        return (psi @ A) * (1 + eps * bump) * jnp.exp(-0.5 * operator.sampler.log_prob(x))

    return apply


def test_gram_metrics_equal_pointwise_metrics():
    """Metrics from the Gram matrix (via pseudo-points) equal the metrics on the points."""
    rng = np.random.default_rng(0)
    N, L = 500, 4
    with jax.enable_x64(True):
        f, Tf, psi = (jnp.asarray(rng.standard_normal((N, L))) for _ in range(3))
        w = jnp.asarray(rng.uniform(0.5, 1.5, N) / N)
        blocks = ((0, 1), (1, 3), (3, 4))
        direct = _metric_block(f, Tf, w, psi, blocks)
        z = jnp.concatenate([f, Tf, psi], axis=1)
        S = np.asarray((z * w[:, None]).T @ z)
    op = problem_operator(HarmonicOscillator(dim=2), L)
    via = metrics_from_gram(S, L, op, np.arange(1.0, L + 1), blocks, True)
    energy = lambda t: -(np.asarray(t) - op.shift) / op.scale
    np.testing.assert_allclose(via["rayleigh"], energy(direct["t_rayleigh"]), rtol=1e-10)
    np.testing.assert_allclose(via["norm"], energy(direct["t_norm"]), rtol=1e-10)
    np.testing.assert_allclose(via["residual"], np.asarray(direct["residual"]) / op.scale, rtol=1e-8)
    for key in ("subspace_distance_blocks", "angle_distance", "orthogonality_fro",
                "ritz_subspace_distance_blocks"):
        np.testing.assert_allclose(via[key], direct[key], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(via["ritz"], energy(direct["ritz"]), rtol=1e-10)


CASES = {
    "oscillator": (HarmonicOscillator(dim=2), 6, 200),
    "hydrogen": (Hydrogen(dim=2), 4, 300),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_monte_carlo_agrees_with_the_grid_within_its_error_bars(name):
    problem, L, grid = CASES[name]
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.03)
    points, weights = quadrature_grid(problem, L, grid)
    ref = evaluate(apply, None, problem, op, points=points, weights=weights)
    assert ref.standard_errors == {}  # a grid is deterministic
    mc = evaluate(apply, None, problem, op, num_samples=2**16, key=jax.random.PRNGKey(3))
    for key in ("rayleigh", "rel_error", "subspace_distance_blocks", "angle_distance"):
        z = (np.asarray(getattr(mc, key)) - np.asarray(getattr(ref, key))) / np.asarray(mc.se(key))
        assert np.all(np.abs(z) < 4.5), (key, z)
    for key in ("mean_rel_error", "subspace_distance_mean", "orthogonality_fro"):
        mc_value, ref_value, se = getattr(mc, key), getattr(ref, key), mc.se(key)
        assert abs(mc_value - ref_value) < 4.5 * se, (key, mc_value, ref_value, se)
    # The error bar is well below the error it qualifies (ratio estimates on one sample).
    assert mc.se("mean_rel_error") < 0.2 * ref.mean_rel_error
    assert mc.se("subspace_distance_mean") < 0.2 * ref.subspace_distance_mean


def test_standard_errors_are_calibrated():
    """Over independent samples the z-scores against the grid have unit spread."""
    problem, L = HarmonicOscillator(dim=2), 3
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.05, seed=1)
    ref = evaluate(apply, None, problem, op, *(), **dict(zip(("points", "weights"), quadrature_grid(problem, L, 160))))
    z = []
    for k in range(16):
        mc = evaluate(apply, None, problem, op, num_samples=2**13, key=jax.random.PRNGKey(100 + k),
                      groups=16)
        z.append((mc.rayleigh - ref.rayleigh) / mc.se("rayleigh"))
    z = np.concatenate(z)  # 48 z-scores
    assert 0.6 < np.std(z) < 1.5, np.std(z)
    assert abs(np.mean(z)) < 0.6, np.mean(z)


def test_exact_eigenfunctions_in_ten_dimensions_have_zero_error_and_error_bar():
    """At exact eigenfunctions ``Tf = t f`` pointwise: the ratio estimate has no variance."""
    problem, L = CoupledOscillator(dim=10), 12
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.0)
    mc = evaluate(apply, None, problem, op, num_samples=2**13, groups=8)
    assert mc.max_rel_error < 2e-5 and np.max(mc.se("rel_error")) < 2e-5
    assert mc.subspace_distance_mean < 1e-6 and mc.angle_distance_mean < 1e-6
    # ... while a perturbed network's error is resolved: error >> error bar.
    apply = perturbed_network(problem, L, op, eps=0.02)
    mc = evaluate(apply, None, problem, op, num_samples=2**13, groups=8)
    assert mc.mean_rel_error > 10 * mc.se("mean_rel_error")


def test_too_few_samples_is_a_clear_error():
    problem, L = HarmonicOscillator(dim=2), 6
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.0)
    with pytest.raises(ValueError, match="too few to evaluate 6 functions.*at least 576"):
        evaluate(apply, None, problem, op, num_samples=500)
    with pytest.raises(ValueError, match="groups"):
        evaluate(apply, None, problem, op, num_samples=4096, groups=1)


def test_non_finite_points_are_left_out_and_counted():
    """A network that is NaN on part of space: those points are dropped (with a warning) and
    the metrics of the rest stay finite and exact."""
    problem, L = HarmonicOscillator(dim=2), 3
    op = problem_operator(problem, L)
    exact_net = perturbed_network(problem, L, op, eps=0.0)
    apply = lambda params, x: jnp.where(x[0] > 2.5, jnp.nan, 1.0) * exact_net(params, x)
    with pytest.warns(RuntimeWarning, match="points gave non-finite or absurd"):
        mc = evaluate(apply, None, problem, op, num_samples=2**13, groups=8)
    assert mc.num_invalid_points > 0
    assert mc.num_points == 2**13 - mc.num_invalid_points
    assert np.all(np.isfinite(mc.rayleigh)) and mc.max_rel_error < 1e-4


def test_exact_eigenfunctions_of_the_ten_dimensional_cosine_problem_are_exact():
    """Guards the evaluation chunk size: with 4096-point chunks the compiled operator of this
    problem returned wrong ``Tf`` for rows 1560 and beyond (XLA CPU, jaxlib 0.10.2), shifting
    every energy by about +0.12; with the default chunk the exact states come out exact."""
    from nestedlora_jax.problems import CosinePotential

    problem, L = CosinePotential(dim=10), 21
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.0)
    mc = evaluate(apply, None, problem, op, num_samples=4096, groups=8)
    assert mc.max_rel_error < 1e-4, mc.rel_error


def test_the_evaluation_result_is_typed_and_its_json_form_flat():
    """Attributes by name, standard errors through se(), the flat JSON form of results.json
    (``<name>_se`` beside each name), and one clear error for what a grid cannot have."""
    problem, L = HarmonicOscillator(dim=1), 2
    op = problem_operator(problem, L)
    apply = perturbed_network(problem, L, op, eps=0.03)
    mc = evaluate(apply, None, problem, op, num_samples=2**12, key=jax.random.PRNGKey(0))
    flat = mc.to_dict()
    assert flat["mean_rel_error"] == mc.mean_rel_error and flat["mean_rel_error_se"] == mc.se("mean_rel_error")
    assert flat["evaluation"] == "Monte Carlo" and flat["num_points"] == 2**12
    assert set(mc.available()) <= set(flat) and json.loads(json.dumps(flat, default=list))
    assert "mean_rel_error" in mc.table() and "exact" in mc.table()
    points, weights = quadrature_grid(problem, L, 100)
    grid = evaluate(apply, None, problem, op, points=points, weights=weights)
    assert "mean_rel_error_se" not in grid.to_dict()
    with pytest.raises(KeyError, match="no standard error for 'rayleigh': a quadrature grid has none"):
        grid.se("rayleigh")
    with pytest.raises(KeyError, match="'energy' is not a metric"):
        mc.se("energy")


def test_evaluation_multiplies_at_full_float32_precision_whatever_the_default():
    """On GPUs JAX's default float32 matmul rounds to TF32 (relative 2^-11), as large as the
    errors being measured. The compiled evaluation must ask XLA for full precision on every
    product of the network and of its Laplacian, even under a lower process default (the CPU
    ignores the request, so the compiled program is what can be checked here)."""
    from flax import nnx

    from nestedlora_jax.evaluation import _values_chunk
    from nestedlora_jax.networks import eigenfunction_network, to_apply

    problem, L = Hydrogen(dim=2), 4
    op = problem_operator(problem, L)
    apply, params = to_apply(eigenfunction_network(2, L, architecture="parallel", hidden=(8, 8),
                                                   rngs=nnx.Rngs(params=0)))
    x = jnp.ones((4, 2), jnp.float32)
    with jax.default_matmul_precision("bfloat16"):
        text = _values_chunk.lower(apply, params, op.op, x).as_text()
    dots = [line for line in text.splitlines() if "dot_general" in line and "precision" in line]
    assert len(dots) >= 6, "expected the network's and the Laplacian's matrix products"
    assert all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots[:3]


def mixed_network(problem, M, operator):
    """``apply(None, x) = psi(x) M / sqrt(p(x))``: learned function ``i`` is the column
    ``M[:, i]`` of exact states, so its weight in each level is known."""
    M = jnp.asarray(M, jnp.float32)

    def apply(params, x):
        return (problem.eigenfunctions(x, M.shape[0]) @ M) * jnp.exp(-0.5 * operator.sampler.log_prob(x))

    return apply


def test_level_weights_recover_the_composition_of_mixed_functions():
    """Three functions mixing the ten lowest oscillator states: their norm in each of the three
    lowest levels (six states) and outside them, from the grid and from samples."""
    problem = HarmonicOscillator(dim=2)
    rng = np.random.default_rng(3)
    M = rng.standard_normal((10, 3)) * np.array([1.0, 0.3, 0.3, 0.1, 0.1, 0.1, 0.5, 0.5, 0.0, 0.0])[:, None]
    M[:, 2] = 0.0
    M[4, 2], M[7, 2] = 0.6, 0.8  # level 3 (states 3..5) 0.36, beyond the six states 0.64
    op = problem_operator(problem, 3)
    apply = mixed_network(problem, M, op)
    blocks = problem.degenerate_blocks(6)
    assert blocks == [(0, 1), (1, 3), (3, 6)]
    share = M ** 2 / np.sum(M ** 2, axis=0)
    expected = np.stack([share[a:b].sum(axis=0) for a, b in blocks] + [share[6:].sum(axis=0)], axis=1)
    np.testing.assert_allclose(expected[2], [0, 0, 0.36, 0.64], atol=1e-12)

    points, weights = quadrature_grid(problem, 10, 120)
    on_grid = level_weights(apply, None, problem, op, 6, points=points, weights=weights)
    assert on_grid.shape == (3, 4)
    np.testing.assert_allclose(on_grid, expected, atol=2e-6)
    np.testing.assert_allclose(on_grid.sum(axis=1), 1.0, atol=1e-12)

    sampled = level_weights(apply, None, problem, op, 6, num_samples=2**15, key=jax.random.PRNGKey(1))
    np.testing.assert_allclose(sampled, expected, atol=0.03)


def test_level_weights_refuse_what_they_cannot_compute():
    problem = HarmonicOscillator(dim=2)
    op = problem_operator(problem, 2)
    apply = mixed_network(problem, np.eye(3)[:, :2], op)
    with pytest.raises(ValueError, match="num_states must be a positive integer"):
        level_weights(apply, None, problem, op, 0)
    hydrogen = Hydrogen(dim=3)
    h_op = problem_operator(hydrogen, 2)
    with pytest.raises(ValueError, match="no exact eigenfunctions for 31 states"):
        level_weights(apply, None, hydrogen, h_op, 31)
