"""Operators: the importance-weighted negative Hamiltonian and its bookkeeping.

The key property (method.md §2): with ``x ~ p`` and ``f = psi / sqrt(p)``, plain batch means of
``f_i f_j`` and ``f_i T_p f_j`` estimate ``<psi_i, psi_j> = delta_ij`` and
``<psi_i, T psi_j> = t_i delta_ij``. For exact eigenfunctions ``T_p f_i = t_i f_i`` holds
pointwise, which is checked to rounding (float64); the Monte Carlo means are checked within
5 standard errors estimated from the samples themselves (a false alarm per entry has
probability ~6e-7; the keys are fixed, so the test is deterministic).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestedlora_jax.operators import (
    apply_operator,
    eigenvalues_from_energies,
    energies_from_eigenvalues,
    negative_hamiltonian,
    problem_operator,
    valid_points,
)
from nestedlora_jax.problems import CosinePotential, HarmonicOscillator, Hydrogen, InfiniteWell
from nestedlora_jax.samplers import GaussianSampler

MC_CASES = {
    "oscillator1d": (HarmonicOscillator(1), 6),
    "oscillator2d": (HarmonicOscillator(2), 10),
    "oscillator3d": (HarmonicOscillator(3), 10),
    "hydrogen2d": (Hydrogen(2), 16),
    "hydrogen3d": (Hydrogen(3), 14),
    "well2d": (InfiniteWell(2, length=2.0), 10),
    "cosine2d": (CosinePotential(), 8),
}


@pytest.mark.parametrize("name", list(MC_CASES))
def test_importance_weighted_monte_carlo_recovers_delta_and_eigenvalues(name):
    problem, L = MC_CASES[name]
    B = 8192
    with jax.enable_x64(True):
        op, sampler, scale, shift, t, weighted = problem_operator(problem, L)
        assert weighted  # the default; the network below represents psi / sqrt(p)

        def f_exact(x):  # the network's target: psi / sqrt(p)
            return problem.eigenfunctions(x, L) * jnp.exp(-0.5 * sampler.log_prob(x))

        @jax.jit
        def run(key):
            xs = sampler.sample(key, B)
            return apply_operator(op, f_exact, xs)

        f, tf = (np.asarray(a) for a in run(jax.random.key(7)))
    assert f.shape == tf.shape == (B, L)
    # Pointwise: T_p f_i = t_i f_i (exact arithmetic); rounding only.
    np.testing.assert_allclose(tf, f * t, rtol=0, atol=1e-9 * np.max(np.abs(f * t)))

    gram_terms = f[:, :, None] * f[:, None, :]
    op_terms = f[:, :, None] * tf[:, None, :]
    for terms, target in ((gram_terms, np.eye(L)), (op_terms, np.diag(t))):
        mean, se = terms.mean(0), terms.std(0) / math.sqrt(B)
        z = np.abs(mean - target) / (se + 1e-300)
        assert np.all(z <= 5.0), f"max |z| = {z.max():.2f} at {np.unravel_index(z.argmax(), z.shape)}"
    np.testing.assert_allclose(energies_from_eigenvalues(t, scale, shift), problem.energies(L), rtol=1e-12)


def test_weighted_operator_equals_direct_conjugation():
    # T_p f = T(sqrt(p) f) / sqrt(p), computed directly with exp (fine at moderate x) against the
    # log-space expansion in the operator.
    sampler = GaussianSampler(2, scale=1.3, mean=(0.2, -0.4))

    def potential(x):
        return x[0] ** 2 + jnp.sin(x[1])

    def fn(x):
        return jnp.stack([jnp.sin(x[0]) * x[1] ** 2, jnp.exp(-x @ x) + x[0] * x[1], jnp.cos(x[0] + 2 * x[1])])

    scale, shift, kinetic = 0.7, 0.3, 1.5
    with jax.enable_x64(True):
        op = negative_hamiltonian(potential, kinetic=kinetic, scale=scale, shift=shift, log_prob=sampler.log_prob)

        def direct(x):
            psi = lambda y: jnp.exp(0.5 * sampler.log_prob(y)) * fn(y)
            hess = jax.hessian(psi)(x)
            lap = jnp.trace(hess, axis1=-2, axis2=-1)
            t_psi = scale * (kinetic * lap - potential(x) * psi(x)) + shift * psi(x)
            return t_psi / jnp.exp(0.5 * sampler.log_prob(x))

        # Without log_prob: plain T f = scale (kinetic Lap f - V f) + shift f, for a scalar fn too.
        plain = negative_hamiltonian(potential, scale=2.0, shift=1.0)

        @jax.jit
        def evaluate(xs):
            f, tf = apply_operator(op, fn, xs)
            value, t_value = plain(lambda y: jnp.sin(y[0]) * y[1] ** 2, xs[0])
            return f, tf, jax.vmap(direct)(xs), jax.vmap(fn)(xs), value, t_value

        xs = jax.random.normal(jax.random.key(0), (64, 2))
        f, tf, expected, f_direct, value, t_value = (np.asarray(a) for a in evaluate(xs))
    np.testing.assert_allclose(tf, expected, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(f, f_direct, rtol=1e-13)
    x = np.asarray(xs[0], np.float64)
    lap = -np.sin(x[0]) * x[1] ** 2 + 2 * np.sin(x[0])
    v = x[0] ** 2 + np.sin(x[1])
    np.testing.assert_allclose(t_value, 2.0 * (lap - v * value) + value, rtol=1e-12)
    assert value.shape == t_value.shape == ()


def test_hutchinson_needs_key_and_is_unbiased():
    problem = HarmonicOscillator(3)
    with jax.enable_x64(True):
        exact = problem_operator(problem, 4).op
        noisy = problem_operator(problem, 4, laplacian_method="hutchinson", num_probes=4).op

        def fn(x):  # a non-diagonal Hessian, so the probes actually add noise
            return jnp.stack([jnp.exp(-0.5 * x @ x) * (1 + x[0] * x[1]), jnp.sin(x[0] + x[1] - x[2])])

        x = jnp.array([0.3, -0.5, 0.9])
        with pytest.raises(ValueError, match="stochastic: call op\\(fn, x, key=...\\)"):
            noisy(fn, x)
        xs = jnp.tile(x, (4096, 1))

        @jax.jit
        def evaluate(xs, key):
            return exact(fn, xs[0])[1], apply_operator(noisy, fn, xs, key=key)[1]

        t_exact, t_noisy = (np.asarray(a) for a in evaluate(xs, jax.random.key(1)))
    mean, se = np.mean(t_noisy, 0), np.std(t_noisy, 0) / math.sqrt(len(xs))
    assert np.all(se > 0)  # the estimator is really stochastic here
    assert np.all(np.abs(mean - t_exact) <= 5 * se)


def test_hydrogen_float32_million_samples_finite():
    # A sample near the nucleus must not poison a batch: default sampler, float32, 1e6 points,
    # a random MLP with f(0) != 0 (the worst case for the 1/r terms; the exact eigenfunctions
    # are covered in float64 above). The nucleus itself is not a valid point (V = -inf there):
    # it must be recognised as such, not passed off as a huge finite value.
    problem, L = Hydrogen(2), 16
    op, sampler, *_ = problem_operator(problem, L)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w1, w2, b1 = jax.random.normal(k1, (2, 16)), jax.random.normal(k2, (16, 4)) / 4, jnp.linspace(-1, 1, 16)

    def fn(x):
        return jnp.tanh(x @ w1 + b1) @ w2

    @jax.jit
    def validity(key):
        xs = sampler.sample(key, 1_000_000)
        # A point at r_min (the sampler's smallest radius) and the nucleus are appended.
        xs = jnp.concatenate([xs, jnp.array([[sampler.r_min, 0.0]]), jnp.zeros((1, 2))])
        f, tf = jax.lax.map(lambda x: op(fn, x), xs, batch_size=65536)
        return valid_points(f, tf), tf[:1]

    valid, head = validity(k3)
    valid = np.asarray(valid)
    assert head.dtype == jnp.float32
    assert valid[:-1].all()  # every sample and the point at r_min
    assert not valid[-1]  # the nucleus


def test_eigenvalue_energy_maps_are_inverse():
    t = np.array([1.0, 0.5, 0.25])
    e = energies_from_eigenvalues(t, 0.5, 0.2)
    np.testing.assert_allclose(e, -(t - 0.2) / 0.5)
    np.testing.assert_allclose(eigenvalues_from_energies(e, 0.5, 0.2), t)
    np.testing.assert_allclose(energies_from_eigenvalues(jnp.asarray(t), 0.5, 0.2), e)


def _bad_potential_op():
    op = negative_hamiltonian(lambda x: x * x)  # (d,), not a scalar
    return op(lambda x: jnp.sin(x), jnp.ones(2))


@pytest.mark.parametrize(
    "call, match",
    [
        (_bad_potential_op, r"potential must return a scalar .* got \(2,\)"),
        (lambda: problem_operator(Hydrogen(2), 4, sampler=GaussianSampler(3)), "dimension mismatch"),
        (lambda: negative_hamiltonian(lambda x: 0.0, laplacian_method="nope"), "Unknown Laplacian method 'nope'"),
        (lambda: problem_operator(HarmonicOscillator(2), 4, laplacian_method="spectral"), "Unknown Laplacian method"),
        (lambda: problem_operator(CosinePotential(), 5000), "L=5000 exceeds"),
        (lambda: problem_operator(Hydrogen(2), 0), "must be a Python int >= 1"),
        (lambda: negative_hamiltonian(lambda x: x @ x)(lambda x: x, jnp.ones((3, 2))), r"ONE point of shape \(d,\)"),
        (lambda: apply_operator(negative_hamiltonian(lambda x: x @ x), lambda x: x, jnp.ones(2)), r"shape \(B, d\)"),
    ],
)
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
