"""Samplers: densities integrate to one, samples follow them, nothing non-finite, jit-able.

Every density is checked against an independent quadrature of its ``log_prob`` (tensor
Gauss-Legendre on panels, or polar / spherical product rules for the radial mixtures), and the
samples against the same quadrature: Monte Carlo means of test functions must agree with
``int g p`` within 5 standard errors estimated from the samples.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from quadrature_rules import angular_rule

from nestedlora_jax.samplers import (
    GaussianSampler,
    LaplaceSampler,
    RadialExponentialMixture,
    UniformBoxSampler,
    check_sampler_dim,
)

SAMPLERS = {
    "gaussian": GaussianSampler(2, scale=1.5, mean=(0.5, -1.0)),
    "laplace": LaplaceSampler(2, scale=0.7),
    "uniform": UniformBoxSampler(-1.0, 2.0, 2),
    "radial2d_1/r": RadialExponentialMixture(2, scales=(0.5, 3.0), weights=(1.0, 3.0)),
    "radial2d_finite": RadialExponentialMixture(2, scales=(1.0, 3.0, 5.0), shape=2),
    "radial3d_finite": RadialExponentialMixture(3, scales=(2.0, 4.0), shape=3),
}


def _gl_panels(breaks, n=40):
    """Gauss-Legendre nodes/weights on consecutive panels [breaks[i], breaks[i+1]]."""
    t, w = np.polynomial.legendre.leggauss(n)
    nodes, weights = [], []
    for a, b in zip(breaks[:-1], breaks[1:]):
        nodes.append(0.5 * (b - a) * t + 0.5 * (a + b))
        weights.append(0.5 * (b - a) * w)
    return np.concatenate(nodes), np.concatenate(weights)


def _quadrature(sampler):
    """Points (N, d) and weights (N,) of a rule for integrals of smooth functions against p."""
    if isinstance(sampler, RadialExponentialMixture):
        a_min, a_max = min(sampler.scales), max(sampler.scales)
        # Geometric panels resolve both the small and the large scales; the integrand
        # r^{d-1} p(r) ~ r^{shape-1} e^{-r/a} is smooth on [0, inf).
        r, wr = _gl_panels(np.concatenate([[0.0], np.geomspace(a_min / 4, 80 * a_max, 14)]))
        u, wu = angular_rule(2, 32) if sampler.dim == 2 else angular_rule(3, 24, 12)
        pts = (r[:, None, None] * u[None]).reshape(-1, sampler.dim)
        w = (wr[:, None] * r[:, None] ** (sampler.dim - 1) * wu[None]).ravel()
        return pts, w
    if isinstance(sampler, UniformBoxSampler):
        x, wx = _gl_panels([sampler.low, sampler.high], 20)
    elif isinstance(sampler, LaplaceSampler):
        b = sampler.scale
        x, wx = _gl_panels(np.concatenate([-np.geomspace(60 * b, b / 8, 8), [0.0], np.geomspace(b / 8, 60 * b, 8)]), 30)
    else:
        m, s = np.asarray(sampler.mean) * np.ones(2), sampler.scale
        x, wx = _gl_panels(np.linspace(-12 * s, 12 * s, 9) + m.mean(), 30)
        assert np.ptp(m) < 2 * s  # one grid covers both coordinates' bulk
    X, Y = np.meshgrid(x, x, indexing="ij")
    return np.stack([X.ravel(), Y.ravel()], -1), np.outer(wx, wx).ravel()


def _test_functions(x):
    """A few smooth statistics g(x) (N, k): coordinates, squares, radius, a cross term, a cosine."""
    r = np.linalg.norm(x, axis=-1)
    return np.stack([x[:, 0], x[:, 1], x[:, 0] ** 2, x[:, -1] ** 2, r, x[:, 0] * x[:, 1], np.cos(x[:, 0] + 0.3 * x[:, 1])], -1)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_log_prob_integrates_to_one_and_samples_follow_it(name):
    sampler = SAMPLERS[name]
    with jax.enable_x64(True):
        pts, w = _quadrature(sampler)
        logp = np.asarray(jax.jit(jax.vmap(sampler.log_prob))(jnp.asarray(pts)))
        p = np.exp(logp)
        # Quadrature error of these smooth rules is ~1e-12; 1e-9 leaves room for the panels.
        np.testing.assert_allclose(np.sum(w * p), 1.0, rtol=0, atol=1e-9)

        xs = np.asarray(jax.jit(sampler.sample, static_argnums=1)(jax.random.key(1), 40_000))
        assert xs.shape == (40_000, sampler.dim) and xs.dtype == np.float64
        g = _test_functions(xs)
        mc, se = g.mean(0), g.std(0) / math.sqrt(len(g))
        exact = (w * p) @ _test_functions(pts)
        # 5 standard errors: a false alarm has probability ~1e-6 per statistic.
        assert np.all(np.abs(mc - exact) <= 5 * se + 1e-12), (mc, exact, se)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_float32_samples_finite_with_finite_log_prob(name):
    sampler = SAMPLERS[name]
    xs = jax.jit(sampler.sample, static_argnums=1)(jax.random.key(0), 100_000)
    assert xs.dtype == jnp.float32  # library default outside enable_x64
    logp = jax.jit(jax.vmap(sampler.log_prob))(xs)
    assert bool(jnp.all(jnp.isfinite(xs))) and bool(jnp.all(jnp.isfinite(logp)))
    if isinstance(sampler, RadialExponentialMixture):
        # No sample on the nucleus: radii clamped at r_min (1e-6 relative rounding slack).
        assert float(jnp.min(jnp.linalg.norm(xs, axis=-1))) >= sampler.r_min * (1 - 1e-5)
        # log_prob stays finite (and differentiable) even exactly at the origin.
        zero = jnp.zeros(sampler.dim)
        assert bool(jnp.isfinite(sampler.log_prob(zero)))
        assert bool(jnp.all(jnp.isfinite(jax.grad(sampler.log_prob)(zero))))


def test_radial_mixture_2d_matches_the_documented_formula():
    # p(x) = sum_k pi_k exp(-r/a_k) / (2 pi a_k r) for the default shape in 2-D.
    s = RadialExponentialMixture(2, scales=(0.5, 3.0), weights=(1.0, 3.0))
    with jax.enable_x64(True):
        x = jnp.array([0.3, -1.1])
        r = float(jnp.linalg.norm(x))
        expected = sum(pi * math.exp(-r / a) / (2 * math.pi * a * r) for pi, a in zip((0.25, 0.75), (0.5, 3.0)))
        np.testing.assert_allclose(float(jnp.exp(s.log_prob(x))), expected, rtol=1e-13)
        # Stable far in the tail, where exp(log p) underflows but log p does not.
        assert np.isfinite(float(s.log_prob(jnp.array([5e3, 0.0]))))


def test_samplers_are_hashable_and_jit_static():
    sampler = RadialExponentialMixture(2, scales=[1.0, 3.0])  # list -> tuple: hashable
    assert hash(sampler) == hash(RadialExponentialMixture(2, scales=(1.0, 3.0)))

    @jax.jit
    def draw(key):
        return sampler.sample(key, 8)  # closed over in jit

    sample = jax.jit(lambda s, k: s.sample(k, 8), static_argnums=0)
    assert sample(sampler, jax.random.key(0)).shape == (8, 2)
    assert draw(jax.random.key(0)).shape == (8, 2)
    with jax.enable_x64(True):
        assert GaussianSampler(3).sample(jax.random.key(0), 4).dtype == jnp.float64
        assert GaussianSampler(3).sample(jax.random.key(0), 4, dtype=jnp.float32).dtype == jnp.float32


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: GaussianSampler(0), "dim must be a positive int"),
        (lambda: GaussianSampler(2, scale=-1.0), "scale must be a finite number > 0"),
        (lambda: GaussianSampler(2, mean=(0.0, 1.0, 2.0)), "mean must be a scalar or have length dim=2"),
        (lambda: LaplaceSampler(2, scale=0.0), "scale must be a finite number > 0"),
        (lambda: UniformBoxSampler(1.0, 1.0, 2), "need finite low < high"),
        (lambda: RadialExponentialMixture(1, scales=(1.0,)), "dim must be >= 2"),
        (lambda: RadialExponentialMixture(2, scales=(1.0, -2.0)), "scales must be"),
        (lambda: RadialExponentialMixture(2, scales=(1.0, 2.0), weights=(1.0,)), "weights must be 2"),
        (lambda: GaussianSampler(2).log_prob(jnp.zeros((4, 2))), r"ONE point of shape \(2,\)"),
        (lambda: GaussianSampler(2).sample(jax.random.key(0), 2.5), "n must be a Python int"),
        (lambda: check_sampler_dim(GaussianSampler(3), 2), "dimension mismatch.*3 dimensions.*2-dimensional"),
        (lambda: check_sampler_dim(object(), 2), "expected a sampler"),
    ],
)
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()
